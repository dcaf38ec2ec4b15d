"""Eager PyTorch reference of the vision graph, as a Polygraphy runner.

It runs the Hugging Face model and the library's public compression API (get_method(...)), not the
traced module, so that parity compares the exported graph against an independent eager path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from apet_export.compression import get_method
from apet_export.manifest import Manifest
from apet_export.models.registry import get_family


def eager_vision(model, family, manifest: Manifest, pixel_values: torch.Tensor, keep: int) -> dict[str, np.ndarray]:
    """pixel_values [B, 3, S, S], budget -> the vision graph's outputs, computed eagerly."""
    with torch.inference_mode():
        features = family.vision_features(model, pixel_values)  # [B, N, Dv]
        aux = {}
        if manifest.method == "visionzip":
            aux["cls_attention"] = family.cls_attention(model, pixel_values)
        out = get_method(manifest.method)(features, keep, manifest.compression, **aux)
        embeds = family.project(model, out.tokens)
    outputs = {"image_embeds": embeds.float(), "keep_index": out.index, "scores": out.scores.float()}
    return OrderedDict((name, np.ascontiguousarray(t.numpy())) for name, t in outputs.items())


class TorchVisionRunner(BaseRunner):
    """activate: load DIR/model; infer: {pixel_values, keep} -> {image_embeds, keep_index, scores}."""

    def __init__(self, build_dir: Path, manifest: Manifest, name: str = "torch"):
        super().__init__(name=name, prefix="torch-runner")
        self.build_dir, self.manifest = Path(build_dir), manifest
        self.family = get_family(manifest.family)
        self.model = None

    def activate_impl(self):
        self.model, _ = self.family.load(self.build_dir / "model")

    def get_input_metadata_impl(self):
        metadata = TensorMetadata()
        for spec in self.manifest.files["vision"].inputs:
            metadata.add(spec.name, np.dtype(spec.dtype), spec.shape)
        return metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        pixel_values = torch.from_numpy(feed_dict["pixel_values"])
        outputs = eager_vision(self.model, self.family, self.manifest, pixel_values, int(feed_dict["keep"]))
        self.inference_time = time.perf_counter() - start  # read by Polygraphy's Comparator
        return outputs

    def deactivate_impl(self):
        self.model = None
