"""Every image is read as an image viewer shows it, by one loader, on every path: EXIF orientation, every
Pillow mode at its right scale (or a clear refusal), numpy arrays by one convention, FIFOs and devices named."""

import os

import numpy as np
import pytest
from PIL import Image

from apet_export.errors import ImageError
from apet_export.runtime.images import load_image


def pixels(image) -> np.ndarray:
    return np.asarray(load_image(image)).astype(int)  # [H, W, 3]


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new("RGB", (40, 20), "red")
    picture.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates it 90 degrees clockwise (a portrait phone photo)
    for suffix in (".jpg", ".png", ".webp"):
        path = tmp_path / f"portrait{suffix}"
        picture.save(path, exif=exif, quality=95)
        shown = pixels(path)
        assert shown.shape == (40, 20, 3), suffix  # upright: taller than wide
        assert shown[5, 10, 2] > 200 and shown[35, 10, 0] > 200, suffix  # blue on top after the rotation


def transparent(mode: str) -> Image.Image:
    """2x1: a transparent black pixel, then an opaque black one."""
    if mode == "P":
        image = Image.new("P", (2, 1), 0)
        image.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)
        image.putpixel((1, 0), 1)
        image.info["transparency"] = 0
        return image
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    return rgba.convert(mode) if mode != "RGBA" else rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA"])
def test_transparency_is_shown_on_white(tmp_path, mode):
    image = transparent(mode)
    if mode != "PA":  # PNG cannot store PA: that one is checked in memory
        image.save(tmp_path / f"alpha-{mode}.png")
        image = tmp_path / f"alpha-{mode}.png"
    shown = pixels(image)
    assert shown[0, 0].tolist() == [255, 255, 255] and shown[0, 1].tolist() == [0, 0, 0], mode


def test_bilevel_grey_and_cmyk(tmp_path):
    assert pixels(Image.new("1", (2, 2), 1))[0, 0].tolist() == [255] * 3
    assert pixels(Image.new("L", (2, 2), 100))[0, 0].tolist() == [100] * 3
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    cmyk.save(tmp_path / "c.jpg", quality=100)
    shown = pixels(tmp_path / "c.jpg")
    assert shown[0, 0].min() > 240 and shown[0, 1].max() < 15


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_variants_are_scaled(tmp_path, mode):
    values = np.array([[0, 32896, 65535]], dtype=">u2" if mode == "I;16B" else "<u2")
    image = Image.frombytes(mode, (3, 1), values.tobytes())
    assert pixels(image)[0, :, 0].tolist() == [0, 128, 255]
    image.save(tmp_path / "p.tif")
    assert pixels(tmp_path / "p.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_32_bit_integer_tiff_is_scaled_by_its_bit_depth_not_clipped(tmp_path):
    values = np.array([[0, 2**30, 2**31 - 1]], np.int32)  # [1, 3]: black, mid grey, white
    Image.fromarray(values).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert pixels(tmp_path / "i32.tif")[0, :, 0].tolist() == [0, 128, 255]  # PIL's convert: 0, 255, 255
    in_memory = Image.fromarray(np.array([[0, 2**15, 65535]], np.int32))  # no declared depth: 16 bits hold it
    assert pixels(in_memory)[0, :, 0].tolist() == [0, 128, 255]
    with pytest.raises(ImageError, match="negative values have no display scale"):
        load_image(Image.fromarray(np.array([[-5, 10]], np.int32)))


def test_float_images_are_0_to_1_or_refused(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    assert pixels(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 128.0, 255.0]], np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(ImageError, match="float image with values 0 to 255.*no other scale is certain"):
        load_image(tmp_path / "f255.tif")
    with pytest.raises(ImageError, match="NaN"):
        load_image(Image.fromarray(np.array([[0.0, np.nan]], np.float32)))


def test_numpy_arrays_follow_one_convention():
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    assert (pixels(eight) == eight).all()
    assert (pixels(eight / 255.0) == eight).all()  # float 0..1: scaled once, to the same picture
    assert (pixels(eight.astype(np.float32) / 255) == eight).all()
    assert (pixels(eight.astype(np.uint16) * 257) == eight).all()
    assert (pixels(eight[..., 0]) == eight[..., :1]).all()  # [H, W] grey
    with pytest.raises(ImageError, match=r"float64 with values 0 to 255.*divide by 255"):
        load_image(eight.astype(np.float64))  # 0..255 floats: refused, not clipped to white
    with pytest.raises(ImageError, match="channels first"):
        load_image(eight.transpose(2, 0, 1))
    with pytest.raises(ImageError, match="int64 with values .* outside the 0..255"):
        load_image(np.full((4, 4), 300))


@pytest.mark.parametrize("value", [42, b"\x89PNG", [[1, 2]], None])
def test_other_types_are_refused(value):
    with pytest.raises(ImageError, match="cannot be read: pass a file path"):
        load_image(value)


def test_fifo_and_devices_are_named(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="is a named pipe \\(FIFO\\), not an image"):
        load_image(fifo)  # would block forever if opened
    with pytest.raises(ImageError, match="/dev/zero is a character device, not an image"):
        load_image("/dev/zero")


def test_calibration_reads_images_with_the_same_loader(tmp_path):
    """calibrate skips and counts what the runtime refuses, and reads the rest as the runtime does."""
    from apet_export.calibration.data import picture_batches, select_images

    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (20000, 2), "red").save(folder / "strip.png")  # decodes, but needs GBs once resized
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "red").save(folder / "portrait.jpg", exif=exif)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep.png")
    data = select_images(folder, samples=2)
    assert sorted(p.name for p in data.images) == ["deep.png", "portrait.jpg"]
    assert [(p.name, "aspect ratio" in why) for p, why in data.skipped] == [("strip.png", True)]
    seen = []
    for pictures in picture_batches(data.images, 2):  # what calibration hands the family's feeds
        seen.extend(pictures)
    by_size = {picture.size: np.asarray(picture) for picture in seen}
    assert (20, 40) in by_size  # upright
    assert 100 < by_size[(64, 64)].mean() < 155  # a ramp, not washed out to white


def test_float_video_frames_reach_the_model_as_uint8_frames_do(video_llava_build):
    from apet_export.runtime.pipeline import Pipeline
    from apet_export.runtime.video import synthetic_frames

    frames = [np.asarray(frame) for frame in synthetic_frames(4)]  # [H, W, 3] uint8
    with Pipeline.from_dir(video_llava_build) as pipeline:
        run = lambda video: pipeline.generate_video(video, "Describe.", max_new_tokens=3, stream=False)  # noqa: E731
        as_uint8 = run(frames)
        as_float = run([frame / 255.0 for frame in frames])
        with pytest.raises(ImageError, match="frame 0 is float64 with values"):
            run([frame.astype(np.float64) for frame in frames])  # 0..255 floats: refused, not darkened
    np.testing.assert_allclose(as_float.first_logits, as_uint8.first_logits, atol=1e-4)
    assert as_float.token_ids == as_uint8.token_ids
