"""Finished work is never lost to a write at the end: every output is checked before the work, written
atomically, and a read-only folder or a full disk costs one line, not a traceback or a half-written file."""

import builtins
import errno
import io
import os
import shutil

import pytest

from tests.test_cli import run_cli

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder, code): every write under `folder` fails with `code` (EROFS: a read-only mount;
    ENOSPC: a full disk), at the os.open level, as the kernel would refuse it; tests run as root, where
    chmod would not stop a write."""
    folders = []
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        for folder, code in folders:
            if flags & WRITE_FLAGS and os.path.abspath(path).startswith(str(folder)):
                raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    real_io_open = io.open

    def guarded_io_open(file, mode="r", *args, **kwargs):
        if isinstance(file, str | os.PathLike) and any(flag in mode for flag in "wax+"):
            for folder, code in folders:
                if os.path.abspath(file).startswith(str(folder)):
                    raise OSError(code, os.strerror(code), str(file))
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", guarded_io_open)  # pathlib's write_text
    monkeypatch.setattr(builtins, "open", guarded_io_open)

    def add(folder, code=errno.EROFS):
        folders.append((folder.resolve(), code))

    return add


@pytest.fixture
def build_copy(llava_build, tmp_path):
    return shutil.copytree(llava_build, tmp_path / "build", ignore=shutil.ignore_patterns("parity.json"))


def no_bench(*args, **kwargs):
    raise AssertionError("the benchmark ran although its output cannot be written")


def test_bench_json_out_is_checked_before_the_work(capsys, tmp_path, llava_build, monkeypatch, read_only):
    rows = tmp_path / "new" / "folder" / "rows.json"  # a missing folder is created, before the work
    code, _, err = run_cli(capsys, "bench", str(llava_build), "--budgets", "64", "--runs", "1",
                           "--max-new-tokens", "2", "--no-tensorrt", "--json-out", str(rows))
    assert code == 0 and rows.is_file(), err
    from apet_export import bench

    monkeypatch.setattr(bench, "run_bench_with_tensorrt", no_bench)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "bench", str(llava_build), "--json-out", str(blocker / "rows.json"))
    assert code == 1 and err.startswith("error: cannot write --json-out") and len(err.strip().splitlines()) == 1, err
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    code, _, err = run_cli(capsys, "bench", str(llava_build), "--json-out", str(locked / "rows.json"))
    assert code == 1 and "Read-only file system" in err and len(err.strip().splitlines()) == 1, err


def test_a_full_disk_at_the_end_is_one_line_and_leaves_nothing(capsys, tmp_path, llava_build, monkeypatch, read_only):
    from apet_export import bench, outputs

    monkeypatch.setattr(bench, "run_bench_with_tensorrt", lambda *a, **k: [])
    full = tmp_path / "full"
    full.mkdir()
    real_check = outputs.check_output_file

    def check_then_fill(path, option):  # the check before the work finds space; the disk fills during it
        result = real_check(path, option)
        read_only(full, errno.ENOSPC)
        return result

    import apet_export.cli as cli

    monkeypatch.setattr(cli, "check_output_file", check_then_fill)
    code, _, err = run_cli(capsys, "bench", str(llava_build), "--json-out", str(full / "rows.json"))
    assert code == 1 and "the disk is full" in err and len(err.strip().splitlines()) == 1, err
    assert list(full.iterdir()) == []  # no rows.json, no temporary file


def test_a_full_disk_during_a_build_is_one_line(capsys, tmp_path, monkeypatch):
    from apet_export.export import build

    def disk_full(source, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target / "model.safetensors"))

    monkeypatch.setattr(build, "prepare_checkpoint", disk_full)
    code, _, err = run_cli(capsys, "build", "--out", str(tmp_path / "out"))
    last = err.strip().splitlines()[-1]  # after the build's progress lines
    assert code == 1 and last.startswith(f"error: cannot write {tmp_path / 'out'}: the disk is full"), err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []  # staging and lock removed


def test_parity_on_a_read_only_build_prints_the_results_then_says_so(capsys, build_copy, read_only):
    read_only(build_copy)
    code, out, err = run_cli(capsys, "parity", str(build_copy), "--budgets", "64", "--no-e2e")
    assert code == 0, err  # the checks passed: the exit status is theirs
    assert "parity checks passed" in out and "vision graphs vs eager PyTorch" in out
    assert "parity.json cannot be written" in err and "the results above are not saved" in out + err
    assert not (build_copy / "parity.json").exists()


def test_engine_on_a_read_only_build_fails_before_any_work(capsys, build_copy, read_only):
    read_only(build_copy)
    code, _, err = run_cli(capsys, "engine", str(build_copy))
    assert code == 1 and err.startswith(f"error: cannot write engines into {build_copy.resolve()}"), err
    assert "Read-only file system" in err


def test_visualize_writes_the_format_its_suffix_names(capsys, tmp_path, llava_build):
    from PIL import Image

    for suffix, magic in ((".jpg", b"\xff\xd8\xff"), (".webp", b"RIFF"), (".pdf", b"%PDF")):
        target = tmp_path / f"figure{suffix}"
        code, _, err = run_cli(capsys, "visualize", str(llava_build), "-o", str(target))
        assert code == 0 and target.read_bytes().startswith(magic), (suffix, err)
    assert Image.open(tmp_path / "figure.jpg").format == "JPEG"
    for name in ("figure.xyz", "figure"):
        code, _, err = run_cli(capsys, "visualize", str(llava_build), "-o", str(tmp_path / name))
        assert code == 1 and "names no image format" in err and ".png" in err, err
        assert not (tmp_path / name).exists()
