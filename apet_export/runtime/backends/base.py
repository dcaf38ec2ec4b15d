"""The interface every backend implements: a vision runner, an LLM runner and the embedding lookup.

Runners follow Polygraphy's BaseRunner (activate / infer / deactivate, subclasses implement the
*_impl methods), so the same objects drive generation and Polygraphy's Comparator.

    vision.infer({"pixel_values": [B, 3, S, S] f32, "keep": [] i64})
        -> {"image_embeds": [B, T, H], "keep_index": [B, T], "scores": [B, N]}
    llm.infer({"inputs_embeds": [B, S, H], "attention_mask": [B, P+S] i64, "position_ids": [B, S] i64}, cache)
        -> (logits [B, V] f32, cache)           (the cache object is the backend's own)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apet_export.manifest import Manifest


class Backend:
    name = ""

    def __init__(self, build_dir: Path, manifest: Manifest):
        self.build_dir, self.manifest = Path(build_dir), manifest
        self.vision = None  # a runner, set by activate()
        self.llm = None

    def activate(self) -> Backend:
        raise NotImplementedError

    def deactivate(self) -> None:
        for runner in (self.vision, self.llm):
            if runner is not None and runner.is_active:
                runner.deactivate()

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """[B, S] int64 -> [B, S, H] float32."""
        raise NotImplementedError

    def new_cache(self, batch: int):
        raise NotImplementedError

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()
