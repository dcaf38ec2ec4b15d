"""The ApetScore plugin's enqueue without torch: the Triton kernel's PTX launched through the CUDA driver API
(plugins/cuda_launch.py, trt_plugin.launch_from_pointers), down to the driver's C functions.

No GPU here: a stand-in libcuda records what the driver would get. It reads each launch's parameters by the
loaded PTX's own entry signature (.u64 / .u32 sizes), so a parameter list that does not match the kernel
Triton compiled fails here. The enqueue runs with torch unimportable (sys.modules["torch"] = None). Not
verified: the driver running the PTX (scripts/gpu_end_to_end.sh on a GPU)."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from apet_export.errors import EngineRunError, InvalidInputError
from apet_export.plugins import cuda_launch

LAUNCH_FAILED = 700  # CUDA_ERROR_ILLEGAL_ADDRESS
PTX_TYPES = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32}


def entry_parameters(ptx: str, name: str) -> list[type]:
    header = ptx[ptx.index(f".entry {name}("):]
    return [PTX_TYPES[t] for t in re.findall(r"\.param \.(u64|u32)", header[: header.index(")")])]


class FakeLibcuda:
    """The driver functions cuda_launch calls, writing results through the pointers they get, as libcuda does."""

    def __init__(self, capability=(8, 9), launch_status=0):
        self.capability, self.launch_status = capability, launch_status
        self.current: list[int] = []  # the context stack
        self.modules: dict[int, bytes] = {}  # handle -> PTX
        self.functions: dict[int, tuple[int, str]] = {}  # handle -> (module, entry)
        self.attributes: list[tuple] = []
        self.launches: list[dict] = []
        self.cuGetErrorString = self._error_string

    @staticmethod
    def _value(argument) -> int:
        return int(getattr(argument, "value", argument) or 0)

    def cuInit(self, flags):
        return 0

    def cuStreamGetCtx(self, stream, context):
        context._obj.value = 0xC000 + self._value(stream) % 2  # streams of two contexts
        return 0

    def cuCtxPushCurrent_v2(self, context):
        self.current.append(self._value(context))
        return 0

    def cuCtxPopCurrent_v2(self, context):
        context._obj.value = self.current.pop()
        return 0

    def cuCtxGetDevice(self, device):
        assert self.current, "no current context"
        device._obj.value = 0
        return 0

    def cuDeviceGetAttribute(self, value, attribute, device):
        value._obj.value = {75: self.capability[0], 76: self.capability[1]}[attribute]
        return 0

    def cuModuleLoadData(self, module, image):
        assert self.current, "no current context"
        handle = 0x1000 + len(self.modules)
        self.modules[handle] = image.value
        module._obj.value = handle
        return 0

    def cuModuleGetFunction(self, function, module, name):
        ptx = self.modules[self._value(module)].decode()
        assert f".entry {name.value.decode()}(" in ptx
        handle = 0x2000 + len(self.functions)
        self.functions[handle] = (self._value(module), name.value.decode())
        function._obj.value = handle
        return 0

    def cuFuncSetAttribute(self, function, attribute, value):
        self.attributes.append((self._value(function), attribute, value))
        return 0

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        module, name = self.functions[self._value(function)]
        kinds = entry_parameters(self.modules[module].decode(), name)
        values = [ctypes.cast(params[i], ctypes.POINTER(kind)).contents.value for i, kind in enumerate(kinds)]
        self.launches.append({
            "context": self.current[-1], "entry": name, "grid": tuple(map(self._value, (gx, gy, gz))),
            "block": tuple(map(self._value, (bx, by, bz))), "shared": self._value(shared),
            "stream": self._value(stream), "args": values, "extra": extra,
        })
        return self.launch_status

    def _error_string(self, status, text):
        text._obj.value = b"an illegal memory access was encountered" if status == LAUNCH_FAILED else None
        return 0


SMALL_PTX = """
.version 8.0
.target sm_89
.visible .entry tiny(
\t.param .u64 .ptr .global .align 1 tiny_param_0,
\t.param .u32 tiny_param_1,
\t.param .u64 .ptr .global .align 1 tiny_param_2
)
{ ret; }
"""


def test_a_launch_passes_its_parameters_in_the_streams_context():
    driver = FakeLibcuda()
    kernel = cuda_launch.DriverKernel(SMALL_PTX, "tiny", shared_mem=1024, library=driver)
    args = [ctypes.c_uint64(0xDEAD0000), ctypes.c_int32(-1), ctypes.c_uint64(0xBEEF0000)]

    kernel.launch((3, 1, 1), (128, 1, 1), 0x5002, args)
    kernel.launch((3, 1, 1), (128, 1, 1), 0x5002, args)
    kernel.launch((1, 1, 1), (128, 1, 1), 0x5001, args)  # a stream of another context

    first = driver.launches[0]
    assert first["args"] == [0xDEAD0000, 2**32 - 1, 0xBEEF0000]  # -1 as the kernel's 32 bits
    assert (first["grid"], first["block"], first["shared"], first["stream"]) == ((3, 1, 1), (128, 1, 1), 1024, 0x5002)
    assert first["extra"] is None
    assert [launch["context"] for launch in driver.launches] == [0xC000, 0xC000, 0xC001]
    assert len(driver.modules) == 2  # loaded once per context
    assert driver.current == [] and driver.attributes == []  # every push popped; 1 KiB needs no opt-in


def test_shared_memory_over_48_kib_is_asked_for():
    driver = FakeLibcuda()
    kernel = cuda_launch.DriverKernel(SMALL_PTX, "tiny", shared_mem=64 * 1024, library=driver)
    kernel.launch((1, 1, 1), (32, 1, 1), 0, [ctypes.c_uint64(1), ctypes.c_int32(2), ctypes.c_uint64(3)])
    assert driver.attributes == [(0x2000, cuda_launch.MAX_DYNAMIC_SHARED_SIZE_BYTES, 64 * 1024)]


def test_a_failed_launch_is_a_typed_error_naming_the_call_and_the_drivers_reason():
    driver = FakeLibcuda(launch_status=LAUNCH_FAILED)
    kernel = cuda_launch.DriverKernel(SMALL_PTX, "tiny", shared_mem=0, library=driver)
    with pytest.raises(EngineRunError, match=r"cuLaunchKernel failed: an illegal memory access .*CUDA error 700"):
        kernel.launch((1, 1, 1), (32, 1, 1), 0, [ctypes.c_uint64(1), ctypes.c_int32(2), ctypes.c_uint64(3)])
    assert driver.current == []  # popped on the way out


def test_compute_capability_of_the_streams_device_or_device_0():
    driver = FakeLibcuda(capability=(9, 0))
    assert cuda_launch.compute_capability(0x5000, driver) == 90
    assert cuda_launch.compute_capability(None, driver) == 90 and driver.current == []


# -- the plugin's enqueue, with the PTX Triton really compiles ---------------------------------------------

# The test session runs Triton in interpreter mode (tests/conftest.py); compiling needs a fresh process. The
# arguments are test_aot.py's, so that the second compile is a hit in Triton's cache.
COMPILE = """
import dataclasses, json
from apet_export.plugins.aot import compile_ptx
print(json.dumps(dataclasses.asdict(compile_ptx(89, num_basis=10, ridge=1e-5, dtype="fp16"))))
"""


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton", reason="Triton is the `triton` extra (pip install -e '.[triton]')")
    from apet_export.plugins.aot import CompiledKernel

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return CompiledKernel(**json.loads(result.stdout.strip().splitlines()[-1]))


def test_enqueue_launches_the_compiled_kernel_without_torch(compiled, monkeypatch):
    from apet_export.plugins import aot, trt_plugin

    driver = FakeLibcuda(capability=(8, 9))
    monkeypatch.setattr(cuda_launch, "driver", lambda: driver)
    compiles = []

    def compile_ptx(target_sm, num_basis, ridge, dtype):
        compiles.append((target_sm, num_basis, ridge, dtype))
        return compiled

    monkeypatch.setattr(aot, "compile_ptx", compile_ptx)
    trt_plugin.compiled_kernel.cache_clear()
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` on the way fails
    trt = SimpleNamespace(DataType=SimpleNamespace(FLOAT="float", HALF="half"))
    x_desc = SimpleNamespace(dims=(2, 577, 1024), type=trt.DataType.HALF)

    for _ in range(2):
        trt_plugin.launch_from_pointers(trt, x_desc, 0x7000_0000, 0x7100_0000, 0x7200_0000, 0x5000,
                                        num_basis=10, ridge=1e-5, fps_start=-1)
    trt_plugin.compiled_kernel.cache_clear()

    assert compiles == [(89, 10, 1e-5, "fp16")]  # compiled once, for the stream's GPU and x's type
    launch = driver.launches[0]
    print(f"\nreal PTX entry {launch['entry']}: {len(launch['args'])} parameters {launch['args']}")
    assert launch["entry"] == compiled.name == "apet_score_kernel"
    # x, N, D, fps_start (-1 as 32 bits), scores, basis_index, then Triton's scratch pointers (NULL)
    assert launch["args"] == [0x7000_0000, 577, 1024, 2**32 - 1, 0x7100_0000, 0x7200_0000] + [0] * compiled.scratch_params
    assert launch["grid"] == (2, 1, 1) and launch["block"] == (compiled.num_warps * 32, 1, 1)
    assert launch["shared"] == compiled.shared_mem and launch["stream"] == 0x5000
    assert len(driver.launches) == 2 and len(driver.modules) == 1

    with pytest.raises(InvalidInputError, match="fps_start=577 is not a token index"):
        trt_plugin.launch_from_pointers(trt, x_desc, 1, 2, 3, 0x5000, num_basis=10, ridge=1e-5, fps_start=577)
    assert len(driver.launches) == 2
