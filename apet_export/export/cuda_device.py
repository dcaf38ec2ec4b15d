"""Which CUDA GPU this machine has, asked of the CUDA runtime through Polygraphy's wrapper of libcudart
(no torch): the compute capability of device 0 as a TensorRT target name ("sm90"), or why there is none.
What `apet-export engine --target current` builds for and what the tensorrt backend loads engines for.

    probe_gpu() -> ("sm90", None)
                 | (None, "the CUDA runtime library (libcudart) could not be loaded: ...")
                 | (None, "cudaGetDeviceCount failed: CUDA driver version is insufficient ... (CUDA error 35)")
                 | (None, "the CUDA runtime sees no device")
    gpu_target() -> "sm90" | None
"""

from __future__ import annotations

import ctypes

# cudaDeviceAttr values (cuda_runtime_api.h), stable across CUDA versions
COMPUTE_CAPABILITY_MAJOR, COMPUTE_CAPABILITY_MINOR = 75, 76


def probe_gpu() -> tuple[str | None, str | None]:
    """(target of device 0, None), or (None, why there is no usable GPU)."""
    from polygraphy import cuda
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):  # its search notes would print before our one error line
            runtime = cuda.wrapper()
    except (OSError, PolygraphyException) as error:
        return None, f"the CUDA runtime library (libcudart) could not be loaded: {error}"
    count = ctypes.c_int(0)
    status = runtime.handle.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0:  # no driver, a driver older than the runtime, no device
        return None, f"cudaGetDeviceCount failed: {_error_string(runtime, status)}"
    if count.value < 1:
        return None, "the CUDA runtime sees no device"
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    for value, attribute in ((major, COMPUTE_CAPABILITY_MAJOR), (minor, COMPUTE_CAPABILITY_MINOR)):
        status = runtime.handle.cudaDeviceGetAttribute(ctypes.byref(value), attribute, 0)
        if status != 0:
            return None, f"cudaDeviceGetAttribute failed: {_error_string(runtime, status)}"
    return f"sm{major.value}{minor.value}", None


def _error_string(runtime, status: int) -> str:
    runtime.handle.cudaGetErrorString.restype = ctypes.c_char_p
    text = runtime.handle.cudaGetErrorString(status)
    return f"{text.decode() if text else 'unknown error'} (CUDA error {status})"


def gpu_target() -> str | None:
    """'sm90' for this machine's first CUDA GPU, None without a usable one."""
    return probe_gpu()[0]
