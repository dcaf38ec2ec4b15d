"""What a model family declares so that the exporters, parity checks and runtime can drive it.

A family is a small registered class (optimum-style): how to load the checkpoint, its vision features
at the feature layer, its projector, and the names and dynamic axes of the vision graph's I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apet_export.config import TensorSpec


@dataclass(frozen=True)
class VisionDims:
    image_size: int  # square input side, pixels
    num_tokens: int  # N, visual tokens per image at the feature layer
    vision_hidden: int  # D of the vision features that ApET sees
    text_hidden: int  # H of the projected embeddings fed to the LLM


class ModelFamily:
    """Base class; subclasses implement the methods below for one architecture family."""

    name: str = ""
    model_types: tuple[str, ...] = ()  # Hugging Face config.model_type values this family handles
    media: str = "image"  # what the vision graph encodes per call: "image" (one per call) or "video" (frames)
    prefix_tokens: int = 0  # rows per call kept whole in front of the compressed tokens (see split_prefix)

    def load(self, path: Path, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
        """(model in eval mode, processor) from a local checkpoint directory."""
        raise NotImplementedError

    def vision_dims(self, model) -> VisionDims:
        raise NotImplementedError

    def vision_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> features at the vision feature layer [B, N, D] (what ApET stage 1 sees)."""
        raise NotImplementedError

    def vision_features_and_attention(self, model, pixel_values: torch.Tensor):
        """(features [B, N, D], VisionZip's importance per token [B, N]) from one pass of the tower: the
        CLS attention row of the feature layer, or the mean received attention for towers without CLS."""
        raise NotImplementedError

    def split_prefix(self, model, features: torch.Tensor):
        """features [B, N', D] -> (prefix [B, C, D] or None, tokens [B, N, D]): the prefix rows are kept whole
        in front of the compressed tokens (Video-LLaVA's per-frame CLS); most families have none."""
        return None, features

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        """Per-token projector: [B, T, D] -> [B, T, H]."""
        raise NotImplementedError

    def language_model(self, model):
        """The decoder stack without head (LlamaModel, Qwen2Model, ...)."""
        raise NotImplementedError

    def lm_head(self, model):
        raise NotImplementedError

    def image_token_id(self, model) -> int:
        raise NotImplementedError

    def vision_io(self, dims: VisionDims) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """(inputs, outputs) of vision.onnx; dynamic axes are named ('batch', 'keep')."""
        inputs = [
            TensorSpec("pixel_values", "float32", ("batch", 3, dims.image_size, dims.image_size)),
            TensorSpec("keep", "int64", ()),
        ]
        outputs = [
            TensorSpec("image_embeds", "float32", ("batch", "keep", dims.text_hidden)),
            TensorSpec("keep_index", "int64", ("batch", "keep")),
            TensorSpec("scores", "float32", ("batch", dims.num_tokens)),
        ]
        return inputs, outputs

    def dummy_vision_inputs(self, model, batch: int = 1, keep: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        side = self.vision_dims(model).image_size
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, side, side, generator=generator), torch.tensor(keep, dtype=torch.int64)

    # -- build and runtime hooks (the runtime's are numpy; the pipeline passes itself) -------------------
    def extra_tensors(self, model) -> dict[str, torch.Tensor]:
        """Weights the runtime needs outside the graphs (LLaVA-NeXT's image_newline), saved beside them."""
        return {}

    def runtime_dims(self, model) -> dict:
        """Extra manifest dims the runtime reads (e.g. LLaVA-NeXT's grid pinpoints)."""
        return {}

    def check_budget(self, manifest, budget: int) -> int:
        """The budget of one request (per image here), or an InvalidInputError that says the valid range."""
        return manifest.check_budget(budget)

    def image_rows_bound(self, manifest, budget: int) -> int:
        """At most this many LLM rows per image at this budget (for the context check)."""
        return budget

    def preprocess_crops(self, processor, images) -> np.ndarray:
        """PIL images -> the vision graph's pixel_values for all of them: [K, 3, S, S] float32."""
        return processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)

    def encode_images(self, pipeline, images, budget: int) -> list[np.ndarray]:
        """PIL images -> per image its LLM rows [L_i, H]: one batched call of the vision graph here."""
        pixel_values = self.preprocess_crops(pipeline.processor, images)
        vision = pipeline.backend.vision.infer(
            {"pixel_values": pixel_values, "keep": np.array(budget, dtype=np.int64)}, check_inputs=False
        )
        return list(vision["image_embeds"])
