"""The atomic output of `build`: a hidden staging folder beside DIR, renamed to DIR at the end.

    DIR.parent/
        .DIR.lock                     held (fcntl) for the whole build: a second build of DIR fails at once
        .DIR.build-<pid>-<random>/    the staging folder; removed on error, Ctrl-C and SIGTERM, and by the
                                      next build in the same parent if process <pid> no longer exists
        DIR/                          appears only complete, files with the permissions the umask gives
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from apet_export.errors import ArtifactError

# .NAME.build-PID-RANDOM (staging; RANDOM is mkdtemp's 8 characters) and .NAME.old-PID (a replaced build
# being deleted). Narrow patterns: these folders are deleted without asking.
STAGING = re.compile(r"^\..+\.build-(\d+)-[a-z0-9_]{8}$")
REPLACED = re.compile(r"^\..+\.old-(\d+)$")


def _unwritable(out: Path, error: OSError) -> ArtifactError:
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return ArtifactError(f"cannot create the build {out}: {blocking} is a file, not a folder: choose another --out")
    return ArtifactError(
        f"cannot write the build {out}: {error.strerror or error} ({error.filename or out.parent}): choose an "
        f"--out inside a writable folder"
    )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Delete the staging folders of builds in `parent` whose process is gone (killed, crashed)."""
    removed = []
    for entry in parent.iterdir():
        match = STAGING.match(entry.name) or (REPLACED.match(entry.name) if (entry / "manifest.json").is_file() else None)
        if match and entry.is_dir() and not entry.is_symlink() and not _process_exists(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class OutputLock:
    """An exclusive lock on DIR, as .DIR.lock beside it; released (and the file removed) by release()."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")
        self.file = None

    def acquire(self, out: Path, force: bool) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 - kept open as the lock
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "?"
                handle.close()
                raise ArtifactError(
                    f"another apet-export build (process {owner}) is writing {out}: wait for it to finish, "
                    f"or choose another --out"
                ) from None
            # the previous holder may have removed the file between our open and lock: lock the new one
            if os.path.exists(self.path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                break
            handle.close()
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self.file = handle
        if out.exists() and not force:  # checked again under the lock: a build may have just finished
            self.release()
            raise ArtifactError(f"{out} already exists: pass --force to replace it, or choose another --out")
        return self

    def release(self) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so nobody locks a removed file
            self.file.close()
            self.file = None


def prepare(out: Path, force: bool) -> tuple[OutputLock, Path]:
    """Lock DIR, clear stale staging folders beside it, and create a new one: (lock, staging)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out).acquire(out, force)
    except OSError as error:
        raise _unwritable(out, error) from error
    try:
        remove_stale(out.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-{os.getpid()}-", dir=out.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a build is an ordinary directory
    except OSError as error:
        lock.release()
        raise _unwritable(out, error) from error
    return lock, staging


@contextlib.contextmanager
def staged_output(out: Path, force: bool):
    """The whole life of an atomic output: lock DIR, yield a new staging folder to write into, publish it as
    DIR when the block ends; on any error, Ctrl-C or SIGTERM the staging folder is removed instead."""
    lock, staging = prepare(out, force)
    try:
        with exit_on_sigterm():
            yield staging
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.release()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def publish(staging: Path, out: Path) -> None:
    """Give every file the permissions the umask gives new files (some writers create 0600), then replace
    `out` by `staging` with renames only (the old build is removed after the swap)."""
    umask = _umask()
    for root, folders, files in os.walk(staging):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
    old = None
    try:
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        staging.rename(out)
    except OSError as error:
        raise _unwritable(out, error) from error
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exit_on_sigterm():
    """SIGTERM (and SIGHUP) raise SystemExit inside the block, so the build's cleanup runs as for Ctrl-C.
    Signal handlers can only be set from the main thread; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
