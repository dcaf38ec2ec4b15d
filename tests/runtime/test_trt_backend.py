"""The tensorrt backend's runners without a GPU: a stand-in engine that follows the TensorRT execution-context
API (shapes and raw addresses by name, execute_async_v3) and computes on the bound CPU memory. This checks
what our code does (profile choice, host shape tensor, ping-pong KV bindings across steps), not TensorRT."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import torch

from apet_export.config import TensorSpec
from apet_export.runtime.backends.trt import DeviceKVCache, TrtLlmRunner, TrtVisionRunner

HEADS, HEAD_DIM, VOCAB = 2, 4, 7


def memory(address: int, shape, dtype) -> np.ndarray:
    """The numpy view of `shape` elements of `dtype` at a raw address (what TensorRT reads and writes)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype).reshape(shape)


class Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile, self.runs = engine, {}, {}, None, 0

    def set_optimization_profile_async(self, index, stream):
        self.profile = index

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def read(self, name):
        return memory(self.addresses[name], self.shapes[name], self.engine.tensors[name][1])

    def get_tensor_shape(self, name):
        return self.engine.output_shape(self, name)

    def execute_async_v3(self, stream):
        self.runs += 1
        for name, value in self.engine.compute(self).items():
            memory(self.addresses[name], value.shape, value.dtype)[...] = value
        return True


class LlmEngine:
    """One layer: the new keys are the embeddings, values twice that; logits = sum of all keys + v."""

    tensors = {
        "inputs_embeds": ("in", np.float32), "attention_mask": ("in", np.int64), "position_ids": ("in", np.int64),
        "past_key_0": ("in", np.float32), "past_value_0": ("in", np.float32),
        "logits": ("out", np.float32), "present_key_0": ("out", np.float32), "present_value_0": ("out", np.float32),
    }

    def output_shape(self, context, name):
        return (-1, VOCAB)

    def compute(self, context):
        embeds = context.read("inputs_embeds")  # [B, S, Dh]
        new = np.repeat(embeds[:, None], HEADS, axis=1)  # [B, Hkv, S, Dh]
        key = np.concatenate([context.read("past_key_0"), new], axis=2)
        value = np.concatenate([context.read("past_value_0"), 2 * new], axis=2)
        logits = key.sum(axis=(1, 2, 3))[:, None] + np.arange(VOCAB, dtype=np.float32)
        return {"present_key_0": key, "present_value_0": value, "logits": logits.astype(np.float32)}


class VisionEngine:
    """image_embeds [B, keep, 3] = the token index; keep is a host shape tensor."""

    tensors = {
        "pixel_values": ("in", np.float32), "keep": ("in", np.int64),
        "image_embeds": ("out", np.float32), "keep_index": ("out", np.int64),
    }
    host = {"keep"}

    def output_shape(self, context, name):
        batch, keep = context.shapes["pixel_values"][0], int(memory(context.addresses["keep"], (), np.int64))
        return (batch, keep, 3) if name == "image_embeds" else (batch, keep)

    def compute(self, context):
        batch, keep, _ = self.output_shape(context, "image_embeds")
        index = np.broadcast_to(np.arange(keep), (batch, keep))
        return {"image_embeds": np.repeat(index[..., None], 3, axis=2).astype(np.float32), "keep_index": index.copy()}


def fake_tensorrt(engine):
    """The slice of the tensorrt module the runners use, around one stand-in engine."""

    class Logger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2)

        def __init__(self):
            pass

    names = list(engine.tensors)
    cuda_engine = types.SimpleNamespace(
        num_io_tensors=len(names),
        get_tensor_name=lambda i: names[i],
        get_tensor_mode=lambda n: engine.tensors[n][0],
        get_tensor_dtype=lambda n: engine.tensors[n][1],
        get_tensor_location=lambda n: "host" if n in getattr(engine, "host", ()) else "device",
        get_tensor_shape=lambda n: engine.output_shape(None, n),
        create_execution_context=lambda: engine.contexts.append(Context(engine)) or engine.contexts[-1],
    )
    engine.contexts = []
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: cuda_engine)
    return types.SimpleNamespace(
        __name__="tensorrt", __version__="10.15", ILogger=Logger, Runtime=lambda logger: runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="in"), TensorLocation=types.SimpleNamespace(HOST="host"),
        nptype=lambda dtype: dtype,
    )


def test_llm_runner_prefills_then_decodes_on_the_bound_cache(tmp_path):
    engine = LlmEngine()
    (tmp_path / "llm.engine").write_bytes(b"stand-in")
    inputs = (TensorSpec("inputs_embeds", "float32", ("batch", "sequence", HEAD_DIM)),)
    runner = TrtLlmRunner(fake_tensorrt(engine), tmp_path / "llm.engine", inputs, ["prefill", "decode"], device="cpu")
    runner.activate()
    cache = DeviceKVCache(["key_0", "value_0"], 1, HEADS, HEAD_DIM, capacity=16, dtype=torch.float32, device="cpu")
    embeds = np.random.default_rng(0).standard_normal((1, 8, HEAD_DIM)).astype(np.float32)

    def step(start, stop):
        feed = {"inputs_embeds": embeds[:, start:stop], "attention_mask": np.ones((1, stop), np.int64),
                "position_ids": np.arange(start, stop)[None]}
        return runner.infer(feed, check_inputs=False, cache=cache)[0]

    step(0, 5)  # prefill: 5 tokens, empty cache
    for position in range(5, 8):  # decode: one token at a time, the cache never leaves its buffers
        logits = step(position, position + 1)
    prefill, decode = engine.contexts
    assert (prefill.profile, prefill.runs, decode.profile, decode.runs) == (0, 1, 1, 3)
    assert cache.length == 8
    expected_keys = np.repeat(embeds[:, None], HEADS, axis=1)  # [1, Hkv, 8, Dh]: every step's keys, in order
    keys = cache.view(0, cache.current, cache.length).numpy()
    np.testing.assert_array_equal(keys, expected_keys)
    np.testing.assert_array_equal(cache.view(1, cache.current, cache.length).numpy(), 2 * expected_keys)
    np.testing.assert_allclose(logits[0], expected_keys.sum() + np.arange(VOCAB), rtol=1e-5)
    runner.deactivate()


def test_vision_runner_feeds_the_budget_as_a_host_shape_tensor(tmp_path):
    engine = VisionEngine()
    (tmp_path / "vision.engine").write_bytes(b"stand-in")
    inputs = (TensorSpec("pixel_values", "float32", ("batch", 3, 8, 8)), TensorSpec("keep", "int64", ()))
    runner = TrtVisionRunner(fake_tensorrt(engine), tmp_path / "vision.engine", inputs, device="cpu")
    runner.activate()
    outputs = runner.infer({"pixel_values": np.zeros((2, 3, 8, 8), np.float32), "keep": np.array(5, np.int64)})
    assert outputs["image_embeds"].shape == (2, 5, 3) and outputs["keep_index"].tolist() == [list(range(5))] * 2
    assert engine.contexts[0].shapes["keep"] == ()  # a 0-d shape tensor, read from host memory
    runner.deactivate()
