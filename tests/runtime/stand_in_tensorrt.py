"""Stand-in TensorRT for the tensorrt backend's tests without a GPU: the slice of the tensorrt module the
runners use (runtime, engine, execution contexts, TensorRT-RTX runtime config and cache) around stand-in
engines that follow the execution-context API (shapes and raw addresses by name, execute_async_v3 on a
stream) and compute with numpy on the memory bound to them: host memory, or fake_cuda's "device" memory,
which is host memory too."""

from __future__ import annotations

import ctypes
import types

import numpy as np

HEADS, HEAD_DIM, VOCAB, CONTEXT = 2, 4, 7, 64  # the stand-in decoder's KV heads, head size, vocabulary, context


def memory(address: int, shape, dtype) -> np.ndarray:
    """The numpy view of `shape` elements of `dtype` at a raw address (what TensorRT reads and writes)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype).reshape(shape)


class Context:
    def __init__(self, engine, config=None):
        self.engine, self.config, self.shapes, self.addresses = engine, config, {}, {}
        self.profile = self.profile_stream = None
        self.runs, self.streams, self.fed = 0, [], []

    def set_optimization_profile_async(self, index, stream):
        self.profile, self.profile_stream = index, stream
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return name not in getattr(self.engine, "reject", ())  # TensorRT answers False for a shape it refuses

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def read(self, name):
        return memory(self.addresses[name], self.shapes[name], self.engine.tensors[name][1])

    def get_tensor_shape(self, name):
        return self.engine.output_shape(self, name)

    def execute_async_v3(self, stream):
        self.runs += 1
        self.streams.append(stream)
        self.fed.append({n: self.read(n).copy() for n, (mode, _) in self.engine.tensors.items() if mode == "in"})
        for name, value in self.engine.compute(self).items():
            memory(self.addresses[name], value.shape, value.dtype)[...] = value
        return True


class DecoderEngine:
    """One decoder layer `layer`: new keys = the input rows, values twice that. First part (inputs_embeds):
    hidden_states = 2 * input. Last part: logits = sum of all its keys + arange(V)."""

    def __init__(self, layer: int, first: str = "inputs_embeds", last: bool = True, kv_dtype=np.float32):
        self.layer, self.first, self.last, self.kv_dtype = layer, first, last, kv_dtype
        out = "logits" if last else "hidden_states"
        self.output = out
        self.tensors = {
            first: ("in", np.float32), "attention_mask": ("in", np.int64), "position_ids": ("in", np.int64),
            f"past_key_{layer}": ("in", kv_dtype), f"past_value_{layer}": ("in", kv_dtype),
            out: ("out", np.float32), f"present_key_{layer}": ("out", kv_dtype), f"present_value_{layer}": ("out", kv_dtype),
        }

    def output_shape(self, context, name):
        batch, sequence, _ = context.shapes[self.first]
        return (batch, VOCAB) if name == "logits" else (batch, sequence, HEAD_DIM)

    def compute(self, context):
        rows = context.read(self.first)  # [B, S, Dh]
        new = np.repeat(rows[:, None], HEADS, axis=1).astype(self.kv_dtype)  # [B, Hkv, S, Dh]
        key = np.concatenate([context.read(f"past_key_{self.layer}"), new], axis=2)
        value = np.concatenate([context.read(f"past_value_{self.layer}"), 2 * new], axis=2)
        out = {f"present_key_{self.layer}": key, f"present_value_{self.layer}": value}
        if self.last:
            out["logits"] = (key.astype(np.float32).sum(axis=(1, 2, 3))[:, None] + np.arange(VOCAB)).astype(np.float32)
        else:
            out["hidden_states"] = (2 * rows).astype(np.float32)
        return out


class Stage2Engine:
    """compressed_states = the hidden states with each span cut to its first `keep` rows. image_start is
    read from device memory (only shape tensors are on the host), though the manifest records its range."""

    tensors = {
        "hidden_states": ("in", np.float32), "image_start": ("in", np.int64), "image_length": ("in", np.int64),
        "keep": ("in", np.int64), "compressed_states": ("out", np.float32), "keep_index": ("out", np.int64),
        "scores": ("out", np.float32),
    }
    host = {"image_length", "keep"}

    def values(self, context):
        return [int(memory(context.addresses[n], (), np.int64)) for n in ("image_start", "image_length", "keep")]

    def output_shape(self, context, name):
        batch, length, hidden = context.shapes["hidden_states"]
        _, span, keep = self.values(context)
        return {"compressed_states": (batch, length - span + keep, hidden), "keep_index": (batch, keep),
                "scores": (batch, span)}[name]

    def compute(self, context):
        hidden = context.read("hidden_states")
        start, span, keep = self.values(context)
        compressed = np.concatenate([hidden[:, :start], hidden[:, start : start + keep], hidden[:, start + span :]], 1)
        batch = hidden.shape[0]
        return {"compressed_states": compressed, "keep_index": np.tile(np.arange(keep), (batch, 1)),
                "scores": np.zeros((batch, span), np.float32)}


class VisionEngine:
    """image_embeds [B, keep, Dh] = the token index; keep is a host shape tensor."""

    tensors = {
        "pixel_values": ("in", np.float32), "keep": ("in", np.int64),
        "image_embeds": ("out", np.float32), "keep_index": ("out", np.int64),
    }
    host = {"keep"}

    def output_shape(self, context, name):
        batch, keep = context.shapes["pixel_values"][0], int(memory(context.addresses["keep"], (), np.int64))
        return (batch, keep, HEAD_DIM) if name == "image_embeds" else (batch, keep)

    def compute(self, context):
        batch, keep, _ = self.output_shape(context, "image_embeds")
        index = np.broadcast_to(np.arange(keep), (batch, keep))
        return {"image_embeds": np.repeat(index[..., None], HEAD_DIM, axis=2).astype(np.float32), "keep_index": index.copy()}


class RuntimeCache:
    def __init__(self):
        self.blob = b""

    def deserialize(self, blob):
        self.blob = bytes(blob)
        return True

    def serialize(self):
        return self.blob + b"+kernels"


def fake_tensorrt(engines: dict[bytes, object], name: str = "tensorrt", version: str = "10.15"):
    """The slice of the tensorrt module the runners use, around stand-in engines chosen by the engine
    file's bytes. name "tensorrt_rtx_bindings" adds TensorRT-RTX's runtime config and cache."""

    class Logger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2)

        def __init__(self):
            pass

    def cuda_engine(engine):
        names = list(engine.tensors)
        engine.contexts, engine.caches = [], []

        def create_execution_context(config=None):
            engine.contexts.append(Context(engine, config))
            return engine.contexts[-1]

        def create_runtime_config():
            config = types.SimpleNamespace(cache=None)
            config.create_runtime_cache = lambda: engine.caches.append(RuntimeCache()) or engine.caches[-1]
            config.set_runtime_cache = lambda cache: setattr(config, "cache", cache) or True
            return config

        return types.SimpleNamespace(
            num_io_tensors=len(names), get_tensor_name=lambda i: names[i],
            get_tensor_mode=lambda n: engine.tensors[n][0], get_tensor_dtype=lambda n: engine.tensors[n][1],
            get_tensor_location=lambda n: "host" if n in getattr(engine, "host", ()) else "device",
            create_execution_context=create_execution_context, create_runtime_config=create_runtime_config,
        )

    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: cuda_engine(engines[bytes(data)]))
    return types.SimpleNamespace(
        __name__=name, __version__=version, ILogger=Logger, Runtime=lambda logger: runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="in"), TensorLocation=types.SimpleNamespace(HOST="host"),
        nptype=lambda dtype: dtype,
    )
