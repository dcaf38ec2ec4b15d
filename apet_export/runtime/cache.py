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
