"""The ApetScore kernel compiled ahead of time to PTX for SM89, on a machine without a GPU.

What this verifies: Triton lowers the kernel for GPUTarget("cuda", 89, 32) and ptxas accepts it; the PTX
targets sm_89 and exports the entry point TensorRT's AOT plugin launches. Not verified here: running the
PTX (no GPU) and the tensorrt.plugin wiring (TensorRT-RTX has no tensorrt.plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apet_export.errors import InvalidInputError, MissingDependencyError

pytest.importorskip("triton", reason="Triton is the `triton` extra (pip install -e '.[triton]')")

# The test session runs Triton in interpreter mode (tests/conftest.py); compiling needs a fresh process.
COMPILE = """
import json
from apet_export.plugins.aot import compile_ptx
kernel = compile_ptx(89, num_basis=10, ridge=1e-5, dtype="fp16")
print(json.dumps({"name": kernel.name, "ptx": kernel.ptx, "num_warps": kernel.num_warps, "shared": kernel.shared_mem}))
"""


def test_compile_ptx_for_sm89_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kernel = json.loads(result.stdout.strip().splitlines()[-1])
    ptx = kernel["ptx"]
    print(f"\nPTX for sm_89: {len(ptx) / 1e3:.0f} kB, entry {kernel['name']}, {kernel['num_warps']} warps, "
          f"{kernel['shared']} B shared")
    assert ".target sm_89" in ptx
    assert f".visible .entry {kernel['name']}(" in ptx and kernel["name"] == "apet_score_kernel"
    assert kernel["num_warps"] == 4 and kernel["shared"] > 0


def test_compile_refuses_the_interpreter_and_bad_arguments():
    from apet_export.plugins.aot import compile_ptx, kernel_signature

    with pytest.raises(InvalidInputError, match="fp32 or fp16"):
        kernel_signature("bf16")
    with pytest.raises(InvalidInputError, match="num_basis=40"):
        compile_ptx(89, num_basis=40, ridge=1e-5)
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(InvalidInputError, match="TRITON_INTERPRET"):
            compile_ptx(89, num_basis=10, ridge=1e-5)


def test_aot_registration_names_the_missing_tensorrt_plugin_module():
    from apet_export.plugins.aot import _tensorrt_plugin_module

    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="TensorRT >= 10.6"):
            _tensorrt_plugin_module()
    else:  # a real TensorRT: the module must offer aot_impl or say so
        assert _tensorrt_plugin_module() is not None
