"""The README's INT8 flow for a newcomer (build the tiny preset -> calibrate on scikit-image's sample photos ->
parity) passes at the default thresholds. The commands are read from the README, so the test follows it."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from apet_export.cli import main
from tests.conftest import linked_copy

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    block = README[README.index("<!-- newcomer-int8 -->"):README.index("<!-- /newcomer-int8 -->")]
    return [shlex.split(line) for line in block.splitlines() if line.startswith(("apet-export ", "python ", "pip "))]


def cli(*args) -> int:
    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_readme_int8_flow_passes_at_the_default_thresholds(llava_build, tmp_path, monkeypatch, capsys):
    pytest.importorskip("skimage.data", reason="scikit-image (dev extra) provides the sample pictures")
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["pip", "install"], ["apet-export", "build"], ["python", "-c"],
                                         ["apet-export", "calibrate"], ["apet-export", "parity"]]
    build = commands[1]
    assert build[build.index("--model") + 1] == "tiny-llava"  # the session's tiny-llava build stands in for it
    monkeypatch.chdir(tmp_path)
    out = Path(build[build.index("--out") + 1])
    linked_copy(llava_build, out)  # calibrate writes its range cache into the build folder: a private one
    subprocess.run([sys.executable, *commands[2][1:]], check=True, cwd=tmp_path)  # writes the picture folder
    calibrate, parity = commands[3], commands[4]
    assert cli(*calibrate[1:]) == 0, capsys.readouterr().err[-3000:]
    code = cli(*parity[1:])
    printed = capsys.readouterr()
    print(printed.out[-6000:])
    assert code == 0, printed.err[-3000:]
    assert "accuracy checks passed" in printed.out
    report = json.loads((Path(parity[2]) / "parity.json").read_text())
    rows = report["accuracy"]
    assert report["passed"] is True and {r["reference"] for r in rows} == {"fp32 onnxruntime", "eager PyTorch"}
    assert {r["metric"].split(" (")[0] for r in rows} == {
        "image-embedding cosine mean", "image-embedding cosine min", "kept-index overlap %",
        "first-step logit diff / max|logit|", "greedy token agreement"}
    cosine = next(r for r in rows if r["metric"].startswith("image-embedding cosine mean"))
    assert 0.99 <= cosine["value"] < 1.0  # quantised: close to, but not exactly, fp32
