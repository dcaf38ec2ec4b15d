"""The command line as a user meets it: output, exit codes, one-line errors."""

import json
import shutil

import pytest

from apet_export.cli import main


def run_cli(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("build", "run", "parity", "bench", "inspect", "visualize", "calibrate"):
        assert command in out


def test_run_streams_text(capsys, llava_build):
    code, out, err = run_cli(capsys, "run", str(llava_build), "--prompt", "Describe the image.", "--max-new-tokens", "6")
    assert code == 0 and out.endswith("\n") and len(out.strip()) > 0
    assert "prefill" in err and "tok/s" in err


def test_run_json_events(capsys, siglip_qwen2_build):
    code, out, _ = run_cli(
        capsys, "run", str(siglip_qwen2_build), "--prompt", "Hi", "--max-new-tokens", "5", "--json", "--backend", "torch"
    )
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    tokens = [e for e in events if e["event"] == "token" and e["token_id"] is not None]
    done = events[-1]
    assert done["event"] == "summary" and done["generated_tokens"] == len(tokens) == len(done["token_ids"])
    assert done["image_tokens"] == 64 and done["prefill_ms"] > 0


def test_inspect_and_visualize(capsys, llava_build, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", str(llava_build))
    assert code == 0
    assert "ai.onnx.contrib::ApetScore" in out and "Attention" in out and "[batch, keep, 64]" in out
    from apet_export.runtime.images import synthetic_image

    image = tmp_path / "picture.png"
    synthetic_image(3).save(image)
    target = tmp_path / "figure.png"
    code, _, err = run_cli(capsys, "visualize", str(llava_build), "--image", str(image), "--budget", "64", "-o", str(target))
    assert code == 0 and target.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(target).size[0] > Image.open(target).size[1]  # side-by-side panels


def test_bench_measures_against_no_compression(capsys, llava_build, tmp_path):
    rows_file = tmp_path / "bench.json"
    code, out, _ = run_cli(
        capsys, "bench", str(llava_build), "--budgets", "64", "--runs", "1", "--max-new-tokens", "2",
        "--json-out", str(rows_file),
    )
    assert code == 0 and "speed-up" in out
    rows = json.loads(rows_file.read_text())
    assert [r["budget"] for r in rows] == [576, 64]  # N was added as the reference
    assert rows[0]["prefill_speedup"] == 1.0 and rows[1]["ideal_speedup"] > 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "{build}", "--prompt", "x", "--image", "{text_file}"], "is not a readable image"),
        (["run", "{build}", "--prompt", "x", "--budget", "5"], "outside (10, 576]"),
        (["visualize", "{build}", "--image", "{missing}", "-o", "{tmp}/o.png"], "does not exist"),
        (["parity", "{tmp}"], "is not an apet-export build"),
        (["bench", "{build}", "--budgets", "64,9000"], "between 11 and 576"),
        (["build", "--out", "{build}"], "already exists"),
        (["build", "--out", "{tmp}/x", "--model", "{tmp}/nowhere"], "unknown model"),
    ],
)
def test_errors_are_one_clear_line(capsys, tmp_path, llava_build, args, message):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    values = {"build": llava_build, "text_file": text_file, "missing": tmp_path / "missing.png", "tmp": tmp_path}
    code, _, err = run_cli(capsys, *[a.format(**values) for a in args])
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], err


def test_manifest_problems_are_reported(capsys, tmp_path, llava_build):
    copy = tmp_path / "copy"
    shutil.copytree(llava_build, copy)
    (copy / "llm.onnx").unlink()
    code, _, err = run_cli(capsys, "run", str(copy), "--prompt", "x")
    assert code == 1 and "llm.onnx is listed in the manifest but missing" in err
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 0
    (copy / "manifest.json").write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "inspect", str(copy))
    assert code == 1 and "schema version 0" in err


def test_run_two_stage_budgets(capsys, llava_two_stage_build):
    code, out, _ = run_cli(
        capsys, "run", str(llava_two_stage_build), "--prompt", "Hi", "--max-new-tokens", "4", "--json",
        "--budget1", "80", "--budget2", "24",
    )
    assert code == 0
    done = json.loads(out.splitlines()[-1])
    assert done["image_tokens"] == 80 and done["image_tokens_stage2"] == 24
    code, out, _ = run_cli(capsys, "run", str(llava_two_stage_build), "--prompt", "Hi", "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["image_tokens_stage2"] == 32  # default 64 = 96/32
    code, _, err = run_cli(capsys, "run", str(llava_two_stage_build), "--prompt", "Hi", "--budget1", "32", "--budget2", "48")
    assert code == 1 and "error: the stage-2 budget 48 is above the stage-1 budget 32" in err


@pytest.mark.slow  # a build of its own (~25 s); the uniform rule itself is checked by tests/compression
def test_build_apet_variant_uniform_is_recorded(capsys, tmp_path):
    """The family's variant is the default (what the authors ran); --apet-variant uniform is recorded in the
    manifest and shown by inspect; the runtime's eager path then follows it (the build's compression config)."""
    from apet_export.manifest import load_manifest

    out = tmp_path / "video-uniform"
    code, _, err = run_cli(capsys, "build", "--model", "tiny-video-llava", "--out", str(out), "--no-llm",
                           "--apet-variant", "uniform")
    assert code == 0, err
    assert load_manifest(out).compression.variant == "uniform"
    code, out_text, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "variant=uniform" in out_text
    code, _, err = run_cli(capsys, "build", "--model", "tiny-video-llava", "--out", str(tmp_path / "x"),
                           "--no-llm", "--apet-variant", "qwen2_5_vl")
    assert code == 1 and "choose video_llava" in err and not (tmp_path / "x").exists()
