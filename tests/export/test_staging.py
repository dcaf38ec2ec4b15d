"""The build's output folder: locking, cleanup on SIGTERM and of dead builds, permissions, log lines."""

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apet_export.errors import ArtifactError
from apet_export.export import staging
from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_sigterm_cleans_up_and_a_second_build_of_the_same_dir_fails(capsys, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "build.log"  # a file, not a terminal: the build must log one line per stage
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("w") as stderr:
        first = subprocess.Popen(
            [sys.executable, "-m", "apet_export.cli", "build", "--out", str(out)], stderr=stderr, env=env, cwd=REPO
        )
    try:
        assert wait_for(lambda: "vision.onnx" in log.read_text()), log.read_text()  # mid-build, lines so far
        assert "model: tiny-llava" in log.read_text()
        hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert f".out.build-{first.pid}-" in " ".join(hidden) and ".out.lock" in hidden
        code, _, err = run_cli(capsys, "build", "--out", str(out))  # a second build while the first runs
        assert code == 1 and f"another apet-export build (process {first.pid}) is writing" in err, err
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        first.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.log"]  # no staging folder, no lock


def test_stale_staging_of_dead_builds_is_removed(tmp_path):
    dead = tmp_path / ".old.build-4194999-abcd_123"  # above Linux's largest pid: no such process
    alive = tmp_path / f".other.build-{os.getpid()}-xyz12345"
    replaced = tmp_path / ".gone.old-4194999"
    unrelated = [tmp_path / ".cache.old-4194999", tmp_path / ".x.build-4194999-notmkdtemp"]  # not ours: kept
    for folder in (dead, alive, replaced, *unrelated):
        (folder / "model").mkdir(parents=True)
    (replaced / "manifest.json").write_text("{}")
    lock, folder = staging.prepare(tmp_path / "new", force=False)
    try:
        assert not dead.exists() and not replaced.exists() and alive.exists()
        assert all(folder.exists() for folder in unrelated)
        assert folder.name.startswith(f".new.build-{os.getpid()}-")
        with pytest.raises(ArtifactError, match=f"process {os.getpid()}"):  # the lock is held
            staging.prepare(tmp_path / "new", force=False)
    finally:
        lock.release()
    assert not (tmp_path / ".new.lock").exists()


def test_built_files_get_the_umask_permissions(llava_build):
    umask = os.umask(0)
    os.umask(umask)
    for path in [llava_build, *llava_build.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_out_inside_a_file_or_on_a_read_only_file_system(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    code, out, err = run_cli(capsys, "build", "--out", str(blocker / "sub" / "out"))
    assert code == 1 and err.strip() == f"error: cannot create the build {blocker}/sub/out: {blocker} is a file, " \
        "not a folder: choose another --out"
    code, _, err = run_cli(capsys, "build", "--out", str(blocker))
    assert code == 1 and "is a file, not a build directory" in err

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(staging.tempfile, "mkdtemp", read_only)
    code, _, err = run_cli(capsys, "build", "--out", str(tmp_path / "out"))
    assert code == 1 and "Read-only file system" in err and "choose an --out inside a writable folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # lock released and removed


def test_pickle_checkpoints_are_refused(capsys, tmp_path, llava_build):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_bytes((llava_build / "model" / "config.json").read_bytes())
    (checkpoint / "pytorch_model.bin").write_bytes(b"not loaded")
    code, _, err = run_cli(capsys, "build", "--model", str(checkpoint), "--out", str(tmp_path / "out"))
    last = err.strip().splitlines()[-1]
    assert code == 1 and "pytorch_model.bin, a pickle checkpoint" in last and "safetensors only" in last
    assert ".build-" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
