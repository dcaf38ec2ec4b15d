"""scripts/gpu_end_to_end.sh cannot run without a GPU; here: bash accepts it, its Python pieces compile and
import, and the commands and options it calls exist in the CLI."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_end_to_end.sh"


def python_pieces(text: str) -> list[str]:
    """The bodies of the script's `python - <<'PY'` here-documents."""
    return re.findall(r"python - [^\n]*<<'PY'\n(.*?)\nPY\n", text, flags=re.S)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_accepts_the_script():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_python_pieces_compile_and_their_imports_resolve():
    pieces = python_pieces(SCRIPT.read_text())
    assert len(pieces) == 2  # the environment line and the calibration pictures
    for piece in pieces:
        tree = ast.parse(piece)
        imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        assert imports
        exec(compile(ast.Module(body=imports, type_ignores=[]), "<gpu_end_to_end.sh>", "exec"), {})


def test_the_commands_and_options_it_calls_exist(capsys):
    from tests.test_cli import run_cli

    text = SCRIPT.read_text()
    used = {"engine": ["--target", "--precision"], "parity": ["--require-tensorrt", "--budget1", "--budget2"],
            "bench": ["--require-tensorrt", "--json-out", "--budget1"], "run": ["--vision-graph", "--budget1", "--backend"],
            "calibrate": ["--llm-bits", "--images", "--samples"], "build": ["--stage2-layer", "--precision"]}
    for command, options in used.items():
        assert f"apet-export {command} " in text
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0
        for option in options:
            assert option in out, f"{command} {option}"
    assert (SCRIPT.parent / "bench_triton_apet.py").is_file() and "bench_triton_apet.py" in text
