"""Calibration data: a deterministic sample of images from a folder, prompts, and streamed batches.

    FOLDER (recursive) ─► files Pillow can open, sorted ─► seeded permutation ─► first N readable
                                                                                    │ (unreadable: skipped, counted)
    CalibrationSet(images, prompts) ─► the family's vision feeds (ModelFamily.vision_feeds: LLaVA
                                       {pixel_values [B, 3, S, S], keep []}, LLaVA-NeXT one image's crops,
                                       Qwen2.5-VL one image's patches + window layout), one per get_next(),
                                       each image opened and preprocessed only when it is asked for
                                   ─► LLM prefill feeds: the family's rows and positions, as the runtime

Nothing is loaded up front: a reader holds file paths and opens B images per call, so the calibration's
memory does not grow with the number of samples.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from apet_export.errors import CalibrationDataError, ImageError
from apet_export.paths import kind_of, require_file
from apet_export.runtime.images import load_image

# Prompts used when no --prompts file is given: short instructions of the kind a VLM is asked.
BUILTIN_PROMPTS = (
    "Describe the image in detail.",
    "What is in this picture?",
    "List the objects you can see.",
    "What colours dominate the image?",
    "Is there any text in the image? Read it.",
    "Where could this photo have been taken?",
    "Describe the background of the image.",
    "How many distinct objects are there?",
)


@dataclass
class CalibrationSet:
    """The images (in sample order) and prompts one calibration uses, and what was skipped."""

    folder: Path
    images: list[Path]
    prompts: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it could not be read)
    seed: int = 0

    def fingerprint(self) -> str:
        """sha256 of the sampled images (relative path + bytes) and the prompts: same data, same hash."""
        digest = hashlib.sha256()
        for path in self.images:
            digest.update(str(path.relative_to(self.folder)).encode() + b"\0")
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        for prompt in self.prompts:
            digest.update(prompt.encode() + b"\0")
        return digest.hexdigest()


def pillow_suffixes() -> set[str]:
    """File suffixes Pillow has a decoder for (.png, .jpg, .webp, .tif, ...)."""
    Image.init()
    return {suffix.lower() for suffix, name in Image.registered_extensions().items() if name in Image.OPEN}


def find_images(folder: Path) -> list[Path]:
    """Every file under folder (recursively) with a suffix Pillow reads, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        kind = kind_of(folder)
        what = "does not exist" if kind == "missing" else f"is {kind or 'a file'}, not a folder"
        raise CalibrationDataError(f"calibration image folder {folder} {what}: pass --images FOLDER")
    suffixes = pillow_suffixes()
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not found:
        raise CalibrationDataError(
            f"{folder} contains no image files (looked recursively for {', '.join(sorted(suffixes)[:8])}, ...): "
            f"put PNG/JPEG/WebP pictures representative of your inputs there"
        )
    return found


def readable(path: Path) -> str | None:
    """None if the runtime's image loader accepts the file, else the reason it refuses it (unreadable,
    truncated, a decompression bomb, an extreme aspect ratio, a pixel format without a right scale)."""
    try:
        load_image(path)  # decodes the pixels: a truncated file fails here, not in the reader
    except ImageError as error:
        return str(error)
    return None


