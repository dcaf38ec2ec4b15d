"""A stand-in for libcudart under Polygraphy's CUDA wrapper, for machines without a GPU: Polygraphy's own
Cuda object (malloc, free, memcpy, streams, its status checks) with its `handle` (the ctypes library) replaced
by these functions, installed as polygraphy.cuda's global wrapper. So Polygraphy's DeviceArray / Stream /
memcpy, and through them the tensorrt backend's GPU memory (device_memory.CudaMemory) and GPU probe
(cuda_device.py), run unchanged down to the C calls, on "device" memory that is host memory here.

It checks what a real GPU would only corrupt silently: every copy must lie inside a live allocation, a
freed or unknown address fails, and it records every call for the tests to inspect."""

from __future__ import annotations

import ctypes

import polygraphy.cuda.cuda as polygraphy_cuda

HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind
SUCCESS, MEMORY_ALLOCATION, INSUFFICIENT_DRIVER = 0, 2, 35  # cudaError_t
ERROR_STRINGS = {INSUFFICIENT_DRIVER: b"CUDA driver version is insufficient for CUDA runtime version"}


def _int(value) -> int:
    """A ctypes argument (c_void_p, c_size_t, c_int) or a plain int, as Polygraphy passes them."""
    value = getattr(value, "value", value)
    return int(value or 0)


class FakeLibcudart:
    """The libcudart functions Polygraphy's wrapper and the GPU probe call, each returning a cudaError_t
    and writing its results through the pointers it is given, as the C library does."""

    def __init__(self, devices: int = 1, capability: tuple[int, int] = (8, 9), count_status: int = SUCCESS):
        self.devices, self.capability, self.count_status = devices, capability, count_status
        self.allocations: dict[int, ctypes.Array] = {}  # device pointer -> its memory (host memory here)
        self.malloc_sizes: list[int] = []
        self.freed: list[int] = []
        self.copies: list[dict] = []  # {kind, dst, src, nbytes, stream}
        self.streams: list[int] = []  # created
        self.destroyed: list[int] = []
        self.synchronized: list[int] = []
        self.fail_malloc = False
        self.cudaGetErrorString = ErrorString()

    # -- memory
    def cudaMalloc(self, pointer, nbytes) -> int:
        if self.fail_malloc:
            return MEMORY_ALLOCATION
        memory = ctypes.create_string_buffer(_int(nbytes))
        address = ctypes.addressof(memory)
        self.allocations[address] = memory
        self.malloc_sizes.append(_int(nbytes))
        pointer._obj.value = address  # the void** the caller passed by reference
        return SUCCESS

    def cudaFree(self, pointer) -> int:
        address = _int(pointer)
        if address == 0:
            return SUCCESS  # cudaFree(nullptr) does nothing
        assert address in self.allocations, f"free of {address:#x}, not an allocation (or freed twice)"
        del self.allocations[address]
        self.freed.append(address)
        return SUCCESS

    def allocation_of(self, address: int, nbytes: int) -> int:
        """The live allocation holding [address, address + nbytes); AssertionError if none does."""
        for base, memory in self.allocations.items():
            if base <= address and address + nbytes <= base + len(memory):
                return base
        raise AssertionError(f"{nbytes} bytes at {address:#x} are not inside any live allocation")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream) -> int:
        dst, src, nbytes, kind = _int(dst), _int(src), _int(nbytes), _int(kind)
        assert kind in (HOST_TO_DEVICE, DEVICE_TO_HOST), kind
        self.allocation_of(dst if kind == HOST_TO_DEVICE else src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        self.copies.append({"kind": kind, "dst": dst, "src": src, "nbytes": nbytes, "stream": _int(stream)})
        return SUCCESS

    # -- streams
    def cudaStreamCreate(self, pointer) -> int:
        self.streams.append(0x5000 + len(self.streams))
        pointer._obj.value = self.streams[-1]
        return SUCCESS

    def cudaStreamSynchronize(self, stream) -> int:
        stream = _int(stream)
        assert stream == 0 or (stream in self.streams and stream not in self.destroyed), f"synchronize of {stream:#x}"
        self.synchronized.append(stream)
        return SUCCESS

    def cudaStreamDestroy(self, stream) -> int:
        stream = _int(stream)
        assert stream in self.streams and stream not in self.destroyed, f"destroy of stream {stream:#x}"
        self.destroyed.append(stream)
        return SUCCESS

    # -- devices
    def cudaGetDeviceCount(self, count) -> int:
        if self.count_status == SUCCESS:
            count._obj.value = self.devices
        return self.count_status

    def cudaDeviceGetAttribute(self, value, attribute, device) -> int:
        value._obj.value = {75: self.capability[0], 76: self.capability[1]}[attribute]
        return SUCCESS


class ErrorString:
    """cudaGetErrorString as a ctypes function object: callers set its restype (a method would refuse)."""

    restype = ctypes.c_int

    def __call__(self, status):
        return ERROR_STRINGS.get(_int(status))


def install(monkeypatch, library: FakeLibcudart | None = None) -> FakeLibcudart:
    """Make polygraphy.cuda.wrapper() a real Polygraphy Cuda wrapper around `library` for the rest of the test."""
    library = library or FakeLibcudart()
    runtime = object.__new__(polygraphy_cuda.Cuda)  # without __init__, which would load the real libcudart
    runtime.handle = library
    monkeypatch.setattr(polygraphy_cuda, "G_CUDA", runtime)
    return library
