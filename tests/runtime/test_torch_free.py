"""A build runs on onnxruntime where torch and transformers cannot be imported (a lean install without the
export extra): `apet-export run`, Pipeline and `bench` in processes whose import system refuses torch,
torchvision and transformers (torch_blocked/sitecustomize.py, inherited by child processes), with the same
tokens and text as the torch-allowed reference (the torch backend: eager model, transformers processor).

The tensorrt backend needs neither either: its runners run their stand-in engine tests (host memory, and
its GPU memory layer over a stand-in CUDA runtime) in such a process, and without a GPU `run --backend
tensorrt` fails with the no-GPU error, not an import error. On a GPU, scripts/gpu_end_to_end.sh runs
`apet-export run --backend tensorrt` with torch blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apet_export.export.cuda_device import gpu_target
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline

BLOCKER = Path(__file__).parent / "torch_blocked"
PROMPT = "Describe the image. </s> <|im_end|> <image>"  # typed control tokens stay text on both paths
TOKENS = 8


def blocked_env() -> dict[str, str]:
    """This environment with the import blocker first on PYTHONPATH (every Python process started with it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BLOCKER), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_blocked(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=blocked_env(), capture_output=True, text=True, timeout=timeout)


def attempted_imports(stderr: str) -> list[str]:
    """The blocked imports the process tried (an import the product made, caught or not)."""
    return [line for line in stderr.splitlines() if line.startswith("blocked: ")]


def reference(build: Path) -> dict:
    """The torch-allowed run of the same request: the torch backend (eager model, transformers processor)."""
    with Pipeline.from_dir(build, backend="torch") as pipeline:
        result = pipeline.answer([synthetic_image(0)], PROMPT, max_new_tokens=TOKENS, stream=False)
    return {"token_ids": result.token_ids, "text": result.text}


def test_the_blocker_blocks():
    done = run_blocked(["-c", "import torch"])
    assert done.returncode == 1 and "blocked by the test" in done.stderr


@pytest.mark.parametrize("fixture", ["llava_build", "qwen_build", "llava_next_build"])
def test_cli_run_without_torch_equals_the_reference(request, fixture):
    build = request.getfixturevalue(fixture)
    done = run_blocked(["-m", "apet_export.cli", "run", str(build), "--prompt", PROMPT,
                        "--max-new-tokens", str(TOKENS), "--json"])
    assert done.returncode == 0, done.stderr
    assert attempted_imports(done.stderr) == []
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["event"] == "summary" and summary["generated_tokens"] > 0
    assert {k: summary[k] for k in ("token_ids", "text")} == reference(build)


PIPELINE_SCRIPT = """
import json, sys
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline

results = {}
for build in sys.argv[1:]:
    with Pipeline.from_dir(build) as pipeline:
        result = pipeline.answer([synthetic_image(0)], PROMPT, max_new_tokens=TOKENS, stream=False)
    results[build] = {"token_ids": result.token_ids, "text": result.text}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "transformers"))
print(json.dumps({"results": results, "loaded": loaded}))
"""


def test_pipeline_without_torch_equals_the_reference_for_every_family(
    llava_build, qwen_build, llava_next_build, video_llava_build, llava_two_stage_build
):
    builds = [llava_build, qwen_build, llava_next_build, video_llava_build, llava_two_stage_build]
    script = f"PROMPT, TOKENS = {PROMPT!r}, {TOKENS}\n" + PIPELINE_SCRIPT
    done = run_blocked(["-c", script, *map(str, builds)])
    assert done.returncode == 0, done.stderr
    assert attempted_imports(done.stderr) == []
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["loaded"] == []
    for build in builds:
        assert out["results"][str(build)] == reference(build), build.name


def test_bench_without_torch(llava_build, tmp_path):
    """bench on onnxruntime (its per-budget peak-memory workers are spawned processes: blocked too); the
    TensorRT column says why it is skipped instead of failing on the missing torch."""
    rows_file = tmp_path / "rows.json"
    done = run_blocked(["-m", "apet_export.cli", "bench", str(llava_build), "--budgets", "64", "--runs", "1",
                        "--max-new-tokens", "2", "--json-out", str(rows_file)])
    assert done.returncode == 0, done.stderr
    assert attempted_imports(done.stderr) == []  # the TensorRT check asks the CUDA runtime, not torch
    assert "tensorrt: skipped (no CUDA GPU: " in done.stdout.replace("\n", " ")
    rows = json.loads(rows_file.read_text())
    assert [row["budget"] for row in rows] == [576, 64]
    assert all(row["peak_rss_mib"] and row["prefill_ms"] > 0 for row in rows)


def test_tensorrt_backend_runners_without_torch():
    """The tensorrt backend's stand-in engine tests (vision, decoder steps on the bound KV cache, the two-stage
    backend, runtime cache; on host memory and on the GPU memory layer) and its memory tests, run by pytest in
    a process where torch and transformers cannot be imported (-s: an attempt, even caught, shows on stderr;
    no conftest: the shared fixtures build with torch)."""
    tests = [str(Path(__file__).parent / name) for name in ("test_trt_backend.py", "test_device_memory.py")]
    done = run_blocked(["-m", "pytest", "-q", "-s", "--noconftest", "-p", "no:cacheprovider", *tests])
    assert done.returncode == 0, done.stdout + done.stderr
    assert attempted_imports(done.stderr) == []
    passed = done.stdout.strip().splitlines()[-1]
    assert " passed" in passed and "skipped" not in passed and "deselected" not in passed, passed


@pytest.mark.skipif(gpu_target() is not None, reason="checks the error a machine without a GPU gives")
def test_tensorrt_run_without_torch_and_gpu_is_the_device_error(llava_build):
    done = run_blocked(["-m", "apet_export.cli", "run", str(llava_build), "--prompt", "hi", "--backend", "tensorrt"])
    assert done.returncode == 1
    assert attempted_imports(done.stderr) == []
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the tensorrt backend needs a CUDA GPU and finds none ("), done.stderr
    assert "or use --backend onnxruntime" in lines[0]


@pytest.mark.parametrize(("args", "extra"), [
    (["build", "--model", "tiny-llava", "--out", "{tmp}/out"], "export"),
    (["parity", "{build}"], "export"),
    (["run", "{build}", "--prompt", "hi", "--backend", "torch"], "export"),
    (["run", "{build}", "--prompt", "hi", "--vision-graph", "plugin"], "plugin-reference"),  # a torch kernel
])
def test_commands_that_need_torch_name_the_extra_in_one_line(llava_build, tmp_path, args, extra):
    args = [a.format(tmp=tmp_path, build=llava_build) for a in args]
    done = run_blocked(["-m", "apet_export.cli", *args])
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if not line.startswith("blocked: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"apet-export[{extra}]" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_server_app_imports_without_torch():
    pytest.importorskip("ray.serve")
    done = run_blocked(["-c", "import apet_export.serve.app, apet_export.serve.launcher, sys; "
                              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
