"""A stand-in for the CUDA runtime under Polygraphy's CUDA wrappers, for machines without a GPU: installed as
polygraphy.cuda's global wrapper, so Polygraphy's own DeviceArray and Stream, and through them the tensorrt
backend's GPU memory (device_memory.CudaMemory), run unchanged on "device" memory that is host memory
here. It checks what a real GPU would only corrupt silently: every copy must lie inside a live allocation,
a freed or unknown address fails, and it records every call for the tests to inspect."""

from __future__ import annotations

import ctypes
import types

import polygraphy.cuda.cuda as polygraphy_cuda
from polygraphy.exception import PolygraphyException

HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind (polygraphy.cuda.MemcpyKind holds them as c_int)


class FakeCudaRuntime:
    """The methods of polygraphy.cuda.Cuda the backend reaches (malloc, free, memcpy, streams) and the raw
    libcudart calls it makes through `.handle` (device count, compute capability, error strings)."""

    def __init__(self, devices: int = 1, capability: tuple[int, int] = (8, 9), count_status: int = 0):
        self.allocations: dict[int, ctypes.Array] = {}  # device pointer -> its memory (host memory here)
        self.malloc_sizes: list[int] = []
        self.freed: list[int] = []
        self.copies: list[dict] = []  # {kind, dst, src, nbytes, stream}
        self.streams: list[int] = []  # created
        self.destroyed: list[int] = []
        self.synchronized: list[int] = []
        self.fail_malloc = False
        self.handle = types.SimpleNamespace(
            cudaGetDeviceCount=lambda count: self._set(count, devices, count_status),
            cudaDeviceGetAttribute=lambda value, attribute, device: self._set(
                value, {75: capability[0], 76: capability[1]}[attribute], 0),
            cudaGetErrorString=lambda status: {35: b"CUDA driver version is insufficient for CUDA runtime version"}.get(status),
        )

    @staticmethod
    def _set(reference, value: int, status: int) -> int:
        reference._obj.value = value  # what libcudart writes through the int* it is given
        return status

    def malloc(self, nbytes: int) -> int:
        if self.fail_malloc:  # what Polygraphy's check() raises for cudaErrorMemoryAllocation
            raise PolygraphyException("CUDA Error: 2. To figure out what this means, refer to ...")
        memory = ctypes.create_string_buffer(nbytes)
        self.allocations[ctypes.addressof(memory)] = memory
        self.malloc_sizes.append(nbytes)
        return ctypes.addressof(memory)

    def free(self, ptr: int) -> None:
        if ptr == 0:
            return  # cudaFree(nullptr) does nothing
        assert ptr in self.allocations, f"free of {ptr:#x}, not an allocation (or freed twice)"
        del self.allocations[ptr]
        self.freed.append(ptr)

    def allocation_of(self, ptr: int, nbytes: int) -> int:
        """The live allocation holding [ptr, ptr + nbytes); AssertionError if none does."""
        for base, memory in self.allocations.items():
            if base <= ptr and ptr + nbytes <= base + len(memory):
                return base
        raise AssertionError(f"{nbytes} bytes at {ptr:#x} are not inside any live allocation")

    def memcpy(self, dst: int, src: int, nbytes, kind, stream_ptr=None) -> None:
        nbytes, kind = int(getattr(nbytes, "value", nbytes)), int(getattr(kind, "value", kind))
        assert kind in (HOST_TO_DEVICE, DEVICE_TO_HOST), kind
        self.allocation_of(dst if kind == HOST_TO_DEVICE else src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        self.copies.append({"kind": kind, "dst": dst, "src": src, "nbytes": nbytes, "stream": stream_ptr})

    def create_stream(self) -> int:
        self.streams.append(0x5000 + len(self.streams))
        return self.streams[-1]

    def stream_synchronize(self, ptr: int) -> None:
        assert ptr in self.streams and ptr not in self.destroyed, f"synchronize of stream {ptr:#x}"
        self.synchronized.append(ptr)

    def destroy_stream(self, ptr: int) -> None:
        assert ptr in self.streams and ptr not in self.destroyed, f"destroy of stream {ptr:#x}"
        self.destroyed.append(ptr)


def install(monkeypatch, runtime: FakeCudaRuntime | None = None) -> FakeCudaRuntime:
    """Make `runtime` what polygraphy.cuda.wrapper() returns for the rest of the test."""
    runtime = runtime or FakeCudaRuntime()
    monkeypatch.setattr(polygraphy_cuda, "G_CUDA", runtime)
    return runtime