def read_prompts(path: Path | None) -> list[str]:
    """One prompt per non-empty line of the file, or the built-in set."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    path = require_file(Path(path), "a prompts file", CalibrationDataError, "a text file with one prompt per line")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise CalibrationDataError(
            f"prompts file {path} is not UTF-8 text (byte {raw[error.start:error.start + 1]!r} on line {line}): "
            f"save it as UTF-8"
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CalibrationDataError(f"prompts file {path} has no prompts: write one prompt per line, or omit --prompts")
    return prompts


def select_images(folder: Path, samples: int, prompts_file: Path | None = None, seed: int = 0) -> CalibrationSet:
    """A deterministic sample of `samples` readable images: the same folder and seed give the same list.

    Unreadable files are skipped and counted; an error if none remain, or if fewer than `samples` do.
    """
    if samples < 1:
        raise CalibrationDataError(f"--samples must be >= 1, got {samples}")
    prompts = read_prompts(prompts_file)
    candidates = find_images(folder)
    order = np.random.default_rng(seed).permutation(len(candidates))
    chosen: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for index in order:
        if len(chosen) == samples:
            break
        path = candidates[int(index)]
        reason = readable(path)
        if reason is None:
            chosen.append(path)
        else:
            skipped.append((path, reason))
    if not chosen:
        raise CalibrationDataError(
            f"none of the {len(candidates)} image files in {folder} could be read (first: {skipped[0][0]}: "
            f"{skipped[0][1]}): add readable PNG/JPEG/WebP pictures"
        )
    if len(chosen) < samples:
        raise CalibrationDataError(
            f"{folder} has {len(chosen)} readable images ({len(skipped)} unreadable skipped) but --samples is "
            f"{samples}: add images, or pass --samples {len(chosen)}"
        )
    return CalibrationSet(Path(folder), chosen, prompts, skipped, seed)


def load_processor(build_dir: Path, manifest):
    """The processor saved with the build (DIR/model), loaded by its family as the runtime loads it."""
    from apet_export.models.registry import get_family

    return get_family(manifest.family).load_processor(manifest.model_dir(build_dir))


def picture_batches(images: list[Path], batch_size: int = 1) -> Iterator[list[Image.Image]]:
    """RGB pictures per batch; each batch's files are opened only when it is reached."""
    for start in range(0, len(images), batch_size):
        pictures = []
        for path in images[start : start + batch_size]:
            pictures.append(load_image(path))  # as the runtime reads it (orientation, bit depth, alpha)
        yield pictures


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over an iterator of feeds, `limit` feeds per pass.

    The calibrator reads a reader until get_next() returns None; histogram calibrators keep every
    intermediate output of a pass in memory. Passing the same FeedReader again after it has returned
    None continues with the next `limit` feeds, so memory is bounded by `limit`, not by the sample count.
    """

    def __init__(self, feeds: Iterator[dict], total: int, limit: int | None = None):
        self.feeds, self.total = feeds, total
        self.limit = limit or total
        self.delivered = 0  # feeds handed out so far, over all passes
        self._in_pass = 0

    @property
    def passes(self) -> int:
        return math.ceil(self.total / self.limit)

    def get_next(self) -> dict | None:
        if self._in_pass == self.limit or self.delivered == self.total:
            self._in_pass = 0  # the next call starts the next pass
            return None
        feed = next(self.feeds)
        self._in_pass += 1
        self.delivered += 1
        return feed

    def __len__(self) -> int:
        return self.total


def vision_feeds(data: CalibrationSet, family, processor, manifest, budget: int | None, batch_size: int = 1) -> FeedReader:
    """Feeds of vision.onnx as the family builds them for the runtime (ModelFamily.vision_feeds) at the
    request budget `budget` (None: the family's share): batch_size images per feed where the family batches
    images into one feed (LLaVA, video frames), one feed per image otherwise (crops, dynamic resolution)."""
    batch_size = batch_size if family.batched_feeds else 1
    feeds = (
        feed
        for pictures in picture_batches(data.images, batch_size)
        for feed in family.vision_feeds(processor, pictures, budget, manifest)[0]
    )
    return FeedReader(feeds, math.ceil(len(data.images) / batch_size))


def llm_feeds(data: CalibrationSet, pipeline, budget: int | None) -> FeedReader:
    """Prefill feeds of llm.onnx from image i + prompt i (mod the prompt count), as the runtime builds them
    (the family's rows and positions: 1-D, or M-RoPE [3, 1, L]):
    {inputs_embeds [1, L, H], attention_mask [1, L], position_ids [(3,) 1, L], past_* [1, Hkv, 0, Dh]}.
    `pipeline` is an fp32 Pipeline of the source build: it runs the vision graph and embeds the text."""
    family, image_token_id = pipeline.family, pipeline.manifest.dims["image_token_id"]

    def feeds():
        for i, (picture,) in enumerate(picture_batches(data.images, 1)):
            ids = pipeline.prompt_ids(data.prompts[i % len(data.prompts)], 1)  # a picture is a 1-frame video there
            rows, layouts, keep_index = pipeline.encode_images([picture], budget)  # [L_i, H] per image
            embeds = pipeline.merge_embeddings(ids, rows)  # [1, L, H]
            length = embeds.shape[1]
            positions, _ = family.position_ids(ids, image_token_id, layouts, keep_index, length=length)
            yield {
                "inputs_embeds": embeds.astype(np.float32),
                "attention_mask": np.ones((1, length), np.int64),
                "position_ids": positions,
                **pipeline.backend.new_cache(1).feed(),
            }

    return FeedReader(feeds(), len(data.images))
