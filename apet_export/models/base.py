"""The family contract: what a model family declares so that every path (export, engines, calibration,
every runtime backend, parity, bench, visualize) drives it the same way.

A family is a small registered class (optimum-style) in its own module, plus a registry line. Its
declarations come in groups, in this order below:

    declarations   class attributes: media, budget unit, default budget or share, position shape ...
    checkpoint     load, load_processor (transformers), runtime_processor (without), language_model, lm_head, image_token_id, extra tensors, dims
    vision graph   vision_dims, vision_io (named axes), export_example, vision_features, split_prefix,
                   project, eager_features
    refusals       stage2_refusal: a path the family does not offer, and why (one line)
    budget         budget_policy: every budget rule of a build (apet_export/compression/budget.py)
    axis ranges    axis_ranges: the TensorRT (min, opt, max) of the family's own axes
    prompt         prompt_ids: the chat template with one placeholder per image (or video)
    feeds          vision_feeds, encode_images(infer, ...), position_ids, decode_position_ids: pictures ->
                   vision feeds -> (the vision graph, passed in as a function) -> LLM rows and positions
    parity         e2e_budgets, feed_label
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apet_export.compression.budget import BudgetPolicy
from apet_export.config import AxisRange, TensorSpec

if TYPE_CHECKING:  # torch and transformers are imported by the export and eager methods that use them:
    import torch  # the runtime hooks (budget, axes, prompt, feeds, positions) run without them

# the vision graph on some backend: a feed {name: array} -> its outputs {image_embeds, keep_index, scores}
VisionInfer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def rename_axis(specs: list[TensorSpec], old: str, new: str) -> list[TensorSpec]:
    """The specs with dynamic axis `old` named `new` (a family's own name for the vision batch axis)."""
    return [TensorSpec(s.name, s.dtype, tuple(new if a == old else a for a in s.shape)) for s in specs]


@dataclass
class RuntimeProcessor:
    """What a runtime needs of a processor, without transformers: the build's tokenizer (build_tokenizer.py)
    and a numpy image processor with the HF image processor's call and attributes."""

    tokenizer: object
    image_processor: object


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
    model_class: str = ""  # the transformers class of the checkpoint, e.g. "LlavaForConditionalGeneration"
    media: str = "image"  # what the vision graph encodes per call: "image" (one per call) or "video" (frames)
    budget_unit: str = "image"  # what a request's budget is for: "image", "crops" (whole image), "frames" (video)
    batched_feeds: bool = True  # vision_feeds puts all images in one feed (else one feed per image)
    prefix_tokens: int = 0  # rows per call kept whole in front of the compressed tokens (see split_prefix)
    exportable_methods: tuple[str, ...] = ("apet", "visionzip", "none")
    default_budget: int | None = 64  # tokens kept per image when the build names no budget
    default_keep_ratio: float | None = None  # set: the default budget is this share of each image's tokens
    llm_position_shape: tuple = ("batch", "sequence")  # llm.onnx position_ids axes ((3, ...) for M-RoPE)
    # each image placeholder becomes exactly `budget` LLM rows (what two-stage ApET's image spans assume)
    fixed_image_rows: bool = True
    # the ApET variant a build of this family runs by default: what the authors' released code runs for it
    # (config.VARIANTS, rules in compression/apet.py); "uniform" is the family-independent rule
    apet_variant: str = "uniform"
    stage2_refusal: str | None = None  # set: why `build --stage2-layer` is refused for this family

    def load(self, path: Path, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
        """(model in eval mode, processor) from a local checkpoint directory: safetensors only, local files
        only (never the network), fp32 weights."""
        import torch
        import transformers

        from apet_export.compat import quiet_libraries

        quiet_libraries()
        from apet_export.checkpoint import check_loading_info

        # ignore_mismatched_sizes: weights config.json cannot hold come back in the loading report (then an
        # error naming the file) instead of as a RuntimeError that points to a report in the log
        model, info = getattr(transformers, self.model_class).from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=True,
            attn_implementation=attn_implementation, dtype=torch.float32, local_files_only=True,
            ignore_mismatched_sizes=True, output_loading_info=True,
        )
        check_loading_info(path, info)
        return model.eval(), self.load_processor(path)

    def load_processor(self, path: Path):
        """The saved processor (anything with .tokenizer and .image_processor)."""
        from transformers import AutoProcessor

        # backend="pil": the saved processor resizes identically with or without torchvision installed.
        return AutoProcessor.from_pretrained(path, backend="pil", local_files_only=True)  # never the network

    def runtime_processor(self, path: Path, image_processor) -> RuntimeProcessor:
        """The processor a runtime uses (no transformers): the tokenizer saved in `path` read with the tokenizers
        library, and `image_processor`, the numpy one read from the same directory by the runtime."""
        from apet_export.models.build_tokenizer import BuildTokenizer

        return RuntimeProcessor(BuildTokenizer.from_dir(path), image_processor)

    def vision_dims(self, model, processor=None) -> VisionDims:
        raise NotImplementedError

    def vision_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> features at the vision feature layer [B, N, D] (what ApET stage 1 sees).
        Traced into vision.onnx with the graph inputs before `keep` (families may add layout inputs)."""
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

    # Every transformers *ForConditionalGeneration VLM we support lays these out the same way.
    def language_model(self, model):
        """The decoder stack without head (LlamaModel, Qwen2Model, ...)."""
        return model.model.language_model

    def lm_head(self, model):
        return model.lm_head

    def image_token_id(self, model) -> int:
        """The placeholder token whose position the image rows replace."""
        return model.config.image_token_id

    def vision_io(self, dims: VisionDims, model=None) -> tuple[list[TensorSpec], list[TensorSpec]]:
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
        import torch

        side = self.vision_dims(model).image_size
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, side, side, generator=generator), torch.tensor(keep, dtype=torch.int64)

    def export_example(self, model):
        """(vision graph inputs without keep, their dynamic shapes, N of the example) for tracing."""
        import torch

        pixel_values, _ = self.dummy_vision_inputs(model, batch=2)
        return (pixel_values,), ({0: torch.export.Dim("batch", min=1, max=1024)},), self.vision_dims(model).num_tokens

    def eager_features(self, model, feed: dict[str, np.ndarray], with_attention: bool = False):
        """The eager reference of the vision graph's features for a feed: (features [B, N, D], VisionZip's
        importance [B, N] or None)."""
        import torch

        pixel_values = torch.from_numpy(feed["pixel_values"])
        if with_attention:
            return self.vision_features_and_attention(model, pixel_values)
        return self.vision_features(model, pixel_values), None

    # -- build hooks ------------------------------------------------------------------------------------
    def extra_tensors(self, model) -> dict[str, torch.Tensor]:
        """Weights the runtime needs outside the graphs (LLaVA-NeXT's image_newline), saved beside them."""
        return {}

    def runtime_dims(self, model) -> dict:
        """Extra manifest dims the runtime reads (e.g. LLaVA-NeXT's grid pinpoints)."""
        return {}

    # -- budget: one policy object (apet_export/compression/budget.py) ---------------------------------
    def budget_policy(self, manifest) -> BudgetPolicy:
        """Every budget rule of a build of this family: range, default or share, per-crop / per-frame split,
        two-stage split, and their messages."""
        budget = manifest.budget
        # the floor below every budget: M for ApET (two-stage builds too: each stage goes down to M + 1, their
        # average to 2M + 1), 1 for VisionZip, 0 for none (the manifest's min is the floor + 1 of one-stage builds)
        floor = manifest.compression.num_basis if manifest.stage2 else budget["min"] - 1
        return BudgetPolicy(
            num_basis=floor, max=budget["max"], default=budget.get("default"), method=manifest.method,
            unit=self.budget_unit, ratio=budget.get("ratio"), two_stage=bool(manifest.stage2),
        )

    # -- TensorRT profiles: the family's own dynamic axes ----------------------------------------------
    def axis_ranges(self, manifest, max_batch: int) -> dict[str, AxisRange]:
        """(min, opt, max) of the vision graph's family-specific axes (patches, crops, frames ...); the generic
        axes (batch, keep, sequence, past ...) come from export/trt_profiles.py."""
        return {}

    # -- prompt: the chat template with one placeholder per image (or one per video) --------------------
    def prompt_ids(self, tokenizer, prompt: str, count: int) -> list[int]:
        """Token ids of the prompt with `count` placeholders of this family's media, through the chat template.
        Only the template inserts control tokens: the user's text is text, whatever it contains."""
        from apet_export.models.tokenizer import encode_with_user_text

        media = self.media
        if tokenizer.chat_template:

            def render(text: str) -> str:
                content = [{"type": media}] * count + [{"type": "text", "text": text}]
                return tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                )

            return encode_with_user_text(tokenizer, render, prompt)  # the template wrote BOS
        image_token = getattr(tokenizer, f"{media}_token")
        return encode_with_user_text(tokenizer, lambda text: f"{image_token}\n" * count + text, prompt,
                                     add_special_tokens=True)

    # -- feeds (numpy): images -> vision feeds -> LLM rows and their positions ------------------------
    #   encode_images = vision_feeds -> `infer` (the vision graph on any backend) per feed -> rows per image;
    #   families override vision_feeds (per-image feeds, layout inputs) or, where rows need packing after
    #   the graph, encode_images (LLaVA-NeXT); position_ids then positions the merged prompt. Every path
    #   (runtime backends, calibration, parity, bench, visualize) builds its feeds through these.

    def stage2_span(self, manifest, budget2: int, keep_index: np.ndarray) -> tuple[int, int]:
        """(rows ApET stage 2 compresses, counted from the image's first LLM row; rows it keeps of them) for one
        image whose stage-1 keep_index is given: all T rows of the image, kept down to budget2, here."""
        return keep_index.shape[-1], budget2

    def vision_feeds(self, processor, images, budget: int | None, manifest):
        """(feeds of the vision graph, one layout per image for position_ids): one batched feed here,
        pixel_values [K, 3, S, S] float32."""
        pixel_values = processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
        keep = self.budget_policy(manifest).calls_budget(budget)
        return [{"pixel_values": pixel_values, "keep": np.array(keep, dtype=np.int64)}], [None] * len(images)

    def encode_images(self, infer: VisionInfer, processor, manifest, images, budget: int | None, extras=None):
        """PIL images -> (per image its LLM rows [L_i, H], layouts and per image keep_index for position_ids):
        `infer(feed) -> outputs` (the vision graph on any backend) on each of vision_feeds' feeds. extras:
        the build's extra tensors (extra_tensors), for families that pack rows with them."""
        feeds, layouts = self.vision_feeds(processor, images, budget, manifest)
        rows, keep_index = [], []  # per image: [L_i, H], [T_i]
        for feed in feeds:  # one batched feed (LLaVA) or one per image (dynamic resolution)
            vision = infer(feed)
            rows += list(vision["image_embeds"])
            keep_index += list(vision["keep_index"])
        return rows, layouts, keep_index

    def e2e_budgets(self, manifest) -> list[int]:
        """Budgets of the end-to-end parity check: 64 and N (no compression)."""
        return self.budget_policy(manifest).within((64, manifest.budget["max"]))

    def feed_label(self, feed: dict[str, np.ndarray]) -> str:
        return f"b={feed['pixel_values'].shape[0]}"

    def position_ids(
        self, ids: list[int], image_token_id: int, layouts, keep_index, length: int | None = None
    ) -> tuple[np.ndarray, int]:
        """(position_ids of the merged prompt [1, L], rope delta): contiguous 0..L-1 (1-D RoPE). length: the
        merged prompt's rows (default: text tokens + kept tokens; families with extra rows pass it)."""
        if length is None:
            length = sum(1 for t in ids if t != image_token_id) + sum(len(k) for k in keep_index)
        return np.arange(length, dtype=np.int64)[None], 0

    def decode_position_ids(self, position: int, delta: int) -> np.ndarray:
        """position_ids [1, 1] of the token at cache position `position`."""
        return np.array([[position + delta]], np.int64)
