"""The memory the tensorrt backend binds to its engines: arrays and one stream, on the GPU through
Polygraphy's CUDA wrappers (polygraphy.cuda: libcudart through ctypes, no torch), or in host memory for the
stand-in engines that test the runners without a GPU. Both kinds have one interface, so the backend's code
is the same on both:

    memory = device_memory("cuda" | "cpu")
    memory.allocate(shape, dtype) -> array     uninitialised, C-contiguous
    memory.stream() -> stream                  .handle (the cudaStream_t TensorRT takes, an int), .synchronize(), .free()
    array.shape, array.dtype (numpy), array.ptr (int address), array.nbytes
    array.view(shape, offset=0) -> array       `shape` elements from element `offset` on, sharing the memory
                                               (a KV-cache window, a reused buffer)
    array.copy_from(host, stream)              a host numpy array of the same dtype and size, enqueued on stream
    array.to_host(stream) -> numpy             enqueued on stream, then waits for the stream (and what ran before)

A GPU allocation is freed when the last array viewing it is garbage collected (as torch tensors were); none
is freed at interpreter exit, where the process's CUDA context goes anyway.

BufferPool keeps one allocation per name that grows when a larger shape is asked for, so steps of a decoder
reuse their feed and output buffers instead of allocating every step (cudaFree synchronises the device).
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from apet_export.errors import DeviceError

# -- host memory (the stand-in engines) -------------------------------------------------------------


class HostStream:
    """Where no GPU is: handle 0 (what the stand-in engines receive) and nothing to wait for."""

    handle = 0

    def synchronize(self) -> None:
        pass

    def free(self) -> None:
        pass


class HostArray:
    """An array in host memory at a raw address (ptr = the numpy buffer's address)."""

    def __init__(self, data: np.ndarray):
        self.data = data  # C-contiguous

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def ptr(self) -> int:
        return self.data.ctypes.data

    def view(self, shape: tuple[int, ...], offset: int = 0) -> HostArray:
        flat = self.data.reshape(-1)
        check_window(flat.size, shape, offset)
        return HostArray(flat[offset : offset + math.prod(shape)].reshape(shape))

    def copy_from(self, host: np.ndarray, stream) -> None:
        check_host_array(self, host)
        self.data[...] = host

    def to_host(self, stream) -> np.ndarray:
        host = self.data.copy()
        stream.synchronize()
        return host


class HostMemory:
    def allocate(self, shape: tuple[int, ...], dtype) -> HostArray:
        return HostArray(np.empty(shape, dtype))

    def stream(self) -> HostStream:
        return HostStream()


# -- GPU memory through polygraphy.cuda -------------------------------------------------------------


class CudaStream:
    """A CUDA stream of its own (cudaStreamCreate through Polygraphy), destroyed by free()."""

    def __init__(self):
        from polygraphy import cuda

        self.stream = cuda.Stream()
        self.handle = self.stream.ptr

    def synchronize(self) -> None:
        self.stream.synchronize()

    def free(self) -> None:
        if self.stream is not None:
            self.stream.free()
            self.stream, self.handle = None, 0


class CudaAllocation:
    """nbytes of GPU memory (cudaMalloc through Polygraphy's wrapper), freed (cudaFree, by the runtime that
    allocated it) when this object is garbage collected: every CudaArray viewing it holds it."""

    def __init__(self, nbytes: int):
        from polygraphy import cuda
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER

        runtime = cuda.wrapper()
        try:
            with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):  # it would print the error before our one line
                self.ptr = runtime.malloc(nbytes)
        except PolygraphyException as error:
            raise DeviceError(
                f"could not allocate {nbytes / 2**20:.1f} MiB of GPU memory ({error}): free GPU memory (other "
                f"processes), or rebuild the engines with a smaller --max-context / --max-batch"
            ) from None
        self.nbytes = nbytes
        finalizer = weakref.finalize(self, runtime.free, self.ptr)  # holds the runtime and the address, not self
        finalizer.atexit = False


