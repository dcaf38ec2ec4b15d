"""Calibration fixtures: real pictures from scikit-image's bundled samples, and calibrated tiny builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Photos and scans shipped inside the scikit-image wheel (no download): colour, grey, JPEG and PNG.
SAMPLES = ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "horse.png", "page.png",
           "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "motorcycle_left.png")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """A folder of 10 real pictures, the JPEGs in a subfolder (discovery is recursive)."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) provides the sample pictures")
    source = Path(data.__file__).parent
    folder = tmp_path_factory.mktemp("calibration-images")
    (folder / "jpeg").mkdir()
    for name in SAMPLES:
        shutil.copy(source / name, folder / ("jpeg" if name.endswith(".jpg") else "") / name)
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("calibration-cache")


def _calibrate(tmp_path_factory, build, images, cache_dir, precision, **options) -> Path:
    from apet_export.calibration.build import CalibrationOptions, calibrate

    out = tmp_path_factory.mktemp("quantised") / f"tiny-{precision}"
    calibrate(CalibrationOptions(build_dir=build, images=images, precision=precision, samples=6, out=out,
                                 cache_dir=cache_dir, **options))
    return out


@pytest.fixture(scope="session")
def int8_build(tmp_path_factory, llava_build, sample_images, cache_dir) -> Path:
    return _calibrate(tmp_path_factory, llava_build, sample_images, cache_dir, "int8")


@pytest.fixture(scope="session")
def fp8_build(tmp_path_factory, llava_build, sample_images, cache_dir) -> Path:
    return _calibrate(tmp_path_factory, llava_build, sample_images, cache_dir, "fp8")
