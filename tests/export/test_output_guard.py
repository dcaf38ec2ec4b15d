"""--force and --out never destroy what apet-export did not write (build, calibrate): one guard, run before
any work, refuses a folder of someone else's files, the current directory, /, the home folder, and an
output that is, contains or lies inside one of the command's inputs."""

import os
import tempfile
from pathlib import Path

import pytest

from apet_export.errors import ArtifactError
from apet_export.export import staging
from tests.test_cli import run_cli


def documents(folder: Path) -> Path:
    (folder / "letters").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "letters" / "a.txt").write_text("also mine")
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_force_refuses_a_folder_apet_export_did_not_write(capsys, tmp_path):
    docs = documents(tmp_path / "docs")
    before = snapshot(docs)
    code, out, err = run_cli(capsys, "build", "--out", str(docs), "--force")
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "was not written by apet-export" in err and "notes.txt" in err and "nothing was touched" in err
    assert snapshot(docs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no lock, no staging folder


@pytest.mark.parametrize("where", ["dot", "empty", "parent of cwd"])
def test_out_is_or_contains_the_current_directory(capsys, tmp_path, monkeypatch, where):
    work = documents(tmp_path / "work")
    monkeypatch.chdir(work)
    out = {"dot": ".", "empty": "", "parent of cwd": str(tmp_path)}[where]
    code, _, err = run_cli(capsys, "build", "--out", out, "--force")
    assert code == 1 and "the current directory" in err, err
    assert (work / "notes.txt").read_text() == "mine"


def test_out_is_root_or_home_even_through_a_symlink(capsys, tmp_path, monkeypatch):
    home = documents(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "link").symlink_to(home)
    for out in ("/", str(home), str(tmp_path / "link")):
        code, _, err = run_cli(capsys, "build", "--out", out, "--force")
        assert code == 1 and ("root folder" in err or "home folder" in err), (out, err)
    assert (home / "notes.txt").read_text() == "mine"


def test_out_inside_or_around_the_model_checkpoint(capsys, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "llava"}')
    code, _, err = run_cli(capsys, "build", "--model", str(checkpoint), "--out", str(checkpoint / "out"))
    assert code == 1 and f"lies inside the --model input {checkpoint}" in err, err
    code, _, err = run_cli(capsys, "build", "--model", str(checkpoint), "--out", str(tmp_path), "--force")
    assert code == 1 and "contains the --model input" in err, err
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json"]


def test_calibrate_out_around_its_inputs(capsys, tmp_path, llava_build):
    images = documents(tmp_path / "pictures")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n")
    base = ["calibrate", str(llava_build), "--images", str(images), "--precision", "int8", "--force"]
    for out, expected in [
        (llava_build.parent, "contains the source build"),  # the parent folder of the source build
        (llava_build / "int8", "lies inside the source build"),
        (images, "is the --images input"),
        (images / "out", "lies inside the --images input"),
    ]:
        code, _, err = run_cli(capsys, *base, "--out", str(out))
        assert code == 1 and expected in err, (out, err)
    code, _, err = run_cli(capsys, *base, "--prompts", str(prompts), "--out", str(prompts))
    assert code == 1 and "is the --prompts input" in err, err
    assert (llava_build / "manifest.json").is_file() and (images / "notes.txt").read_text() == "mine"


def test_force_replaces_our_build_or_an_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert staging.check_output(empty, force=True) == empty.resolve()
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "manifest.json").write_text('{"schema_version": 1, "apet_export_version": "0.1.0"}')
    assert staging.check_output(ours, force=True) == ours.resolve()
    (ours / "manifest.json").write_text('{"name": "someone else\'s manifest"}')
    with pytest.raises(ArtifactError, match="not written by apet-export"):
        staging.check_output(ours, force=True)
    with pytest.raises(ArtifactError, match="already exists: pass --force"):
        staging.check_output(empty, force=False)


def test_a_folder_that_appears_while_waiting_for_the_lock_is_checked_again(tmp_path):
    out = documents(tmp_path / "late")  # check_output passed earlier; someone's files are there now
    with pytest.raises(ArtifactError, match="not written by apet-export"):
        staging.prepare(out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / ".late.lock").exists()


def test_temporary_files_live_in_the_staging_folder(tmp_path, llava_build, monkeypatch):
    """Calibration's augmented graph (onnxruntime writes it via tempfile) goes beside the output, and is
    removed with the staging folder."""
    from onnxruntime.quantization import calibrate as ort_calibrate

    from apet_export.calibration.build import CalibrationOptions, calibrate

    images = tmp_path / "pictures"
    images.mkdir()
    from apet_export.runtime.images import synthetic_image

    synthetic_image(0).save(images / "a.png")
    seen = {}

    def spy(model, op_types, augmented_model_path, **kwargs):
        seen["augmented"], seen["tempdir"] = Path(augmented_model_path), Path(tempfile.gettempdir())
        raise KeyboardInterrupt  # stop here: the clean-up must still remove everything

    monkeypatch.setattr(ort_calibrate, "create_calibrator", spy)
    out = tmp_path / "builds" / "int8"
    with pytest.raises(KeyboardInterrupt):
        calibrate(CalibrationOptions(build_dir=llava_build, images=images, precision="int8", samples=1, out=out,
                                     cache_dir=tmp_path / "cache"))
    staging_folder = seen["augmented"].parents[2]
    assert staging_folder.parent == out.parent.resolve() and staging_folder.name.startswith(f".int8.build-{os.getpid()}-")
    assert seen["tempdir"].parent == staging_folder
    assert tempfile.gettempdir() != str(seen["tempdir"])  # restored
    assert list(out.parent.iterdir()) == []  # staging (and the temporary files in it) removed
