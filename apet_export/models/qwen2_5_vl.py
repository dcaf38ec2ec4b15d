"""Qwen2.5-VL family: transformers Qwen2_5_VLForConditionalGeneration (dynamic-resolution ViT with window
attention and a 2x2 patch merger; Qwen2 text model with 3-D M-RoPE).

    image ─processor─► pixel_values [P, C·t·p·p] (P patches: any resolution within min/max pixels), grid (t, h, w)
          ─precompute (numpy, per image)─► patch_positions [P, 2], window_index [P/4], window_patch [W, S], window_slot [P]
    vision.onnx: patch embed → window order → blocks (padded windows batched / full attention) → merger → raster order
          ─► features [1, N, H] (N = P/4 merged tokens) ─ApET stage 1 (keep)─► image_embeds [1, T, H], keep_index [1, T]

One image per vision call (Qwen packs images along the patch axis; per image keeps the graph free of
cu_seqlens loops). ApET runs after the merger, single stage, as the released code does for this family;
its default budget is 30% of each image's tokens. Kept token n keeps the M-RoPE position it has in the full
grid: (start, start + row, start + col); text after the image continues at start + max(rows, cols) as if
nothing had been dropped (gaps allowed), and decode positions are cache length + rope delta.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apet_export.config import AxisRange, TensorSpec, masked_value
from apet_export.errors import InvalidInputError
from apet_export.models.base import ModelFamily, VisionDims

if TYPE_CHECKING:  # imported where the model runs: the runtime hooks need neither torch nor transformers
    import torch

TYPICAL_IMAGE_TOKENS = 256  # a 448 x 448 image: the "opt" point of the TensorRT profile's image axes

# The Qwen2.5-VL chat template (default system prompt; one vision span per image part).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
    "im_start_token": "<|im_start|>",
}


@dataclass
class QwenProcessor:
    """What the pipeline needs of a processor: tokenizer, image processor, and the window size of the ViT
    (for the precomputed window layout). Qwen2_5_VLProcessor itself cannot be built without torchvision
    (its video processor requires it), so the two parts are loaded separately."""

    tokenizer: object
    image_processor: object
    window_size: int

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def vit_window_size(path: Path) -> int:
    """The ViT's attention window in pixels, from the checkpoint's config.json (112 for Qwen2.5-VL)."""
    from apet_export.checkpoint import read_config

    return int(read_config(Path(path))["vision_config"].get("window_size", 112))


def window_patches(window_size: int, merge: int, patch_size: int) -> int:
    """S, the patches of a full attention window (window_size pixels, whole merge units: 64 for Qwen2.5-VL)."""
    return (window_size // merge // patch_size * merge) ** 2


def window_layout(grid_thw: tuple[int, int, int], merge: int, window_size: int, patch_size: int) -> dict[str, np.ndarray]:
    """The per-image tensors the vision graph takes besides the pixels (numpy; the same integers as transformers'
    get_vision_position_ids and get_vision_window_index).

    patch_positions [P, 2]: (row, col) of each patch in the processor's block-major order (rotary input);
    window_index [P/m²]: merged units in window order (HF's window permutation);
    window_patch [W, S]: the patches (window order) of each window, padded with -1 to S = patches of a full
        window, so window attention is one batched attention over [W, heads, S, S] (edge windows are smaller);
    window_slot [P]: where each patch (window order) sits in the flattened [W * S] windows.
    """
    frames, rows, cols = (int(n) for n in grid_thw)  # patches
    merged_rows, merged_cols = rows // merge, cols // merge

    # patch positions, block-major: merge blocks in raster order, the m x m patches of a block in raster order
    def block_major(grid: np.ndarray) -> np.ndarray:  # [rows, cols] -> [rows·cols]
        return grid.reshape(merged_rows, merge, merged_cols, merge).transpose(0, 2, 1, 3).reshape(-1)

    row_index, col_index = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # [rows, cols] each
    positions = np.tile(np.stack([block_major(row_index), block_major(col_index)], axis=-1), (frames, 1))  # [P, 2]

    # windows: units x units merged tokens tiling each frame's merged grid from the top left (edge windows smaller),
    # in raster order of windows, frames one after another; a window lists its merged tokens in raster order
    units = window_size // merge // patch_size
    windows_high, windows_wide = -(-merged_rows // units), -(-merged_cols // units)
    padded = np.full((frames, windows_high * units, windows_wide * units), -1, np.int64)  # -1: outside the image
    padded[:, :merged_rows, :merged_cols] = np.arange(frames * merged_rows * merged_cols).reshape(
        frames, merged_rows, merged_cols)
    by_window = padded.reshape(frames, windows_high, units, windows_wide, units).transpose(0, 1, 3, 2, 4)
    by_window = by_window.reshape(frames * windows_high * windows_wide, units * units)  # [W, units²]
    window_index = by_window[by_window >= 0]  # [P/m²]
    counts = (by_window >= 0).sum(axis=1) * merge * merge  # patches per window (every window holds >= 1 token)
    bounds = np.concatenate([[0], np.cumsum(counts)])  # [W + 1] patch offsets of the windows, window order

    size = window_patches(window_size, merge, patch_size)
    window_patch = np.full((len(counts), size), -1, np.int64)
    window_slot = np.empty(len(positions), np.int64)
    for window, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        window_patch[window, : end - start] = np.arange(start, end)
        window_slot[start:end] = window * size + np.arange(end - start)
    return {
        "patch_positions": positions.astype(np.int64),
        "window_index": window_index.astype(np.int64),
        "window_patch": window_patch,
        "window_slot": window_slot,
    }


def grid_from_positions(patch_positions: np.ndarray) -> tuple[int, int, int]:
    """(t, h, w) patches back from a feed's patch_positions (one image): what HF's own forward takes."""
    rows, cols = int(patch_positions[:, 0].max()) + 1, int(patch_positions[:, 1].max()) + 1
    return len(patch_positions) // (rows * cols), rows, cols


class QwenVLFamily(ModelFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    exportable_methods = ("apet", "none")  # VisionZip needs a CLS row or attention maps: not wired for this tower
    default_budget = None  # the default is a share of each image's tokens (their number varies)
    default_keep_ratio = 0.3  # released code: 30% of each image's tokens
    llm_position_shape = (3, "batch", "sequence")  # M-RoPE: (t, h, w) position per token
    fixed_image_rows = False  # each image keeps its own share of its own token count
    batched_feeds = False  # one feed per image: its own patch count

    model_class = "Qwen2_5_VLForConditionalGeneration"
    # released qwen2_5_vl_custom.py: basis slots get 0.5 * basis + 0.5 * their own token; one stage
    apet_variant = "qwen2_5_vl"
    stage2_refusal = ("the released Qwen2.5-VL code has its LLM stage commented out, so one stage (vision) is the "
                      "faithful default")

    # -- loading --------------------------------------------------------------------------------------
    def load_processor(self, path: Path) -> QwenProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        return QwenProcessor(
            AutoTokenizer.from_pretrained(path, local_files_only=True),
            AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True),  # resizes identically without torchvision
            vit_window_size(path),
        )

    def runtime_processor(self, path: Path, image_processor) -> QwenProcessor:
        processor = super().runtime_processor(path, image_processor)
        return QwenProcessor(processor.tokenizer, processor.image_processor, vit_window_size(path))

    def vision_dims(self, model, processor=None) -> VisionDims:
        """image_size 0: dynamic resolution. num_tokens: the most merged tokens an image can give (max_pixels)."""
        config = model.config
        factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        max_pixels = processor.image_processor.size["longest_edge"] if processor is not None else 28 * 28 * 1280
        return VisionDims(0, max_pixels // (factor * factor), config.vision_config.out_hidden_size,
                          config.text_config.hidden_size)

    # -- vision -----------------------------------------------------------------------------------------
    def vision_features(self, model, pixel_values, patch_positions, window_index, window_patch, window_slot) -> torch.Tensor:
        """The ViT + merger written without data-dependent shapes (what vision.onnx traces), reading the HF
        modules' weights: window attention batched over padded windows, full-attention blocks unmasked (one
        image). HF's forward splits q/k/v per window with Python-side lengths (cu_seqlens.tolist()): no trace.

            pixel_values [P, C·t·p·p] ─patch_embed─► [P, Dv] ─gather window_index─► window order
            patch_positions [P, 2] ─rotary─► cos, sin [P, Dh] ─gather window_index─► window order
            window blocks: q/k/v ─gather window_patch─► [W, h, S, Dh] ─attention (pad keys masked)─► gather window_slot
            full blocks: one attention over [1, h, P, Dh]
            blocks ─► merger [N, H] ─gather argsort(window_index)─► [1, N, H] raster order of the merged grid
        """
        import torch

        visual = model.model.visual
        unit = visual.spatial_merge_unit
        hidden = visual.patch_embed(pixel_values)  # [P, Dv]
        patches = hidden.shape[0]

        def to_window_order(t: torch.Tensor) -> torch.Tensor:  # [P, X] grouped by merge unit, then permuted
            return t.reshape(patches // unit, unit, -1)[window_index].reshape(patches, -1)

        hidden = to_window_order(hidden)
        cos, sin = (to_window_order(f) for f in visual.rotary_pos_emb(hidden, patch_positions))  # [P, Dh]
        size = window_patch.shape[1]
        masked = masked_value(hidden.dtype == torch.float16)
        padding = torch.where(window_patch >= 0, 0.0, masked).to(hidden.dtype)[:, None, None, :]  # [W, 1, 1, S] keys
        padding = padding.expand(-1, -1, size, -1)  # [W, 1, S, S]: onnxruntime's Attention broadcasts no query axis
        windows = (window_patch.clamp(min=0), padding, window_slot)
        for index, block in enumerate(visual.blocks):
            layout = None if index in visual.fullatt_block_indexes else windows
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, layout)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = visual.merger(hidden)  # [N, H] in window order
        return merged[torch.argsort(window_index)][None]  # [1, N, H] raster order of the merged grid

    @staticmethod
    def _attention(attn, hidden, cos, sin, windows=None):
        """hidden [P, Dv] -> [P, Dv]; the HF block's attention as one SDPA (-> one ONNX Attention node), over
        the whole image (windows None) or batched over the padded windows (gather index, key padding, slots)."""
        import torch.nn.functional as F

        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        patches = hidden.shape[0]
        q, k, v = attn.qkv(hidden).reshape(patches, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [P, h, Dh]
        q, k = apply_rotary(q, k, cos, sin)
        if windows is None:
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, h, P, Dh]
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)  # [1, h, P, Dh]
            return attn.proj(out[0].transpose(0, 1).reshape(patches, -1))
        gather, padding, slot = windows  # [W, S], [W, 1, S, S], [P]
        q, k, v = (t[gather].transpose(1, 2) for t in (q, k, v))  # [W, h, S, Dh]; padded rows repeat patch 0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=padding, scale=attn.scaling)  # [W, h, S, Dh]
        out = out.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[3])[slot]  # [P, h·Dh], padded rows dropped
        return attn.proj(out)

    def eager_features(self, model, feed: dict[str, np.ndarray], with_attention: bool = False):
        """The reference: HF's own visual forward (cu_seqlens, per-window attention) on the feed's image."""
        if with_attention:
            raise InvalidInputError("method visionzip is not available for qwen2_5_vl: use apet or none")
        import torch

        visual = model.model.visual
        grid = grid_from_positions(feed["patch_positions"])
        pixel_values = torch.from_numpy(feed["pixel_values"])
        merged = visual(pixel_values, grid_thw=torch.tensor([grid])).pooler_output  # [N, H]
        return merged[None], None

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        return features  # ApET runs after the merger: the features are already LLM embeddings

    def vision_io(self, dims: VisionDims, model=None) -> tuple[list[TensorSpec], list[TensorSpec]]:
        config = model.config.vision_config if model is not None else None
        # C·t·p·p values per patch row (1176 for every released Qwen2.5-VL)
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2 if config else 1176
        layout_window = window_patches(config.window_size, config.spatial_merge_size, config.patch_size) if config else 64
        inputs = [
            TensorSpec("pixel_values", "float32", ("patches", patch_dim)),
            TensorSpec("patch_positions", "int64", ("patches", 2)),
            TensorSpec("window_index", "int64", ("merged",)),
            TensorSpec("window_patch", "int64", ("windows", layout_window)),
            TensorSpec("window_slot", "int64", ("patches",)),
            TensorSpec("keep", "int64", ()),
        ]
        outputs = [
            TensorSpec("image_embeds", "float32", (1, "keep", dims.text_hidden)),
            TensorSpec("keep_index", "int64", (1, "keep")),
            TensorSpec("scores", "float32", (1, "merged")),
        ]
        return inputs, outputs

    def export_example(self, model):
        """(vision inputs without keep, their dynamic shapes, N) for tracing: a 12 x 16 patch image (not square,
        several windows, N = 48), patch axis dynamic as 4 x the merged-token axis."""
        import torch

        config = model.config.vision_config
        merge = config.spatial_merge_size
        grid = (1, 12, 16)
        layout = window_layout(grid, merge, config.window_size, config.patch_size)
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(math.prod(grid), patch_dim, generator=generator)
        merged = torch.export.Dim("merged", min=2, max=65536)
        patches = merge * merge * merged
        names = ("patch_positions", "window_index", "window_patch", "window_slot")
        inputs = (pixel_values, *(torch.from_numpy(layout[k]) for k in names))
        windows = torch.export.Dim("windows", min=1, max=65536)
        dynamic = ({0: patches}, {0: patches}, {0: merged}, {0: windows}, {0: patches})
        return inputs, dynamic, math.prod(grid) // (merge * merge)

    # -- contract: axes of one image's patches, merged tokens and windows ---------------------------------
    def runtime_dims(self, model) -> dict:
        vision = model.config.vision_config
        return {"merge_size": vision.spatial_merge_size,
                "window_units": vision.window_size // vision.patch_size // vision.spatial_merge_size}

    def axis_ranges(self, manifest, max_batch: int) -> dict[str, AxisRange]:
        """merged: an image's tokens, from M + 1 (fewer are refused) to N (max_pixels), typically a 448 px square;
        patches = merge² x merged; windows: 1 up to one per merged token (a one-token-wide image)."""
        low, high = manifest.budget["min"], manifest.budget["max"]
        typical = min(max(TYPICAL_IMAGE_TOKENS, low), high)
        unit = manifest.dims.get("merge_size", 2) ** 2
        per_side = math.ceil(math.isqrt(typical) / manifest.dims.get("window_units", 4))
        return {
            "merged": AxisRange(low, typical, high),
            "patches": AxisRange(unit * low, unit * typical, unit * high),
            "windows": AxisRange(1, min(per_side * per_side, high), high),
        }

    def vision_feeds(self, processor, images, budget: int | None, manifest):
        """One feed per image (its own patch count) and its merged grid (t, rows, cols) for the positions."""
        out = processor.image_processor(images, return_tensors="np")
        pixel_values = out["pixel_values"].astype(np.float32)  # [sum P, C·t·p·p]
        merge = processor.image_processor.merge_size
        patch = processor.image_processor.patch_size
        policy = self.budget_policy(manifest)
        feeds, layouts, offset = [], [], 0
        for t, h, w in out["image_grid_thw"].tolist():
            patches = t * h * w
            feed = {"pixel_values": np.ascontiguousarray(pixel_values[offset : offset + patches])}
            feed.update(window_layout((t, h, w), merge, processor.window_size, patch))
            feed["keep"] = np.array(policy.per_image(budget, patches // (merge * merge)), np.int64)
            feeds.append(feed)
            layouts.append((t, h // merge, w // merge))
            offset += patches
        return feeds, layouts

    def e2e_budgets(self, manifest) -> list[int]:
        """Two budgets (16 ~ the 30% default, 32) and no compression (the largest image's N; smaller images keep all)."""
        return self.budget_policy(manifest).within((16, 32, manifest.budget["max"]))

    def feed_label(self, feed: dict[str, np.ndarray]) -> str:
        t, rows, cols = grid_from_positions(feed["patch_positions"])
        return f"grid={t}x{rows}x{cols}"

    def position_ids(
        self, ids: list[int], image_token_id: int, layouts, keep_index, length: int | None = None
    ) -> tuple[np.ndarray, int]:
        """M-RoPE positions [3, 1, L] of the merged prompt (each image placeholder expanded to its kept tokens)
        and the rope delta (decode position = cache length + delta), as HF's get_rope_index computes them for
        the full grid, restricted to the kept tokens."""
        pieces, current, image = [], 0, 0
        for token in ids:
            if token != image_token_id:
                pieces.append(np.full((3, 1), current, np.int64))
                current += 1
                continue
            _, rows, cols = layouts[image]
            kept = np.asarray(keep_index[image], np.int64)  # [T] indices into the raster-order merged grid
            frame, cell = np.divmod(kept, rows * cols)
            pieces.append(np.stack([frame, cell // cols, cell % cols]) + current)  # [3, T]
            current += max(rows, cols)  # as HF: the next text position skips the image's extent
            image += 1
        positions = np.concatenate(pieces, axis=1)[:, None]  # [3, 1, L]
        return positions, int(positions.max()) + 1 - positions.shape[-1]

    def decode_position_ids(self, position: int, delta: int) -> np.ndarray:
        return np.full((3, 1, 1), position + delta, np.int64)


# Sizes of the tiny preset: 4 ViT blocks (2 of them full attention) + 4-layer text model, head dim 16.
TINY_VISION = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                   fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, tokens_per_second=2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 28 * 28 * 16, 28 * 28 * 64  # 16 .. 64 merged tokens per image


def build_random_qwen2_5_vl(out_dir: Path, seed: int = 0) -> None:
    """Write a randomly initialised Qwen2.5-VL checkpoint, tokenizer and image processor (no downloads)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from apet_export.models.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(
        extra_special_tokens=QWEN_SPECIAL_TOKENS, chat_template=QWEN_CHAT_TEMPLATE, eos_token="<|im_end|>"
    )
    token = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},  # sums to Dh/2
        **TINY_TEXT,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=TINY_VISION, image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"), vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"), tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # As for the LLaVA presets: widen the logit gaps so greedy parity is decided by the model, not rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(math.sqrt(TINY_TEXT["hidden_size"]))
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    model.save_pretrained(out_dir)
    QwenProcessor(tokenizer, image_processor, TINY_VISION["window_size"]).save_pretrained(out_dir)
