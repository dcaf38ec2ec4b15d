"""The torch-free image preprocessing (apet_export/runtime/preprocess.py) against transformers' own processors.

Every tiny preset's saved processor, read by load_image_processor, must give what the family's transformers
processor (loaded as the families load it: backend="pil") gives: the same keys, shapes and dtypes, the same
integers, and the same pixel values (tolerance 0: both resize with Pillow and do the same float32 arithmetic).
The Qwen2.5-VL window layout (numpy) must equal transformers' vision_utils helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from apet_export.errors import ArtifactError, InvalidInputError, UnknownNameError
from apet_export.models.llava_next import best_resolution
from apet_export.models.qwen2_5_vl import window_layout
from apet_export.models.registry import PRESETS, get_family
from apet_export.runtime import preprocess
from apet_export.runtime.images import load_image, synthetic_image
from apet_export.runtime.preprocess import load_image_processor

TINY_PRESETS = ("tiny-llava", "tiny-llava-siglip-qwen2", "tiny-llava-next", "tiny-video-llava", "tiny-qwen2.5-vl")
PIXEL_TOLERANCE = 0.0  # largest |ours - transformers| allowed in pixel_values


@pytest.fixture(scope="session")
def saved_processors(tmp_path_factory) -> dict:
    """preset -> its checkpoint directory as the preset's builder writes it (what `build` copies to DIR/model, the
    processor config included); a few seconds for all five, no export."""
    root = tmp_path_factory.mktemp("preset_checkpoints")
    for name in TINY_PRESETS:
        PRESETS[name].build(root / name)
    return {name: root / name for name in TINY_PRESETS}


def transformers_processor(preset: str, model_dir):
    """The image processor the family loads today (transformers, PIL backend)."""
    return get_family(PRESETS[preset].family).load_processor(model_dir).image_processor


def noise(seed: int, width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def sample_images() -> list[Image.Image]:
    """Pictures through the project's loader: tiny, odd, portrait / landscape, large, 100:1 (the loader's limit),
    shapes that pick each LLaVA-NeXT pinpoint, grey and RGBA arrays, a palette image with transparency."""
    pictures = [
        noise(0, 7, 5), noise(1, 5, 7), noise(2, 1, 1), synthetic_image(3, (333, 211)), synthetic_image(4, (211, 333)),
        synthetic_image(5, (1500, 1100)), noise(6, 1000, 10), noise(7, 10, 1000), synthetic_image(8, (672, 336)),
        synthetic_image(9, (336, 1008)), synthetic_image(10, (700, 690)), synthetic_image(11, (1120, 336)),
        noise(12, 97, 61, channels=1), noise(13, 90, 60, channels=4),
    ]
    palette = synthetic_image(14, (80, 64)).convert("P")
    palette.info["transparency"] = 0
    pictures.append(palette)
    return [load_image(picture) for picture in pictures]


def raw_images() -> list[Image.Image]:
    """Images handed to the processor without the loader: the processor's own RGB conversion (alpha onto white)."""
    rgba = Image.fromarray(noise(20, 45, 31, channels=4), "RGBA")
    grey = Image.fromarray(noise(21, 31, 45, channels=1), "L")
    return [rgba, grey, Image.fromarray(noise(22, 50, 40, channels=2)[..., 0], "L").convert("LA")]