class CudaArray:
    """shape elements of dtype at byte `start` of a CudaAllocation."""

    def __init__(self, allocation: CudaAllocation, start: int, shape: tuple[int, ...], dtype):
        self.allocation, self.start = allocation, start
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ptr(self) -> int:
        return self.allocation.ptr + self.start

    def view(self, shape: tuple[int, ...], offset: int = 0) -> CudaArray:
        check_window((self.allocation.nbytes - self.start) // self.dtype.itemsize, shape, offset)
        return CudaArray(self.allocation, self.start + offset * self.dtype.itemsize, shape, self.dtype)

    def copy_from(self, host: np.ndarray, stream: CudaStream) -> None:
        from polygraphy import cuda

        check_host_array(self, host)
        # pageable host memory: the copy is staged before cudaMemcpyAsync returns, so `host` may go after it
        cuda.wrapper().memcpy(self.ptr, host.ctypes.data, self.nbytes, cuda.MemcpyKind.HostToDevice, stream.handle)

    def to_host(self, stream: CudaStream) -> np.ndarray:
        from polygraphy import cuda

        host = np.empty(self.shape, self.dtype)
        cuda.wrapper().memcpy(host.ctypes.data, self.ptr, self.nbytes, cuda.MemcpyKind.DeviceToHost, stream.handle)
        stream.synchronize()
        return host


class CudaMemory:
    def allocate(self, shape: tuple[int, ...], dtype) -> CudaArray:
        dtype = np.dtype(dtype)
        return CudaArray(CudaAllocation(math.prod(shape) * dtype.itemsize), 0, shape, dtype)

    def stream(self) -> CudaStream:
        return CudaStream()


def device_memory(device: str) -> HostMemory | CudaMemory:
    """"cuda": the GPU (the backend checks first that there is one); "cpu": host memory, for stand-in engines."""
    return CudaMemory() if device == "cuda" else HostMemory()


# -- shared by both kinds ---------------------------------------------------------------------------


def check_window(size: int, shape: tuple[int, ...], offset: int) -> None:
    """A view must lie inside the array it views (a wrong offset would let TensorRT write past it)."""
    if offset < 0 or offset + math.prod(shape) > size:
        raise ValueError(f"a view of {list(shape)} at element {offset} exceeds an array of {size} elements")


def check_host_array(array, host: np.ndarray) -> None:
    if host.dtype != array.dtype or host.shape != array.shape or not host.flags.c_contiguous:
        raise ValueError(
            f"host array {host.dtype}{list(host.shape)} does not match device array {array.dtype}{list(array.shape)} "
            f"(or is not C-contiguous)"
        )


class BufferPool:
    """Buffers by name: buffer(name, shape, dtype) is a view of the name's allocation, which is replaced only
    when the shape needs more, by one at least twice as large (attention_mask [B, P+S] grows by a column
    every decode step). The runners wait for every call, so no work still uses the old memory then."""

    def __init__(self, memory: HostMemory | CudaMemory):
        self.memory = memory
        self.arrays: dict[str, HostArray | CudaArray] = {}  # name -> flat array

    def buffer(self, name: str, shape: tuple[int, ...], dtype) -> HostArray | CudaArray:
        dtype, size = np.dtype(dtype), math.prod(shape)
        current = self.arrays.get(name)
        if current is None or current.dtype != dtype:
            current = self.arrays[name] = self.memory.allocate((max(size, 1),), dtype)
        elif current.shape[0] < size:
            current = self.arrays[name] = self.memory.allocate((max(size, 2 * current.shape[0]),), dtype)
        return current.view(shape)

    def upload(self, name: str, host: np.ndarray, dtype, stream) -> HostArray | CudaArray:
        """A host array converted to `dtype` (the engine tensor's) and copied into the name's buffer."""
        host = np.require(host, dtype=dtype, requirements="C")  # ascontiguousarray would make a 0-d value 1-d
        array = self.buffer(name, host.shape, dtype)
        array.copy_from(host, stream)
        return array

    def clear(self) -> None:
        self.arrays.clear()
