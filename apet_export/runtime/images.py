"""Reading images with clear errors, and deterministic synthetic images for checks and demos."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from apet_export.errors import ImageError

MAX_ASPECT_RATIO = 100  # longer side / shorter side; processors resize the shorter side up, so 20000x2 would need ~1G pixels
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey PNG/TIFF


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or a PIL image; ImageError (naming the file) for a missing, unreadable
    or non-image file, a folder, a decompression bomb or an extreme aspect ratio."""
    if isinstance(image, Image.Image):
        return to_rgb(image, "the image")
    path = Path(image)
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image: pass the path of a PNG/JPEG/WebP file")
    if not path.is_file():
        raise ImageError(f"image {path} does not exist: pass the path of a PNG/JPEG/WebP file")
    try:
        with warnings.catch_warnings():  # check_size reports an oversized image as an error instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)  # reads the header only: the size is checked before decoding
        with opened:
            return to_rgb(opened, str(path))
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path} is too large to decode safely ({error}): downscale it first") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ImageError(f"{path} is not a readable image ({error}): pass a PNG/JPEG/WebP file") from error


def check_size(image: Image.Image, name: str) -> None:
    """Reject what would exhaust memory before anything is decoded or resized."""
    width, height = image.size
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height / 1e6:.0f} M pixels, over the limit of "
            f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} M (a decompression bomb, or simply too large): downscale it first"
        )
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{name} is {width}x{height} pixels, an aspect ratio beyond {MAX_ASPECT_RATIO}:1 (the model resizes "
            f"its shorter side, which would need gigabytes): crop or pad it to a squarer shape"
        )


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB. 16-bit grey is scaled to 8 bits (PIL's convert would clip it: almost all white)."""
    check_size(image, name)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)  # [H, W] in 0..65535
        image = Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


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
