"""One image loader for every path (run, calibrate, parity, visualize, the Python API, video frames), and
deterministic synthetic images for checks and demos.

An image is read as an image viewer shows it, always as 8-bit RGB:
- EXIF orientation is applied (a portrait phone photo stays upright).
- Transparency (LA, RGBA, PA, P with a transparent colour) is composited onto white.
- 1, L, P, CMYK, YCbCr: Pillow's conversion. 16-bit grey (I;16, I;16B, I;16L, ...): 0..65535 -> 0..255.
- I (32-bit integer): scaled by the bit depth the file declares (TIFF BitsPerSample: 32 -> 0..2^32-1 if
  unsigned, 0..2^31-1 if signed; a 16-bit PNG -> 0..65535); an in-memory image declares none, so the
  smallest of 8 / 16 / 32 bits that holds its largest value. Negative values have no display scale: refused.
- F (32-bit float): 0..1 is black..white (as float pictures are stored); a TIFF that declares its range
  (SMinSampleValue / SMaxSampleValue) is scaled by that range. Anything else (e.g. 0..255 floats, depth in
  metres, NaN) has no right scale: refused with the range found.
- numpy arrays [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (RGBA): uint8 is 0..255, uint16 0..65535, other
  integer types 0..255, bool 0/1, float 0..1; values outside the convention are refused, never rescaled.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from apet_export.errors import ImageError
from apet_export.paths import require_file

MAX_ASPECT_RATIO = 100  # longer side / shorter side; processors resize the shorter side up, so 20000x2 would need ~1G pixels
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey PNG/TIFF
TRANSPARENT_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white
IMAGE_TYPES = "a file path (str or Path), a PIL image, or a numpy array [H, W] / [H, W, 3] / [H, W, 4]"
FILE_HINT = "pass the path of a PNG/JPEG/WebP file"


def load_image(image, name: str | None = None) -> Image.Image:
    """An 8-bit RGB PIL image from a path, a PIL image or a numpy array, read as an image viewer shows it
    (see the module docstring). ImageError (naming the file) for a missing, unreadable or non-image file, a
    folder, FIFO or device, a decompression bomb, an extreme aspect ratio, a pixel format without a right
    scale, or an object of another type."""
    if isinstance(image, np.ndarray):
        return from_array(image, name or "the image array")
    if isinstance(image, Image.Image):
        return to_rgb(image, name or "the image")
    if not isinstance(image, str | os.PathLike):
        raise ImageError(f"an image of type {type(image).__name__} cannot be read: pass {IMAGE_TYPES}")
    path = require_file(Path(image), "an image", ImageError, FILE_HINT)
    try:
        with warnings.catch_warnings():  # check_size reports an oversized image as an error instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)  # reads the header only: the size is checked before decoding
        with opened:
            return to_rgb(opened, str(path))
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path} is too large to decode safely ({error}): downscale it first") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageError(f"{path} is not a readable image ({error}): {FILE_HINT}") from error


def check_dimensions(width: int, height: int, name: str) -> None:
    """Reject what would exhaust memory before anything is decoded or resized."""
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


def check_size(image: Image.Image, name: str) -> None:
    check_dimensions(*image.size, name)


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB as a viewer shows it: size checked first, then EXIF orientation, then the mode's scale."""
    check_size(image, name)
    source = image  # the file's tags (bit depth, sample range): exif_transpose returns a copy without them
    image = ImageOps.exif_transpose(image)  # decodes; the size was checked from the header
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return grey_from_unit(_integer_unit(image, source, name))
    if mode == "F":
        return grey_from_unit(_float_unit(image, source, name))
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:  # a mode Pillow cannot convert (e.g. LAB)
        raise ImageError(f"{name} has pixel mode {mode}, which cannot be shown as RGB ({error}): save it as RGB") from error


def grey_from_unit(values: np.ndarray) -> Image.Image:
    """[H, W] floats in 0..1 -> 8-bit RGB grey."""
    return Image.fromarray(np.round(values * 255).astype(np.uint8), "L").convert("RGB")


