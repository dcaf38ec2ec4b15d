"""Launch a compiled kernel (PTX) on a CUDA stream through the CUDA driver API (libcuda), without torch: what
the ApetScore Python plugin's enqueue does with the Triton kernel compiled by plugins/aot.py.

    stream ──cuStreamGetCtx──► context (pushed for the calls below, then popped)
    PTX ──cuModuleLoadData──► module ──cuModuleGetFunction(name)──► function      (once per context)
    cuLaunchKernel(function, grid, block, shared bytes, stream, [&arg0, &arg1, ...])

TensorRT hands the plugin its device pointers and stream as integers: they go to the kernel as they are.
The driver compiles the PTX for the device when the module loads (the driver's JIT cache keeps it).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

from apet_export.errors import EngineRunError, MissingDependencyError

SUCCESS = 0  # CUresult
COMPUTE_CAPABILITY_MAJOR, COMPUTE_CAPABILITY_MINOR = 75, 76  # CUdevice_attribute
MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute
STATIC_SHARED_LIMIT = 48 * 1024  # more dynamic shared memory than this must be asked for per function


@functools.cache
def driver():
    """The CUDA driver library, initialised."""
    try:
        library = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise MissingDependencyError(
            f"the CUDA driver library (libcuda.so.1) could not be loaded ({error}): the ApetScore plugin runs "
            f"its kernel on an NVIDIA GPU; install the NVIDIA driver, or run vision.onnx (standard ONNX ops)"
        ) from error
    check(library, library.cuInit(0), "cuInit")
    return library


def check(library, status: int, call: str) -> None:
    if status != SUCCESS:
        text = ctypes.c_char_p()
        library.cuGetErrorString(status, ctypes.byref(text))
        reason = text.value.decode() if text.value else "unknown error"
        raise EngineRunError(f"ApetScore kernel: {call} failed: {reason} (CUDA error {status})")


class _StreamContext:
    """The stream's context made current for the calls inside `with`, as it was before afterwards."""

    def __init__(self, library, stream: int):
        self.library, self.stream = library, stream
        self.context = ctypes.c_void_p()

    def __enter__(self) -> int:
        check(self.library, self.library.cuStreamGetCtx(ctypes.c_void_p(self.stream), ctypes.byref(self.context)),
              "cuStreamGetCtx")
        check(self.library, self.library.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
        return int(self.context.value or 0)

    def __exit__(self, *exc) -> None:
        popped = ctypes.c_void_p()
        self.library.cuCtxPopCurrent_v2(ctypes.byref(popped))


def compute_capability(stream: int | None = None, library=None) -> int:
    """Compute capability of the GPU the stream runs on (None: device 0), as Triton's target number (9.0 -> 90)."""
    library = library or driver()
    device = ctypes.c_int(0)
    if stream is not None:
        with _StreamContext(library, stream):
            check(library, library.cuCtxGetDevice(ctypes.byref(device)), "cuCtxGetDevice")
    major, minor = ctypes.c_int(), ctypes.c_int()
    for value, attribute in ((major, COMPUTE_CAPABILITY_MAJOR), (minor, COMPUTE_CAPABILITY_MINOR)):
        check(library, library.cuDeviceGetAttribute(ctypes.byref(value), attribute, device), "cuDeviceGetAttribute")
    return major.value * 10 + minor.value


class DriverKernel:
    """One kernel of a PTX module, loaded into each CUDA context it is launched in.

    args: the kernel's parameters in order, as ctypes values (c_uint64 for a device pointer, c_int32 ...)."""

    def __init__(self, ptx: str, name: str, shared_mem: int, library=None):
        self.ptx, self.name, self.shared_mem = ptx.encode(), name.encode(), int(shared_mem)
        self.library = library
        self.functions: dict[int, ctypes.c_void_p] = {}  # context -> function
        self.modules: list[ctypes.c_void_p] = []  # kept loaded for the process's life, as TensorRT's own are

    def _function(self, library, context: int) -> ctypes.c_void_p:
        if context not in self.functions:
            module, function = ctypes.c_void_p(), ctypes.c_void_p()
            check(library, library.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(self.ptx)), "cuModuleLoadData")
            self.modules.append(module)
            check(library, library.cuModuleGetFunction(ctypes.byref(function), module, ctypes.c_char_p(self.name)),
                  "cuModuleGetFunction")
            if self.shared_mem > STATIC_SHARED_LIMIT:
                check(library, library.cuFuncSetAttribute(function, MAX_DYNAMIC_SHARED_SIZE_BYTES, self.shared_mem),
                      "cuFuncSetAttribute")
            self.functions[context] = function
        return self.functions[context]

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], stream: int,
               args: Sequence[ctypes._SimpleCData]) -> None:
        library = self.library or driver()
        with _StreamContext(library, stream) as context:
            function = self._function(library, context)
            params = (ctypes.c_void_p * len(args))(*(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args))
            check(library, library.cuLaunchKernel(
                function, *(ctypes.c_uint(int(g)) for g in grid), *(ctypes.c_uint(int(b)) for b in block),
                ctypes.c_uint(self.shared_mem), ctypes.c_void_p(stream), params, None), "cuLaunchKernel")
