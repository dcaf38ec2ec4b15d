"""Image preprocessing from a build's saved processor config, in numpy and Pillow only (no torch, no transformers).

The numbers (sizes, crop, mean/std, resampling filter, grid pinpoints, pixel limits, patch sizes) are read from
the processor config that the build saved beside the checkpoint (DIR/model), and the arithmetic is that of
transformers' PIL-backend image processors (the ones the families load with backend="pil"), step by step:

    PIL image ─RGB (alpha composited onto white)─► uint8 [H, W, 3]
        ─resize (Pillow, the config's filter; target size rounded as transformers does)─►
        ─centre crop (offsets (H - h) // 2, (W - w) // 2; zero padding when smaller)─►
        ─rescale (uint8 · factor in float64, then float32)─► ─normalize ((x - mean) / std in float32)─►
        float32 [3, h, w]  (channels first, RGB order)

    CLIPImageProcessor, SiglipImageProcessor   resize (+ crop)                   pixel_values [B, 3, S, S]
    LlavaNextImageProcessor                    best grid pinpoint: resize to fit, pad centred, tiles; base image
                                               squashed to S x S in front      pixel_values [B, P, 3, S, S],
                                               (P padded to the batch's most)  image_sizes [B, 2] (h, w) int64
    Qwen2VLImageProcessor                      smart_resize to multiples of patch·merge within min/max pixels,
                                               patches in merge-block order, repeated over temporal_patch_size
                                               pixel_values [sum P, C·t·p·p], image_grid_thw [B, 3] (1, h, w) int64

`load_image_processor(model_dir)` returns an object the families use as they use `processor.image_processor`:
`processor(images, return_tensors="np")` and the attributes they read (size, crop_size, image_grid_pinpoints,
patch_size, merge_size, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from apet_export.checkpoint import read_json_object
from apet_export.errors import ArtifactError, InvalidInputError, UnknownNameError
from apet_export.models.llava_next import best_resolution  # the any-resolution grid: a fact of that family

PROCESSOR_FILE = "processor_config.json"  # a whole processor's config; the image processor under "image_processor"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"  # an image processor's config alone (older saves, Qwen2.5-VL)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
REPAIR = "re-save the processor"  # what to do about a saved config we cannot read
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the resampling filter of every type here unless the config names another
MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses a longer side over 200 x the shorter


class ImageProcessor:
    """Resize (+ centre crop), rescale, normalize: transformers' generic PIL-backend processor; the base of the
    others. With CLIP's defaults it is CLIPImageProcessor.

    The attributes are the config's numbers after transformers' defaults for the type: size and crop_size are
    dicts as saved ({"shortest_edge": S} or {"height": H, "width": W}), image_mean / image_std tuples of 3."""

    type_name = "CLIPImageProcessor"  # the image_processor_type a saved config names (without Fast / Pil)
    # transformers' class defaults for the type: what a config that omits a key gets
    defaults: dict = dict(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": 224}, resample=BICUBIC, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_pad=False, pad_size=None,
    )
    model_input_names = ("pixel_values",)

    def __init__(self, config: dict):
        values = {**self.defaults, **{k: v for k, v in config.items() if v is not None and k in self.defaults}}
        self.do_convert_rgb = bool(values["do_convert_rgb"])
        self.do_resize = bool(values["do_resize"])
        self.size = size_dict(values["size"], square=False)
        self.resample = int(values["resample"])  # a PIL.Image.Resampling value
        self.do_center_crop = bool(values["do_center_crop"])
        self.crop_size = size_dict(values["crop_size"], square=True) if values["crop_size"] is not None else None
        self.do_rescale = bool(values["do_rescale"])
        self.rescale_factor = float(values["rescale_factor"])
        self.do_normalize = bool(values["do_normalize"])
        self.image_mean = channel_values(values["image_mean"], "image_mean")
        self.image_std = channel_values(values["image_std"], "image_std")
        self.do_pad = bool(values["do_pad"])
        self.pad_size = size_dict(values["pad_size"], square=True) if values["pad_size"] is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.type_name}, size={self.size}, crop_size={self.crop_size})"

    def __call__(self, images, return_tensors: str = "np") -> dict[str, np.ndarray]:
        """PIL image(s) -> {"pixel_values": float32 [B, 3, h, w]} (the crop, or the resized size)."""
        check_return_tensors(return_tensors)
        pixels = [self.finish(self.crop(self.resize(self.rgb(image)))) for image in image_list(images)]
        if self.do_pad:
            pixels = self.pad(pixels)
        return {"pixel_values": stack(pixels, "pixel_values")}

    # -- the steps, each as transformers' PIL backend does it ------------------------------------------------
    def rgb(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 [H, W, 3]: transparency composited onto white, other modes through Pillow."""
        if not self.do_convert_rgb:
            if image.mode != "RGB":
                raise InvalidInputError(
                    f"this processor does not convert images to RGB (do_convert_rgb is false) and got mode "
                    f"{image.mode}: pass RGB images (apet_export.runtime.images.load_image reads any as RGB)"
                )
            return np.asarray(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))

    def resize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [h, w, 3] at the size the config's `size` gives for this image."""
        if not self.do_resize:
            return pixels
        return resize(pixels, target_size(pixels.shape[:2], self.size), self.resample)

    def crop(self, pixels: np.ndarray) -> np.ndarray:
        if not self.do_center_crop:
            return pixels
        return center_crop(pixels, (self.crop_size["height"], self.crop_size["width"]))

    def finish(self, pixels: np.ndarray) -> np.ndarray:
        """[h, w, 3] -> rescaled, normalized float32 [3, h, w]."""
        if self.do_rescale:  # as transformers: the product in float64, then float32
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = pixels.astype(np.float32)  # (transformers would keep uint8 without rescale and normalize)
        if self.do_normalize:  # float32 throughout, a division (not a multiplication by 1 / std), as transformers
            values = (values - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return np.ascontiguousarray(values.transpose(2, 0, 1))  # [3, h, w]

    def pad(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Zero-pad each [3, h, w] at the bottom and right to pad_size, or to the batch's largest h and w."""
        if self.pad_size is not None:
            height, width = self.pad_size["height"], self.pad_size["width"]
        else:
            height, width = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
        return [np.pad(p, ((0, 0), (0, height - p.shape[1]), (0, width - p.shape[2]))) for p in pixels]


class SiglipImageProcessor(ImageProcessor):
    """SigLIP: resized to size's height x width, no crop."""

    type_name = "SiglipImageProcessor"
    defaults = dict(ImageProcessor.defaults, size={"height": 224, "width": 224}, do_center_crop=False, crop_size=None,
                    image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)


class LlavaNextImageProcessor(ImageProcessor):
    """LLaVA-NeXT: the base image (squashed to S x S) followed by the S x S tiles of the best grid pinpoint.

    image_grid_pinpoints: [[h, w], ...] the tile grids' pixel sizes (multiples of S = crop_size["height"])."""

    type_name = "LlavaNextImageProcessor"
    defaults = dict(ImageProcessor.defaults, do_pad=True,
                    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    model_input_names = ("pixel_values", "image_sizes")

    def __init__(self, config: dict):
        super().__init__(config)
        pinpoints = config.get("image_grid_pinpoints") or self.defaults["image_grid_pinpoints"]
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in pinpoints]

    def __call__(self, images, return_tensors: str = "np") -> dict[str, np.ndarray]:
        """PIL image(s) -> pixel_values float32 [B, P, 3, S, S] (P: the most crops of the batch; an image with
        fewer is zero-padded after its crops) and image_sizes int64 [B, 2] (each image's (height, width))."""
        check_return_tensors(return_tensors)
        crops, sizes = [], []
        for image in image_list(images):
            pixels = self.rgb(image)
            crops.append(np.stack([self.finish(self.crop(self.resize(crop))) for crop in self.crops(pixels)]))
            sizes.append(pixels.shape[:2])
        if self.do_pad:  # pad the crop axis to the batch's most crops (zeros after normalisation)
            most = max(len(c) for c in crops)
            crops = [np.pad(c, ((0, most - len(c)), (0, 0), (0, 0), (0, 0))) for c in crops]
        return {"pixel_values": stack(crops, "pixel_values"), "image_sizes": np.array(sizes, dtype=np.int64)}

    def tile_side(self) -> int:
        """S: the side of a tile (crop_size height, else size)."""
        if self.crop_size is not None and self.crop_size.get("height"):
            return self.crop_size["height"]
        return self.size.get("height") or self.size["shortest_edge"]

    def crops(self, pixels: np.ndarray) -> list[np.ndarray]:
        """uint8 [H, W, 3] -> [base image [S', S', 3], tiles [S, S, 3] in row-major order] (uint8)."""
        height, width = pixels.shape[:2]
        best = best_resolution((height, width), self.image_grid_pinpoints)
        fitted = resize(pixels, fit_size((height, width), best), self.resample)  # aspect kept, inside `best`
        padded = pad_centred(fitted, best)
        side = self.tile_side()
        tiles = [padded[top : top + side, left : left + side]
                 for top in range(0, best[0], side) for left in range(0, best[1], side)]
        base_side = (self.size["height"], self.size["width"]) if "height" in self.size else \
            (self.size["shortest_edge"], self.size["shortest_edge"])
        return [resize(pixels, base_side, self.resample), *tiles]


class Qwen2VLImageProcessor(ImageProcessor):
    """Qwen2-VL / Qwen2.5-VL: dynamic resolution. Each image is resized to multiples of patch_size · merge_size
    with its pixel count within [min_pixels, max_pixels] (size's shortest_edge / longest_edge), then cut into
    patch_size² patches in merge-block order, each repeated temporal_patch_size times (a still image is a
    video of identical frames)."""

    type_name = "Qwen2VLImageProcessor"
    defaults = dict(
        ImageProcessor.defaults, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, do_center_crop=False,
        crop_size=None, patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    model_input_names = ("pixel_values", "image_grid_thw")

    def __init__(self, config: dict):
        config = dict(config)
        size = dict(config.get("size") or self.defaults["size"])
        size = {{"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}.get(k, k): v for k, v in size.items()}
        if config.get("min_pixels") is not None:  # older configs name the pixel limits min_pixels / max_pixels
            size["shortest_edge"] = config["min_pixels"]
        if config.get("max_pixels") is not None:
            size["longest_edge"] = config["max_pixels"]
        if not {"shortest_edge", "longest_edge"} <= size.keys():
            raise ValueError(f"size {size} lacks the pixel limits shortest_edge (min_pixels) and longest_edge (max_pixels)")
        super().__init__({**config, "size": size})
        self.patch_size = int(config.get("patch_size") or self.defaults["patch_size"])
        self.temporal_patch_size = int(config.get("temporal_patch_size") or self.defaults["temporal_patch_size"])
        self.merge_size = int(config.get("merge_size") or self.defaults["merge_size"])

    @property
    def min_pixels(self) -> int:
        return int(self.size["shortest_edge"])

    @property
    def max_pixels(self) -> int:
        return int(self.size["longest_edge"])

    def __call__(self, images, return_tensors: str = "np") -> dict[str, np.ndarray]:
        """PIL image(s) -> pixel_values float32 [sum P, C·t·p·p] (the images' patches one after another) and
        image_grid_thw int64 [B, 3]: (1, patch rows, patch columns) of each image."""
        check_return_tensors(return_tensors)
        patches, grids = [], []
        for image in image_list(images):
            pixels = self.rgb(image)
            if self.do_resize:
                pixels = resize(pixels, self.resized_size(pixels.shape[:2]), self.resample)
            values = self.finish(pixels)  # [C, h, w]
            image_patches, rows, cols = self.patchify(values)
            patches.append(image_patches)
            grids.append([1, rows, cols])
        return {"pixel_values": np.concatenate(patches), "image_grid_thw": np.array(grids, dtype=np.int64)}

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w): transformers' smart_resize with factor patch_size · merge_size."""
        return smart_resize(*size, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def patchify(self, values: np.ndarray) -> tuple[np.ndarray, int, int]:
        """[C, h, w] float32 -> ([rows·cols, C·t·p·p], rows, cols): patches grouped by merge block (block rows,
        block columns, row in block, column in block), each patch's values in (channel, frame, y, x) order."""
        channels, height, width = values.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        rows, cols = height // p, width // p
        blocks = values.reshape(channels, rows // m, m, p, cols // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))  # [.., C, t, p, p]
        return frames.reshape(rows * cols, channels * t * p * p), rows, cols


# image_processor_type as saved (the Fast / Pil variants of a type read the same numbers) -> our processor
PROCESSOR_TYPES: dict[str, type[ImageProcessor]] = {
    kind.type_name: kind for kind in (ImageProcessor, SiglipImageProcessor, LlavaNextImageProcessor, Qwen2VLImageProcessor)
}


def read_image_processor_config(model_dir: Path) -> tuple[dict, Path]:
    """(the image processor's saved config, the file it came from), looked up as transformers does: the
    "image_processor" entry of processor_config.json, else preprocessor_config.json."""
    model_dir = Path(model_dir)
    processor_file, image_file = model_dir / PROCESSOR_FILE, model_dir / IMAGE_PROCESSOR_FILE
    if processor_file.is_file():
        config = read_json_object(processor_file, REPAIR)
        if isinstance(config.get("image_processor"), dict):
            return config["image_processor"], processor_file
    if image_file.is_file():
        return read_json_object(image_file, REPAIR), image_file
    raise ArtifactError(
        f"{model_dir} has no image processor config ({PROCESSOR_FILE} with an image_processor entry, or "
        f"{IMAGE_PROCESSOR_FILE}): the build saves the model's processor there; rebuild it, or save the "
        f"processor into that folder with save_pretrained"
    )


def load_image_processor(model_dir: Path) -> ImageProcessor:
    """The image processor a build saved in model_dir (DIR/model), as a numpy/Pillow processor: UnknownNameError
    for an image_processor_type without one here, ArtifactError for a missing or unreadable config."""
    config, source = read_image_processor_config(model_dir)
    saved_type = str(config.get("image_processor_type", ""))
    base_type = saved_type.removesuffix("Fast").removesuffix("Pil")
    if base_type not in PROCESSOR_TYPES:
        # the build's model family saves a processor this runtime cannot reproduce: name it and what it can
        raise UnknownNameError(f"image processor type (image_processor_type in {source}; supported without torch)",
                               saved_type or "(none)", list(PROCESSOR_TYPES))
    try:
        return PROCESSOR_TYPES[base_type](config)
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{source} has an unusable {base_type} config ({error}): re-save the processor") from error


# -- the arithmetic shared by the processors (transformers' helpers, in numpy) ------------------------------------

def size_dict(size, square: bool) -> dict:
    """A saved size as a dict: an int is the shortest edge (size) or a square (crop_size, pad_size); a pair is
    (height, width), as transformers' get_size_dict reads old configs."""
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items() if v is not None}
    if isinstance(size, int):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    if isinstance(size, list | tuple) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"size {size!r} is not an int, a [height, width] pair or a dict")


def channel_values(values, name: str) -> tuple[float, float, float]:
    values = [float(values)] * 3 if isinstance(values, int | float) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} has {len(values)} values, not one per RGB channel")
    return tuple(values)


def check_return_tensors(return_tensors) -> None:
    if return_tensors != "np":
        raise InvalidInputError(f"return_tensors={return_tensors!r}: this processor returns numpy arrays only (pass 'np')")


def image_list(images) -> list[Image.Image]:
    images = [images] if isinstance(images, Image.Image) else list(images)
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InvalidInputError(
                f"image {index} is a {type(image).__name__}, not a PIL image: read it with "
                f"apet_export.runtime.images.load_image first"
            )
    if not images:
        raise InvalidInputError("no images to preprocess: pass at least one")
    return images


def stack(arrays: list[np.ndarray], name: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InvalidInputError(
            f"the images give {name} of different shapes {sorted(shapes)} (the processor neither crops nor pads "
            f"them to one size): pass one image per call"
        )
    return np.stack(arrays)


def resize(pixels: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [h, w, C] by Pillow (size is (h, w)), as transformers' PIL resize."""
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), resample=resample))


def target_size(size: tuple[int, int], config_size: dict) -> tuple[int, int]:
    """(h, w) to resize an (H, W) image to, as transformers' PIL backend reads `size`."""
    height, width = size
    if "shortest_edge" in config_size and "longest_edge" in config_size:
        return size_with_aspect_ratio(size, config_size["shortest_edge"], config_size["longest_edge"])
    if "shortest_edge" in config_size:  # the shorter side to shortest_edge, the longer scaled and truncated
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = config_size["shortest_edge"], int(config_size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "height" in config_size and "width" in config_size:
        return config_size["height"], config_size["width"]
    raise InvalidInputError(
        f"size {config_size} is not supported by the torch-free preprocessing: it reads {{height, width}}, "
        f"{{shortest_edge}} or {{shortest_edge, longest_edge}}"
    )


def size_with_aspect_ratio(size: tuple[int, int], shortest: int, longest: int) -> tuple[int, int]:
    """transformers' get_size_with_aspect_ratio: shorter side to `shortest` unless the longer would pass `longest`."""
    height, width = size
    raw = None
    if max(height, width) / min(height, width) * shortest > longest:
        raw = longest * min(height, width) / max(height, width)
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return (int(raw * height / width) if raw is not None else int(shortest * height / width)), shortest
    return shortest, (int(raw * width / height) if raw is not None else int(shortest * width / height))


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [h, w, C] around the centre (top = (H - h) // 2, left = (W - w) // 2); a side smaller than the
    crop is zero-padded first (centred, the odd pixel after), as transformers' center_crop."""
    height, width = pixels.shape[:2]
    crop_height, crop_width = size
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    canvas = np.zeros((new_height, new_width, pixels.shape[2]), pixels.dtype)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_height, top + crop_height), max(0, left) : min(new_width, left + crop_width)]


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """transformers' get_patch_output_size: (h, w) of the image scaled to fit inside target, the fitted side
    exact and the other rounded up (at most the target's)."""
    height, width = size
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def pad_centred(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w, C] -> [H, W, C] with zeros around, centred (the odd pixel after), as LLaVA-NeXT pads for tiling."""
    top, extra_h = divmod(size[0] - pixels.shape[0], 2)
    left, extra_w = divmod(size[1] - pixels.shape[1], 2)
    return np.pad(pixels, ((top, top + extra_h), (left, left + extra_w), (0, 0)))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart_resize: (h, w) multiples of factor, nearest to the image's, its pixels within
    [min_pixels, max_pixels] at the image's aspect ratio."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidInputError(
            f"an image of {width}x{height} pixels has an aspect ratio over {MAX_ASPECT_RATIO}:1, which this model's "
            f"processor refuses: crop or pad it to a squarer shape"
        )
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