def assert_same_outputs(ours: dict, theirs, label: str) -> float:
    """Same keys, shapes, dtypes; integers exact; the largest pixel difference (checked against the tolerance)."""
    assert set(ours) == set(theirs.keys()), label
    largest = 0.0
    for key, expected in theirs.items():
        expected, got = np.asarray(expected), ours[key]
        assert got.shape == expected.shape and got.dtype == expected.dtype, \
            f"{label} {key}: {got.shape} {got.dtype} vs transformers {expected.shape} {expected.dtype}"
        if np.issubdtype(expected.dtype, np.integer):
            np.testing.assert_array_equal(got, expected, err_msg=f"{label} {key}")
        else:
            largest = max(largest, float(np.abs(got.astype(np.float64) - expected).max()))
    assert largest <= PIXEL_TOLERANCE, f"{label}: pixel_values differ by {largest:g} (tolerance {PIXEL_TOLERANCE})"
    return largest


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_preset_matches_transformers(saved_processors, preset):
    """One image per call (each size alone) and all images in one call (LLaVA-NeXT pads the crop axis, Qwen
    concatenates the patches), through the product's loader and without it."""
    ours = load_image_processor(saved_processors[preset])
    theirs = transformers_processor(preset, saved_processors[preset])
    images = sample_images() + raw_images()
    largest = 0.0
    for image in images:
        label = f"{preset} {image.size} {image.mode}"
        largest = max(largest, assert_same_outputs(ours([image]), theirs([image], return_tensors="np"), label))
    batch = images[::4]  # sizes from 1x1 to 1500x1100, grey and transparent ones
    largest = max(largest, assert_same_outputs(ours(batch), theirs(batch, return_tensors="np"), f"{preset} batch"))
    print(f"{preset}: {len(images)} images, largest |pixel_values difference| = {largest:g}")


def test_llava_next_crops_follow_the_best_pinpoint(saved_processors):
    """The test images reach every crop count of the tiny preset's pinpoints (1x2 / 2x1: 3, 1x3 / 3x1: 4, 2x2: 5)."""
    ours = load_image_processor(saved_processors["tiny-llava-next"])
    counts = set()
    for image in sample_images():
        pixel_values = ours(image)["pixel_values"]  # [1, P, 3, 336, 336]
        counts.add(pixel_values.shape[1])
    assert counts == {3, 4, 5}


def test_llava_next_pixel_values_hold_the_crops_the_family_counts(saved_processors):
    """pixel_values [B, P, 3, S, S] holds, per image, the crops the family counts for its size (crops_of: the
    base image + its tiles; checked against transformers in tests/models/test_llava_next.py), then zero
    padding up to the batch's most crops."""
    from apet_export.models.llava_next import crops_of

    ours = load_image_processor(saved_processors["tiny-llava-next"])
    pinpoints, side = ours.image_grid_pinpoints, ours.crop_size["height"]
    batch = [load_image(synthetic_image(seed, size)) for seed, size in enumerate([(700, 336), (336, 1100), (90, 80)])]
    out = ours(batch)
    for pixel_values, size in zip(out["pixel_values"], out["image_sizes"], strict=True):
        count = crops_of(tuple(int(s) for s in size), pinpoints, side)
        assert np.abs(pixel_values[:count]).reshape(count, -1).max(axis=1).min() > 0  # real crops
        assert not pixel_values[count:].any()  # then the batch padding


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_attributes_the_families_read_match(saved_processors, preset):
    """What family code reads off processor.image_processor has transformers' values."""
    ours = load_image_processor(saved_processors[preset])
    theirs = transformers_processor(preset, saved_processors[preset])
    names = ["size", "crop_size", "resample", "rescale_factor", "image_mean", "image_std", "do_resize",
             "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"]
    names += {"tiny-llava-next": ["image_grid_pinpoints", "do_pad"],
              "tiny-qwen2.5-vl": ["patch_size", "merge_size", "temporal_patch_size"]}.get(preset, [])
    for name in names:
        expected = getattr(theirs, name)
        expected = dict(expected) if expected is not None and hasattr(expected, "keys") else expected
        expected = tuple(expected) if isinstance(expected, list) and name.startswith("image_m") else expected
        got = getattr(ours, name)
        assert got == expected or (not got and not expected), f"{preset} {name}: {got!r} vs transformers {expected!r}"
    if preset == "tiny-qwen2.5-vl":
        assert (ours.min_pixels, ours.max_pixels) == (theirs.size["shortest_edge"], theirs.size["longest_edge"])


