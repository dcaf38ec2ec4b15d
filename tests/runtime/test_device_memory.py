"""The tensorrt backend's memory layer and GPU probe without a GPU: the GPU kind (device_memory.CudaMemory,
cuda_device.probe_gpu) through Polygraphy's own CUDA wrapper over a stand-in libcudart (fake_cuda.py),
checking the addresses, sizes, kinds and streams of what reaches the C library; the host kind against numpy."""

from __future__ import annotations

import gc
import re

import numpy as np
import polygraphy.cuda.cuda as polygraphy_cuda
import pytest

from apet_export.errors import DeviceError, EngineInputError
from apet_export.export.cuda_device import gpu_target, probe_gpu
from apet_export.runtime.backends import trt as trt_backend
from apet_export.runtime.backends.device_memory import (
    BufferPool,
    CudaMemory,
    HostMemory,
    HostStream,
    device_memory,
)
from apet_export.runtime.backends.trt import DeviceKVCache
from tests.runtime import fake_cuda


@pytest.fixture
def cuda(monkeypatch) -> fake_cuda.FakeLibcudart:
    return fake_cuda.install(monkeypatch)


def test_gpu_arrays_allocate_view_and_copy_at_the_right_addresses(cuda):
    memory = device_memory("cuda")
    assert isinstance(memory, CudaMemory)
    stream = memory.stream()
    assert stream.handle == cuda.streams[0]
    array = memory.allocate((3, 2, 8), np.float16)
    base = array.ptr
    assert cuda.malloc_sizes == [3 * 2 * 8 * 2] and base in cuda.allocations
    assert (array.shape, array.dtype, array.nbytes) == ((3, 2, 8), np.float16, 96)

    window = array.view((2, 4), offset=20)  # elements 20..27
    assert window.ptr == base + 20 * 2 and window.shape == (2, 4) and window.dtype == np.float16
    values = np.arange(8, dtype=np.float16).reshape(2, 4)
    window.copy_from(values, stream)
    up = cuda.copies[-1]
    assert up == {"kind": fake_cuda.HOST_TO_DEVICE, "dst": base + 40, "src": values.ctypes.data, "nbytes": 16,
                  "stream": stream.handle}
    inner = window.view((3,), offset=1)  # a view of a view: offsets add up
    assert inner.ptr == base + 42
    np.testing.assert_array_equal(inner.to_host(stream), [1, 2, 3])
    down = cuda.copies[-1]
    assert (down["kind"], down["src"], down["nbytes"], down["stream"]) == (fake_cuda.DEVICE_TO_HOST, base + 42, 6, stream.handle)
    assert cuda.synchronized == [stream.handle]  # to_host waited for the stream after its copy
    whole = array.to_host(stream).reshape(-1)
    np.testing.assert_array_equal(whole[20:28], np.arange(8))

    with pytest.raises(ValueError, match=r"a view of \[2, 4\] at element 41 exceeds an array of 48 elements"):
        array.view((2, 4), offset=41)
    with pytest.raises(ValueError, match="does not match device array"):
        window.copy_from(values.astype(np.float32), stream)  # the caller converts: no silent reinterpretation
    with pytest.raises(ValueError, match="does not match device array"):
        window.copy_from(np.zeros((4, 2), np.float16).T, stream)  # not C-contiguous

    stream.free()
    stream.free()  # once only
    assert cuda.destroyed == cuda.streams


def test_gpu_memory_is_freed_when_its_last_view_goes(cuda):
    array = CudaMemory().allocate((4,), np.int64)
    base = array.ptr
    view = array.view((2,), offset=2)
    del array
    gc.collect()
    assert cuda.freed == [] and view.ptr == base + 16  # the view keeps the allocation
    del view
    gc.collect()
    assert cuda.freed == [base] and cuda.allocations == {}


def test_a_failed_gpu_allocation_is_a_device_error(cuda, capsys):
    cuda.fail_malloc = True
    with pytest.raises(DeviceError, match=r"could not allocate 2\.0 MiB of GPU memory .*CUDA Error: 2.*smaller --max-context"):
        CudaMemory().allocate((512, 1024), np.float32)
    assert capsys.readouterr() == ("", "")  # Polygraphy's own report of it stays quiet: the CLI prints one line


