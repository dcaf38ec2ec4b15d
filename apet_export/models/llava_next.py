"""LLaVA-NeXT family: transformers LlavaNextForConditionalGeneration, any-resolution tiling.

    image ─processor─► crops [P, 3, S, S]: the base image (resized whole) + the tiles of the best grid
        ─vision graph (the LLaVA one, batch = crops)─► per crop: T kept rows [P, T, H] + keep_index [P, T]
    packing (numpy, here): base crop's T rows, then the tiles' kept rows laid out on the full tile grid,
        the padding rows/columns removed (HF unpad_image) and one image_newline row ending every grid row:
        [T + kept-after-unpad + grid rows, H] → the LLM, where the prompt has <image>

This is the released ApET code's LLaVA-NeXT path (llava/model/llava_arch.py): stage 1 on every crop
independently with the same budget per crop, the kept tokens scattered back through an index mask, the
spatial_unpad packing applied to mask and features alike, image_newline always kept. The request's budget
is for the whole image and is split evenly across its crops (the paper's 640/320/160 tokens for
5 crops = 128/64/32 per crop); kept tokens that fall into the unpadded border are dropped with it, as
in the released code. With no compression the rows equal HF's pack_image_features exactly.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apet_export.compression.budget import BudgetPolicy
from apet_export.config import AxisRange, TensorSpec
from apet_export.errors import InvalidInputError
from apet_export.models.base import VisionDims, rename_axis
from apet_export.models.llava import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TINY_TEXT, TINY_TOWER, LlavaFamily

if TYPE_CHECKING:  # imported where the model runs: the runtime hooks need neither torch nor transformers
    import torch


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    fixed_image_rows = False  # rows per image depend on its crops, unpadding and newlines
    model_class = "LlavaNextForConditionalGeneration"

    def extra_tensors(self, model) -> dict[str, torch.Tensor]:
        return {"image_newline": model.model.image_newline.detach().float()}  # [H]

    def runtime_dims(self, model) -> dict:
        return {"image_grid_pinpoints": model.config.image_grid_pinpoints}

    # -- contract: the vision batch is the crops of one image; the budget is for the whole image ----------
    budget_unit = "crops"
    # a whole image's budget, split across its crops (5 at most): 32 per crop at 5 crops, and a two-stage
    # build's default split (240 / 80) still keeps more than M = 10 rows of every crop at both stages
    default_budget = 160
    batched_feeds = False  # one feed per image: its crops

    def vision_io(self, dims: VisionDims, model=None) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """As LLaVA's, with the batch axis named `crops`: one call encodes the crops of an image (up to 5)."""
        inputs, outputs = super().vision_io(dims, model)
        return rename_axis(inputs, "batch", "crops"), rename_axis(outputs, "batch", "crops")

    def stage2_span(self, manifest, budget2: int, keep_index: np.ndarray) -> tuple[int, int]:
        """The released LLM stage compresses the base image's tokens only (192 -> 64) and leaves the tiles alone:
        the span is the base crop's T rows, which pack_crops puts first; budget2 is split across the image's
        crops as the stage-1 budget is, and the base crop's share is what stage 2 keeps."""
        crops, rows = keep_index.shape  # [P, T]
        keep = min(budget2 // crops, rows)
        if keep <= manifest.compression.num_basis:
            raise InvalidInputError(
                f"stage-2 budget {budget2} over this image's {crops} crops keeps {keep} rows of the base image, not "
                f"more than num_basis={manifest.compression.num_basis}: pass at least "
                f"{(manifest.compression.num_basis + 1) * crops}"
            )
        return rows, keep

    def axis_ranges(self, manifest, max_batch: int) -> dict[str, AxisRange]:
        crops = max_crops(manifest)
        return {"crops": AxisRange(1, crops, crops * max_batch)}  # max_batch images of the most crops each

    def budget_policy(self, manifest) -> BudgetPolicy:
        """A whole image's budget over at most max_crops crops; its rows add one image_newline per grid row
        of the tallest tile grid."""
        side, grid = manifest.dims["image_size"], math.isqrt(manifest.dims["num_image_tokens"])
        newlines = max(h // side for h, _ in manifest.dims["image_grid_pinpoints"]) * grid
        return replace(super().budget_policy(manifest), max_units=max_crops(manifest), extra_rows=newlines)

    def _crops(self, processor, images):
        out = processor.image_processor(images, return_tensors="np")
        pinpoints, side = processor.image_processor.image_grid_pinpoints, processor.image_processor.crop_size["height"]
        for pixel_values, size in zip(out["pixel_values"], out["image_sizes"], strict=True):
            count = crops_of(tuple(int(s) for s in size), pinpoints, side)
            yield pixel_values[:count].astype(np.float32), tuple(int(s) for s in size)  # [P, 3, S, S], (h, w)

    def vision_feeds(self, processor, images, budget: int | None, manifest):
        """One feed per image: its crops [P, 3, S, S] at budget // P each (calls of different crop counts)."""
        feeds = [feed for feed, _ in self._feeds(processor, images, budget, manifest)]
        return feeds, [None] * len(feeds)

    def _feeds(self, processor, images, budget: int | None, manifest):
        """(feed, image size (h, w)) per image."""
        policy = self.budget_policy(manifest)
        for crops, size in self._crops(processor, images):
            yield {"pixel_values": crops, "keep": np.array(policy.per_crop(budget, len(crops)), np.int64)}, size

    def encode_images(self, infer, processor, manifest, images, budget: int | None, extras=None):
        """Per image: its crops through the vision graph at budget // crops each, then packed (pack_crops).
        keep_index per image is [P, T] (per crop); positions are 1-D over the packed rows. extras: the
        build's image_newline [H]."""
        newline = extras["image_newline"]
        rows, keep_index = [], []
        for feed, size in self._feeds(processor, images, budget, manifest):
            vision = infer(feed)
            rows.append(pack_crops(
                vision["image_embeds"], vision["keep_index"], size, manifest.dims["image_grid_pinpoints"],
                manifest.dims["image_size"], math.isqrt(manifest.dims["num_image_tokens"]), newline,
            ))
            keep_index.append(vision["keep_index"])
        return rows, [None] * len(rows), keep_index


# -- the any-resolution grid (numpy: the runtime packs rows without torch) ---------------------------------

def best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The grid pinpoint (height, width) an image of image_size (height, width) is tiled at: the one that keeps
    the most of the image's pixels when it is scaled to fit, then the one that wastes the least (the
    processor's and the model's rule; the first pinpoint wins a tie)."""
    height, width = image_size
    best, best_kept, best_wasted = None, 0, math.inf
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (pin_height, pin_width), kept, wasted
    return best


def tile_grid(image_size: tuple[int, int], pinpoints, side: int) -> tuple[int, int]:
    """(tile rows, tile columns) of the image's best pinpoint, tiles of side x side pixels."""
    height, width = best_resolution(image_size, pinpoints)
    return height // side, width // side


def crops_of(image_size: tuple[int, int], pinpoints, side: int) -> int:
    """Crops of one image: the base image + one per tile (the processor pads every image's crops to the most)."""
    height, width = best_resolution(image_size, pinpoints)
    return math.ceil(height / side) * math.ceil(width / side) + 1


def unpad_cells(cells: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """cells [Gh, Gw, C] of the tile grid -> the rows/columns that hold the image, without the padding the
    processor added around it to fit the pinpoint (centred: equal padding on both sides), as HF unpad_image."""
    height, width = image_size
    grid_height, grid_width = cells.shape[:2]
    if width / height > grid_width / grid_height:  # wider than the grid: padded above and below
        padding = (grid_height - int(round(height * (grid_width / width), 7))) // 2
        return cells[padding : grid_height - padding]
    padding = (grid_width - int(round(width * (grid_height / height), 7))) // 2
    return cells[:, padding : grid_width - padding]


def max_crops(manifest) -> int:
    """The most crops of one image: the base image + the tiles of the largest grid pinpoint."""
    side = manifest.dims["image_size"]
    return 1 + max((h // side) * (w // side) for h, w in manifest.dims["image_grid_pinpoints"])


def pack_crops(
    embeds: np.ndarray, index: np.ndarray, image_size, pinpoints, side: int, grid: int, newline: np.ndarray
) -> np.ndarray:
    """Kept rows of the crops of one image -> the LLM rows, as HF pack_image_features + the released index mask.

    embeds [P, T, H] and index [P, T] (ascending positions on a crop's grid x grid patches) -> [L, H]:
        base crop rows (T) ‖ tile grid (nh·g rows × nw·g columns) with only kept cells, unpadded,
        each remaining grid row followed by image_newline.
    """
    crops, _, hidden = embeds.shape
    if crops == 1:  # no tiles: HF appends one newline to the base crop
        return np.concatenate([embeds[0], newline[None]])
    tiles_high, tiles_wide = tile_grid(image_size, pinpoints, side)
    cells = np.zeros((tiles_high * grid, tiles_wide * grid, hidden + 1), np.float32)  # features + kept flag
    for tile in range(crops - 1):
        tile_row, tile_col = divmod(tile, tiles_wide)  # tiles in row-major order
        row, col = np.divmod(index[tile + 1], grid)
        cells[tile_row * grid + row, tile_col * grid + col, :hidden] = embeds[tile + 1]
        cells[tile_row * grid + row, tile_col * grid + col, hidden] = 1.0
    unpadded = unpad_cells(cells, image_size)  # [h, w, H + 1]
    height = unpadded.shape[0]
    with_newline = np.concatenate([unpadded, np.broadcast_to(np.append(newline, 1.0), (height, 1, hidden + 1))], axis=1)
    flat = with_newline.reshape(-1, hidden + 1)
    return np.concatenate([embeds[0], flat[flat[:, hidden] > 0.5, :hidden]]).astype(embeds.dtype)


# LLaVA-1.6's grid pinpoints: 1x2, 2x1, 2x2, 3x1, 1x3 tiles of 336 px (plus the base image: up to 5 crops).
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_random_llava_next(out_dir: Path, tower_size: dict = TINY_TOWER, text_size: dict = TINY_TEXT, seed: int = 0) -> None:
    """Write a randomly initialised LLaVA-NeXT checkpoint (CLIP 336px/14 + Llama, any-resolution) and processor."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from apet_export.models.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(max_length=8192)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=8192,  # 5 crops x 576 + newlines uncompressed ~ 2.9k
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, **text_size,
    )
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **tower_size)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text_config, image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # as the LLaVA presets: wider logit gaps; image_newline is initialised like HF's
        model.lm_head.weight.mul_(math.sqrt(text_config.hidden_size))
        model.model.image_newline.normal_(0, 1 / math.sqrt(text_config.hidden_size))
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_pad=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>",
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
