"""Calibration data: discovery, deterministic sampling, unreadable files, prompts, streamed feeds."""

import shutil

import numpy as np
import pytest

from apet_export.calibration import data
from apet_export.errors import CalibrationDataError
from apet_export.manifest import load_manifest
from apet_export.models.registry import get_family


def test_sample_is_deterministic_recursive_and_fingerprinted(sample_images, tmp_path):
    first = data.select_images(sample_images, 6)
    again = data.select_images(sample_images, 6)
    other = data.select_images(sample_images, 6, seed=1)
    assert first.images == again.images and first.images != other.images
    assert any(p.parent.name == "jpeg" for p in data.find_images(sample_images))  # found in the subfolder
    assert first.prompts == list(data.BUILTIN_PROMPTS) and not first.skipped
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    copy = tmp_path / "copy"
    shutil.copytree(sample_images, copy)
    assert data.select_images(copy, 6).fingerprint() == first.fingerprint()  # content + relative paths only
    changed = data.select_images(copy, 6)
    changed.images[0].write_bytes(changed.images[0].read_bytes() + b"\0")
    assert changed.fingerprint() != first.fingerprint()


def test_unreadable_files_are_skipped_and_counted(sample_images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        shutil.copy(sample_images / name, folder / name)
    (folder / "notes.png").write_text("not a picture")
    (folder / "cut.jpg").write_bytes((sample_images / "jpeg" / "rocket.jpg").read_bytes()[:300])  # truncated
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    chosen = data.select_images(folder, 3)
    assert sorted(p.name for p in chosen.images) == ["astronaut.png", "chelsea.png", "coffee.png"]
    assert sorted(p.name for p, _ in chosen.skipped) == ["cut.jpg", "notes.png"]


def test_clear_errors_for_unusable_folders(sample_images, tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        data.select_images(tmp_path / "missing", 4)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "list.txt").write_text("x")
    with pytest.raises(CalibrationDataError, match="contains no image files"):
        data.select_images(empty, 4)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG nonsense")
    with pytest.raises(CalibrationDataError, match="none of the 1 image files .* could be read"):
        data.select_images(broken, 1)
    with pytest.raises(CalibrationDataError, match=r"has 10 readable images .* --samples 10"):
        data.select_images(sample_images, 12)
    with pytest.raises(CalibrationDataError, match="--samples must be >= 1"):
        data.select_images(sample_images, 0)


def test_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("First question?\n\n  Second one.  \n")
    assert data.read_prompts(path) == ["First question?", "Second one."]
    path.write_text("\n \n")
    with pytest.raises(CalibrationDataError, match="has no prompts"):
        data.read_prompts(path)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        data.read_prompts(tmp_path / "none.txt")


def test_feeds_are_streamed_in_passes(sample_images, llava_build, monkeypatch):
    manifest = load_manifest(llava_build)
    processor = data.load_processor(llava_build, manifest)
    chosen = data.select_images(sample_images, 5)
    opened = []
    real_open = data.Image.open
    monkeypatch.setattr(data.Image, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    reader = data.vision_feeds(chosen, get_family("llava"), processor, manifest, 64, batch_size=2)
    assert len(reader) == 3 and opened == []  # nothing read before it is asked for
    reader.limit = 2  # two feeds per calibration pass
    feed = reader.get_next()
    assert feed["pixel_values"].shape == (2, 3, 336, 336) and feed["pixel_values"].dtype == np.float32
    assert int(feed["keep"]) == 64 and len(opened) == 2
    assert reader.get_next() is not None and reader.get_next() is None  # end of the first pass
    last = reader.get_next()
    assert last["pixel_values"].shape[0] == 1 and reader.get_next() is None
    assert len(opened) == 5 and reader.delivered == 3 and reader.passes == 2
