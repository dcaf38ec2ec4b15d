"""Reading images: 16-bit pictures keep their content, oversized or degenerate ones fail before decoding."""

import numpy as np
import pytest
from PIL import Image

from apet_export.errors import ImageError
from apet_export.runtime.images import load_image


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 64).reshape(64, 256).astype(np.uint16)  # [H, W] full 16-bit range
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path))  # [H, W, 3] uint8
    expected = np.round(ramp / 257).astype(np.uint8)
    assert rgb.shape == (64, 256, 3) and (rgb == expected[..., None]).all()
    assert (rgb == 255).mean() < 0.01  # PIL's own convert("RGB") clips: 99.6% white


def test_16_bit_picture_as_the_model_sees_it(tmp_path, llava_build):
    """The preprocessed pixels of a 16-bit picture equal those of its 8-bit version."""
    from apet_export.models.registry import get_family

    processor = get_family("llava").load_processor(llava_build / "model")
    preprocess = lambda images: processor.image_processor(images, return_tensors="np")["pixel_values"]  # noqa: E731
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (120, 160), dtype=np.uint8)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "p16.png")
    pixels16 = preprocess([load_image(tmp_path / "p16.png")])
    pixels8 = preprocess([Image.fromarray(eight).convert("RGB")])
    np.testing.assert_array_equal(pixels16, pixels8)
    assert pixels16.std() > 0.5  # a real picture, not a white page


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (20000, 2), "red").save(path)
    with pytest.raises(ImageError, match="20000x2 pixels, an aspect ratio beyond 100:1"):
        load_image(path)
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(Image.new("RGB", (3, 400)))  # PIL images get the same checks
    assert load_image(Image.new("RGB", (1000, 20))).size == (1000, 20)  # 50:1 is fine


@pytest.mark.filterwarnings("error")  # no PIL warning before the error line
def test_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (3000, 3000)).save(path)  # 9 M pixels in a few kB
    assert path.stat().st_size < 50_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)  # so the test need not decode 100 M pixels
    with pytest.raises(ImageError, match="3000x3000 = 9 M pixels, over the limit of 5 M"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # PIL's own check fires at open above 2x the limit
    with pytest.raises(ImageError, match="too large to decode safely"):
        load_image(path)


def test_folder_and_missing_paths(tmp_path):
    with pytest.raises(ImageError, match="is a folder, not an image"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
