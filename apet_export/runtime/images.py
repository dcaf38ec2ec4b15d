"""Reading images with clear errors, and deterministic synthetic images for checks and demos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from apet_export.errors import ImageError


def load_image(path: str | Path) -> Image.Image:
    """An RGB PIL image; a missing, unreadable or non-image file raises ImageError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist: pass the path of a PNG/JPEG/WebP file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ImageError(f"{path} is not a readable image ({error}): pass a PNG/JPEG/WebP file") from error


def synthetic_image(seed: int = 0, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A deterministic test picture: a colour gradient with a few solid shapes and mild noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 40 + seed)], axis=-1) * 255
    for _ in range(4):  # rectangles of random colour
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        base[y0 : y0 + rng.integers(20, 120), x0 : x0 + rng.integers(20, 120)] = rng.integers(0, 256, 3)
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
