"""torch backend: the Hugging Face model run eagerly with our compression; the reference of parity.

The vision runner uses the library's public compression API (get_method(...)), not the traced module,
so parity compares the exported graphs against an independent eager path. The LLM runner is the HF
decoder with its DynamicCache (SDPA attention; FlashAttention-2 when installed and on a GPU).
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
from apet_export.runtime.backends.base import Backend


def eager_vision(model, family, manifest: Manifest, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A vision-graph feed (pixel_values [B, 3, S, S] or the family's inputs, keep) -> its outputs, eagerly."""
    with torch.inference_mode():
        visionzip = manifest.method == "visionzip"
        features, attention = family.eager_features(model, feed, with_attention=visionzip)  # [B, N, Dv]
        aux = {"cls_attention": attention} if visionzip else {}
        prefix, features = family.split_prefix(model, features)  # prefix [B, C, Dv] or None
        out = get_method(manifest.method)(features, int(feed["keep"]), manifest.compression, **aux)
        embeds = family.project(model, out.tokens)
        if prefix is not None:  # kept whole in front: [B, C+T, H]
            embeds = torch.cat([family.project(model, prefix), embeds], dim=1)
    outputs = {"image_embeds": embeds.float(), "keep_index": out.index, "scores": out.scores.float()}
    return OrderedDict((name, np.ascontiguousarray(t.numpy())) for name, t in outputs.items())


class TorchVisionRunner(BaseRunner):
    """activate: load DIR/model; infer: {pixel_values, keep} -> {image_embeds, keep_index, scores}."""

    def __init__(self, build_dir: Path, manifest: Manifest, name: str = "torch", model=None):
        super().__init__(name=name, prefix="torch-runner")
        self.build_dir, self.manifest = Path(build_dir), manifest
        self.family = get_family(manifest.family)
        self.model, self.owns_model = model, model is None

    def activate_impl(self):
        if self.owns_model:
            self.model, _ = self.family.load(self.manifest.model_dir(self.build_dir))

    def get_input_metadata_impl(self):
        metadata = TensorMetadata()
        for spec in self.manifest.files["vision"].inputs:
            metadata.add(spec.name, np.dtype(spec.dtype), spec.shape)
        return metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = eager_vision(self.model, self.family, self.manifest, feed_dict)
        self.inference_time = time.perf_counter() - start  # read by Polygraphy's Comparator
        return outputs

    def deactivate_impl(self):
        if self.owns_model:
            self.model = None


def attention_implementation() -> str:
    """FlashAttention-2 where it can run (CUDA + flash-attn installed), SDPA otherwise."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class TorchLlmRunner(BaseRunner):
    """The HF decoder with a DynamicCache; feeds and logits are numpy like the ONNX runner's."""

    def __init__(self, model, family, name: str = "torch-llm"):
        super().__init__(name=name, prefix="torch-llm-runner")
        self.model, self.family = model, family

    def activate_impl(self):
        self.language_model = self.family.language_model(self.model)
        self.lm_head = self.family.lm_head(self.model)

    def get_input_metadata_impl(self):
        metadata = TensorMetadata()
        for name, dtype in (("inputs_embeds", np.float32), ("attention_mask", np.int64), ("position_ids", np.int64)):
            metadata.add(name, dtype, None)
        return metadata

    def infer_impl(self, feed_dict, cache=None):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.language_model(
                inputs_embeds=torch.from_numpy(feed_dict["inputs_embeds"]),
                attention_mask=torch.from_numpy(feed_dict["attention_mask"]),
                position_ids=torch.from_numpy(feed_dict["position_ids"]),
                past_key_values=cache, use_cache=True,
            )
            logits = self.lm_head(out.last_hidden_state[:, -1]).float().numpy()  # [B, V]
        self.inference_time = time.perf_counter() - start
        return logits, out.past_key_values

    def deactivate_impl(self):
        self.language_model = self.lm_head = None


class TorchBackend(Backend):
    name = "torch"

    def activate(self) -> TorchBackend:
        family = get_family(self.manifest.family)
        self.model, _ = family.load(self.manifest.model_dir(self.build_dir), attn_implementation=attention_implementation())
        self.vision = TorchVisionRunner(self.build_dir, self.manifest, model=self.model)
        self.vision.activate()
        if self.manifest.stage2:  # HF layers [0, K) + apet_compress + layers [K, L)
            from apet_export.runtime.two_stage import torch_two_stage_runner

            self.llm = torch_two_stage_runner(self.model, family, self.manifest)
        else:
            self.llm = TorchLlmRunner(self.model, family)
        self.llm.activate()
        self.embedding = family.language_model(self.model).embed_tokens
        return self

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.embedding(torch.from_numpy(token_ids)).float().numpy()

    def new_cache(self, batch: int):
        from transformers import DynamicCache

        if self.manifest.stage2:
            return self.llm.new_cache(batch)
        return DynamicCache(config=self.model.config.text_config)