def _declared_bits(image: Image.Image) -> tuple[int | None, bool]:
    """(bits per sample, signed) the file declares: TIFF tags 258 / 339, 16 for a 16-bit PNG; None if unknown."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = tags.get(339, 1)
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        return int(bits), sample_format == 2
    if image.format == "PNG":
        return 16, False  # Pillow opens only 16-bit grey PNGs as I / I;16
    return None, False


def _integer_unit(image: Image.Image, source: Image.Image, name: str) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    if image.mode in SIXTEEN_BIT_MODES:
        return values / 65535
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise ImageError(
            f"{name} holds signed 32-bit values ({low:g} to {high:g}): negative values have no display scale: "
            f"save it as 8- or 16-bit unsigned"
        )
    bits, signed = _declared_bits(source)
    if bits is None:  # an in-memory image: the smallest usual depth that holds its values
        bits = next(b for b in (8, 16, 32) if high <= 2**b - 1)
    full = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return np.clip(values / full, 0, 1)


def _float_unit(image: Image.Image, source: Image.Image, name: str) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    if not np.isfinite(values).all():
        raise ImageError(f"{name} is a float image with NaN or infinite values: no display scale is right: save it as 8-bit")
    low, high = float(values.min()), float(values.max())
    tags = getattr(source, "tag_v2", None)
    if tags is not None and 340 in tags and 341 in tags:  # SMinSampleValue / SMaxSampleValue: the file's range
        first = lambda v: float(v[0] if isinstance(v, tuple) else v)  # noqa: E731
        smallest, largest = first(tags[340]), first(tags[341])
        if largest > smallest:
            return np.clip((values - smallest) / (largest - smallest), 0, 1)
    if low < -1e-6 or high > 1 + 1e-6:
        raise ImageError(
            f"{name} is a 32-bit float image with values {low:g} to {high:g}; float pictures are read as 0..1 "
            f"and no other scale is certain: save it as 8- or 16-bit, or as float in 0..1"
        )
    return np.clip(values, 0, 1)


def from_array(array: np.ndarray, name: str) -> Image.Image:
    """A numpy picture [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> 8-bit RGB. uint8: 0..255; uint16:
    0..65535; other integers: 0..255; bool: 0/1; float: 0..1. Values outside the convention are refused."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        hint = " (channels first? pass [H, W, C]: array.transpose(1, 2, 0))" if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"{name} has shape {list(array.shape)}, not [H, W], [H, W, 3] or [H, W, 4]{hint}")
    check_dimensions(array.shape[1], array.shape[0], name)
    if array.dtype == np.uint8:
        pixels = array
    else:
        if array.dtype == np.bool_:
            unit = array.astype(np.float64)
        elif array.dtype == np.uint16:
            unit = array / 65535
        elif np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
            integer = np.issubdtype(array.dtype, np.integer)
            values = array.astype(np.float64)
            if not np.isfinite(values).all():
                raise ImageError(f"{name} has NaN or infinite values: pass finite pixel values")
            low, high = (0, 255) if integer else (0.0, 1.0)
            found_low, found_high = float(values.min()), float(values.max())
            if found_low < low or found_high > high:
                fix = "pass uint8 (0..255) or uint16 (0..65535)" if integer else \
                    "divide by 255 if these are 8-bit values, or pass uint8"
                raise ImageError(
                    f"{name} is {array.dtype} with values {found_low:g} to {found_high:g}, outside the {low:g}..{high:g} "
                    f"that {array.dtype} pictures are read as: {fix}"
                )
            unit = values / 255 if integer else values
        else:
            raise ImageError(f"{name} has dtype {array.dtype}: pass uint8 (0..255) or float (0..1) pixels")
        pixels = np.round(unit * 255).astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1] if pixels.ndim == 3 else 2]
    return to_rgb(Image.fromarray(np.ascontiguousarray(pixels), mode), name)


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
