"""Calibration fixtures: real pictures from scikit-image's bundled samples, and calibrated tiny builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import made_once

# Photos and scans shipped inside the scikit-image wheel (no download): colour, grey, JPEG and PNG.
SAMPLES = ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "horse.png", "page.png",
           "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "motorcycle_left.png")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """A folder of 10 real pictures, the JPEGs in a subfolder (discovery is recursive)."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) provides the sample pictures")
    source = Path(data.__file__).parent

    def copy(folder: Path) -> None:
        (folder / "jpeg").mkdir()
        for name in SAMPLES:
            shutil.copy(source / name, folder / ("jpeg" if name.endswith(".jpg") else "") / name)

    return made_once(tmp_path_factory, "calibration-images", copy)


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory, llava_build, sample_images) -> Path:
    """The int8 and fp8 calibrations of the tiny-llava build, made together once per run, and the range cache
    they wrote (cache/). The cache is written only while they are made, so the tests that read it (they
    use a calibrated build, hence this fixture) never see another worker's half-written entry."""
    from apet_export.calibration.build import CalibrationOptions, calibrate

    def make(folder: Path) -> None:
        for precision in ("int8", "fp8"):
            calibrate(CalibrationOptions(build_dir=llava_build, images=sample_images, precision=precision, samples=6,
                                         out=folder / f"tiny-{precision}", cache_dir=folder / "cache"))

    return made_once(tmp_path_factory, "calibrated", make)


@pytest.fixture(scope="session")
def cache_dir(calibrated) -> Path:
    return calibrated / "cache"


@pytest.fixture(scope="session")
def int8_build(calibrated) -> Path:
    return calibrated / "tiny-int8"


@pytest.fixture(scope="session")
def fp8_build(calibrated) -> Path:
    return calibrated / "tiny-fp8"