def test_size_arithmetic_matches_transformers():
    """Resize targets, pinpoint choice, fitted size and smart_resize over many image shapes (pure arithmetic)."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    sides = [1, 2, 5, 7, 13, 99, 224, 335, 336, 337, 500, 671, 672, 1000, 1007, 2048, 4001]
    for height in sides:
        for width in sides:
            if max(height, width) > 100 * min(height, width):
                continue  # beyond what load_image accepts
            size, chw = (height, width), np.empty((3, height, width), np.uint8)
            assert preprocess.target_size(size, {"shortest_edge": 336}) == tuple(
                get_resize_output_image_size(chw, 336, default_to_square=False, input_data_format="channels_first"))
            assert preprocess.target_size(size, {"shortest_edge": 300, "longest_edge": 800}) == \
                get_size_with_aspect_ratio(size, 300, 800)
            best = best_resolution(size, pinpoints)
            assert best == select_best_resolution(size, pinpoints)
            assert preprocess.fit_size(size, best) == get_patch_output_size(chw, best, "channels_first")
            for limits in ((28 * 28 * 16, 28 * 28 * 64), (56 * 56, 28 * 28 * 1280)):
                assert preprocess.smart_resize(height, width, 28, *limits) == smart_resize(height, width, 28, *limits)


@pytest.mark.parametrize("grid", [(1, 2, 2), (1, 4, 6), (1, 8, 8), (1, 12, 16), (1, 14, 30), (1, 30, 2),
                                  (1, 16, 16), (2, 10, 6), (1, 64, 46)])
@pytest.mark.parametrize("window_size", [112, 56, 224])
def test_window_layout_matches_transformers(grid, window_size):
    """patch_positions and window_index equal transformers' helpers; the windows' patch counts (window_patch rows
    that are not padding) accumulate to its cu_window_seqlens; window_slot inverts window_patch."""
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    merge, patch = 2, 14
    layout = window_layout(grid, merge, window_size, patch)
    grid_tensor = torch.tensor([grid])
    window_index, cu_window = get_vision_window_index(grid_tensor, merge, window_size, patch)
    np.testing.assert_array_equal(layout["patch_positions"], get_vision_position_ids(grid_tensor, merge).numpy())
    np.testing.assert_array_equal(layout["window_index"], window_index.numpy())
    counts = (layout["window_patch"] >= 0).sum(axis=1)
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(counts)]), cu_window.numpy())
    assert all(v.dtype == np.int64 for v in layout.values())
    flat = layout["window_patch"].reshape(-1)
    np.testing.assert_array_equal(flat[layout["window_slot"]], np.arange(np.prod(grid)))


def test_module_imports_neither_torch_nor_transformers(saved_processors):
    """A fresh interpreter with torch and transformers unimportable preprocesses with the saved processor."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from PIL import Image\n"
        "from apet_export.runtime.preprocess import load_image_processor\n"
        "out = load_image_processor(sys.argv[1])(Image.new('RGB', (50, 70), (10, 200, 30)))\n"
        "print(out['image_grid_thw'].tolist(), out['pixel_values'].shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(saved_processors["tiny-qwen2.5-vl"])],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[[1,", "10,", "8]]", "(80,", "1176)"]


@pytest.mark.parametrize("build", ["llava_build", "siglip_qwen2_build", "llava_next_build", "video_llava_build",
                                   "qwen_build"])
