"""KV cache of the ONNX decoder: per layer a key and a value [B, Hkv, P, Dh], sized from the manifest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apet_export.manifest import Manifest


@dataclass
class KVCache:
    tensors: list[np.ndarray]  # past_key_0, past_value_0, past_key_1, ... as the graph orders them
    capacity: int  # the model's context (max_position_embeddings)

    @classmethod
    def empty(cls, manifest: Manifest, batch: int) -> KVCache:
        dims = manifest.dims
        dtype = np.float16 if manifest.precision == "fp16" else np.float32
        shape = (batch, dims["num_kv_heads"], 0, dims["head_dim"])
        return cls([np.zeros(shape, dtype) for _ in range(2 * dims["num_layers"])], dims["max_context"])

    @property
    def length(self) -> int:
        return self.tensors[0].shape[2]

    def feed(self) -> dict[str, np.ndarray]:
        names = [f"past_{kind}_{i}" for i in range(len(self.tensors) // 2) for kind in ("key", "value")]
        return dict(zip(names, self.tensors, strict=True))


@dataclass
class PreallocatedKVCache:
    """The cache of llm.cpu.onnx (export/cpu_graph.py): per layer a key and a value buffer [B, Hkv, C, Dh] that
    the graph writes each step's entries into at position `length` (GroupQueryAttention or TensorScatter). The
    runtime binds the same buffer as past_* and present_* (onnxruntime IO binding), so no step copies the cache.

    C (the capacity) grows in steps of CHUNK tokens, copying once per step of growth: onnxruntime's CPU
    Attention (where the graph has it rather than GroupQueryAttention, which stops at the length) costs in
    proportion to C (masked keys included), so C stays close to the length."""

    buffers: list[np.ndarray]  # past_key_0, past_value_0, ... [B, Hkv, C, Dh], C-contiguous
    length: int  # entries written so far (the same for every row: prompts are left-padded)
    capacity_limit: int  # the model's context (max_position_embeddings)
    ort_values: list = None  # OrtValues over `buffers` (no copy), made once per allocation

    CHUNK = 32

    @classmethod
    def empty(cls, manifest: Manifest, batch: int) -> PreallocatedKVCache:
        empty = KVCache.empty(manifest, batch)
        return cls(empty.tensors, 0, empty.capacity)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more entries: a larger buffer (the next multiple of CHUNK) when needed."""
        needed = self.length + new_tokens
        if needed > self.capacity or self.ort_values is None:
            import onnxruntime as ort

            if needed > self.capacity:
                capacity = -(-needed // self.CHUNK) * self.CHUNK
                grown = []
                for old in self.buffers:
                    batch, heads, _, head_dim = old.shape
                    new = np.zeros((batch, heads, capacity, head_dim), old.dtype)
                    new[:, :, : self.length] = old[:, :, : self.length]
                    grown.append(new)
                self.buffers = grown
            self.ort_values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.buffers]

    def feed(self) -> dict[str, np.ndarray]:
        """The entries so far as llm.onnx's past_* inputs [B, Hkv, length, Dh] (copies)."""
        return KVCache([b[:, :, : self.length].copy() for b in self.buffers], self.capacity_limit).feed()