def test_host_arrays_have_the_same_interface():
    memory = device_memory("cpu")
    assert isinstance(memory, HostMemory) and memory.stream().handle == 0
    array = memory.allocate((3, 2, 8), np.float16)
    window = array.view((2, 4), offset=20)
    assert window.ptr == array.ptr + 40
    window.copy_from(np.arange(8, dtype=np.float16).reshape(2, 4), HostStream())
    np.testing.assert_array_equal(array.to_host(HostStream()).reshape(-1)[20:28], np.arange(8))
    with pytest.raises(ValueError, match="exceeds an array of 48 elements"):
        array.view((2, 4), offset=41)


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_buffer_pool_reuses_and_grows(kind, monkeypatch):
    if kind == "cuda":
        fake_cuda.install(monkeypatch)
    pool = BufferPool(device_memory(kind))
    first = pool.buffer("attention_mask", (1, 5), np.int64)
    assert pool.buffer("attention_mask", (1, 3), np.int64).ptr == first.ptr  # fits: the same memory
    grown = pool.buffer("attention_mask", (1, 6), np.int64)  # needs more: at least twice the old size
    assert pool.arrays["attention_mask"].shape == (10,) and grown.shape == (1, 6)
    assert pool.buffer("attention_mask", (1, 10), np.int64).ptr == grown.ptr
    assert pool.buffer("attention_mask", (1, 2), np.int32).dtype == np.int32  # another dtype: its own memory
    uploaded = pool.upload("keep", np.array(7), np.int64, HostStream())  # converted; 0-d stays 0-d
    assert uploaded.shape == () and uploaded.to_host(HostStream()) == 7


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_kv_cache_ping_pong_windows_in_one_allocation(kind, monkeypatch):
    """The cache the tensorrt backend binds: per name two disjoint buffers at fixed offsets of one
    allocation; past and present are contiguous windows at their starts that swap roles each step."""
    if kind == "cuda":
        fake_cuda.install(monkeypatch)
    stream = HostStream()
    cache = DeviceKVCache(["key_0", "value_0"], batch=1, kv_heads=2, head_dim=4, capacity=8, dtype=np.float16,
                          device=kind)
    size = 2 * 8 * 4  # one buffer: B * Hkv * capacity * Dh elements
    base = cache.memory.ptr
    starts = {(i, which): cache.view(i, which, 8).ptr for i in range(2) for which in range(2)}
    assert starts == {(i, which): base + (2 * i + which) * size * 2 for i in range(2) for which in range(2)}
    past, present = cache.bindings(new_tokens=5)  # prefill
    assert past["past_key_0"].shape == (1, 2, 0, 4) and present["present_key_0"].shape == (1, 2, 5, 4)
    assert (past["past_key_0"].ptr, present["present_key_0"].ptr) == (starts[0, 0], starts[0, 1])
    assert present["present_value_0"].ptr == starts[1, 1]
    present["present_key_0"].copy_from(np.ones((1, 2, 5, 4), np.float16), stream)  # what the engine writes
    present["present_value_0"].copy_from(np.full((1, 2, 5, 4), 2, np.float16), stream)
    cache.advance(5)
    past, present = cache.bindings(new_tokens=1)  # decode: last step's present is this step's past
    assert past["past_key_0"].shape == (1, 2, 5, 4) and past["past_key_0"].ptr == starts[0, 1]
    assert present["present_key_0"].shape == (1, 2, 6, 4) and present["present_key_0"].ptr == starts[0, 0]
    assert (past["past_key_0"].to_host(stream) == 1).all() and (past["past_value_0"].to_host(stream) == 2).all()
    assert cache.memory.ptr == base  # nothing reallocated
    cache.advance(1)
    cache.advance(1)
    with pytest.raises(EngineInputError, match="holds 8 tokens; this step needs 9"):
        cache.bindings(new_tokens=2)


def test_the_gpu_probe_asks_the_cuda_runtime(cuda, monkeypatch):
    assert probe_gpu() == ("sm89", None) and gpu_target() == "sm89" and trt_backend.current_target() == "sm89"
    fake_cuda.install(monkeypatch, fake_cuda.FakeLibcudart(capability=(12, 0)))
    assert gpu_target() == "sm120"
    fake_cuda.install(monkeypatch, fake_cuda.FakeLibcudart(devices=0))
    assert probe_gpu() == (None, "the CUDA runtime sees no device")
    fake_cuda.install(monkeypatch, fake_cuda.FakeLibcudart(count_status=35))  # a driver older than the runtime
    reason = "cudaGetDeviceCount failed: CUDA driver version is insufficient for CUDA runtime version (CUDA error 35)"
    assert probe_gpu() == (None, reason)
    with pytest.raises(DeviceError, match=rf"needs a CUDA GPU and finds none \({re.escape(reason)}\).* or use --backend onnxruntime"):
        trt_backend.current_target()


def test_without_libcudart_the_probe_says_so(monkeypatch):
    def no_library():
        raise OSError("libcudart.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(polygraphy_cuda, "G_CUDA", None)
    monkeypatch.setattr(polygraphy_cuda, "Cuda", no_library)
    target, reason = probe_gpu()
    assert target is None and reason.startswith("the CUDA runtime library (libcudart) could not be loaded: libcudart.so")
    with pytest.raises(DeviceError, match="needs a CUDA GPU and finds none .*libcudart"):
        trt_backend.current_target()