def test_family_feeds_are_the_same_with_the_torch_free_processor(request, build):
    """Each family's vision_feeds (what every backend feeds the vision graph) are identical with the build's
    processor read by load_image_processor in place of transformers': the drop-in the runtime relies on."""
    from apet_export.manifest import load_manifest

    build_dir = request.getfixturevalue(build)  # shared session builds (conftest)
    manifest = load_manifest(build_dir)
    family = get_family(manifest.family)
    processor = family.load_processor(manifest.model_dir(build_dir))
    torch_free = SimpleNamespace(tokenizer=processor.tokenizer, window_size=getattr(processor, "window_size", None),
                                 image_processor=load_image_processor(manifest.model_dir(build_dir)))
    images = [load_image(synthetic_image(seed, size)) for seed, size in enumerate([(640, 480), (300, 900), (1200, 500)])]
    for batch in (images[:1], images):
        expected_feeds, expected_layouts = family.vision_feeds(processor, batch, None, manifest)
        feeds, layouts = family.vision_feeds(torch_free, batch, None, manifest)
        assert layouts == expected_layouts and len(feeds) == len(expected_feeds)
        for feed, expected in zip(feeds, expected_feeds, strict=True):
            assert feed.keys() == expected.keys()
            for name in expected:
                assert feed[name].dtype == expected[name].dtype, name
                np.testing.assert_array_equal(feed[name], expected[name], err_msg=f"{build} {name}")


def write_config(folder, config: dict, name: str = "preprocessor_config.json"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(config))
    return folder


def test_unknown_processor_type_is_a_typed_error(tmp_path):
    folder = write_config(tmp_path / "other", {"image_processor_type": "DonutImageProcessor", "size": 224})
    with pytest.raises(UnknownNameError) as error:
        load_image_processor(folder)
    message = str(error.value)
    assert "DonutImageProcessor" in message and "preprocessor_config.json" in message
    assert all(name in message for name in ("CLIPImageProcessor", "LlavaNextImageProcessor", "Qwen2VLImageProcessor"))


def test_missing_or_broken_config_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no image processor config"):
        load_image_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not readable JSON"):
        load_image_processor(tmp_path)
    write_config(tmp_path, {"image_processor_type": "Qwen2VLImageProcessor", "size": {"height": 5, "width": 5}})
    with pytest.raises(ArtifactError, match="shortest_edge"):
        load_image_processor(tmp_path)


def test_bad_call_arguments_are_typed_errors(saved_processors):
    ours = load_image_processor(saved_processors["tiny-llava"])
    with pytest.raises(InvalidInputError, match="PIL image"):
        ours([noise(0, 8, 8)])
    with pytest.raises(InvalidInputError, match="numpy arrays only"):
        ours([load_image(noise(0, 8, 8))], return_tensors="pt")


@pytest.mark.parametrize("config", [
    # hub-style Qwen2.5-VL config: pixel limits as min_pixels / max_pixels, no size; a Fast type name
    {"image_processor_type": "Qwen2VLImageProcessorFast", "min_pixels": 3136, "max_pixels": 200704, "patch_size": 14,
     "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
     "image_std": [0.26862954, 0.26130258, 0.27577711]},
    # an old CLIP config: size and crop_size as plain ints, no resample (the type's default)
    {"image_processor_type": "CLIPImageProcessor", "size": 224, "crop_size": 224, "do_center_crop": True},
    # LLaVA-NeXT with its own pinpoints and a (height, width) size
    {"image_processor_type": "LlavaNextImageProcessor", "size": {"height": 224, "width": 224},
     "crop_size": {"height": 224, "width": 224}, "image_grid_pinpoints": [[224, 448], [448, 448], [672, 224]]},
], ids=["qwen-min-max-pixels", "clip-int-sizes", "llava-next-own-pinpoints"])
def test_other_saved_configs_match_transformers(tmp_path, config):
    """Configs as real checkpoints save them (not only as the presets do) read as transformers reads them."""
    from transformers import AutoImageProcessor

    folder = write_config(tmp_path / "model", config)
    ours = load_image_processor(folder)
    theirs = AutoImageProcessor.from_pretrained(folder, backend="pil", local_files_only=True)
    for image in sample_images()[::3]:
        assert_same_outputs(ours([image]), theirs([image], return_tensors="np"), f"{config['image_processor_type']} {image.size}")
