"""The atomic output of `build`: a hidden staging folder beside DIR, renamed to DIR at the end.

    DIR.parent/
        .DIR.lock                     held (fcntl) for the whole build: a second build of DIR fails at once
        .DIR.build-<pid>-<random>/    the staging folder; removed on error, Ctrl-C and SIGTERM, and by the
                                      next build in the same parent if process <pid> no longer exists
        DIR/                          appears only complete, files with the permissions the umask gives

What may be replaced (check_output, before any work; again under the lock): --force replaces only a
directory apet-export wrote (it holds our manifest.json) or an empty one. An output that is, contains or
lies inside one of the command's inputs, or that is or contains the current directory, / or the home
folder, is refused whatever the flags. Temporary files of the libraries the build calls (tempfile) go to
STAGING/.tmp, so they vanish with the staging folder, also after a SIGKILL (the next run removes it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from apet_export.errors import ArtifactError
from apet_export.outputs import DISK_FULL, current_umask, describe

# .NAME.build-PID-RANDOM (staging; RANDOM is mkdtemp's 8 characters) and .NAME.old-PID (a replaced build
# being deleted). Narrow patterns: these folders are deleted without asking.
STAGING = re.compile(r"^\..+\.build-(\d+)-[a-z0-9_]{8}$")
REPLACED = re.compile(r"^\..+\.old-(\d+)$")


SCRATCH = ".tmp"  # inside the staging folder: tempfile's folder while the block runs


def _describe(entries: list[Path]) -> str:
    folders = sum(1 for e in entries if e.is_dir())
    files = len(entries) - folders
    names = ", ".join(sorted(e.name for e in entries)[:3])
    return f"{files} file(s) and {folders} folder(s): {names}{', ...' if len(entries) > 3 else ''}"


def written_by_us(folder: Path) -> bool:
    """True if `folder` holds an apet-export manifest.json (a build or calibration this tool wrote)."""
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "apet_export_version" in data


def check_replaceable(out: Path, force: bool, option: str = "--out") -> None:
    """An existing `out` may be replaced only with force, and only if apet-export wrote it or it is empty."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} is a file, not a build directory: choose another {option}")
    if not force:
        raise ArtifactError(f"{out} already exists: pass --force to replace it, or choose another {option}")
    entries = list(out.iterdir())
    if entries and not written_by_us(out):
        raise ArtifactError(
            f"{out} was not written by apet-export (it holds {_describe(entries)} and no apet-export "
            f"manifest.json): --force replaces only a build apet-export wrote, or an empty folder; nothing was "
            f"touched: choose another {option}"
        )


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or inner.is_relative_to(outer)


def check_output(out: Path, force: bool, inputs: dict[str, Path | None] | None = None, option: str = "--out") -> Path:
    """Refuse, before any work, an output whose replacement could destroy what apet-export did not write.

    inputs: {"--model": path, ...} the command reads; the output may not be, contain or lie inside any of
    them. It may not be or contain the current directory, / or the home folder. Symlinks are resolved.
    Returns the resolved output path."""
    resolved = Path(out).resolve()
    protected = {"the current directory": Path.cwd().resolve(), "the root folder /": Path("/"),
                 "your home folder": Path.home().resolve()}
    # "is" before "contains": --out / is the root folder first, though it also contains the cwd
    for name, path in sorted(protected.items(), key=lambda item: item[1] != resolved):
        if _within(path, resolved):
            relation = "is" if path == resolved else "contains"
            raise ArtifactError(
                f"{option} {out} {relation} {name} ({path}): a build is written there and replaced as a "
                f"whole: choose a new folder, e.g. {option} build/my-model"
            )
    for name, path in (inputs or {}).items():
        if path is None or not Path(path).exists():
            continue
        source = Path(path).resolve()
        if _within(resolved, source) or _within(source, resolved):
            relation = "is" if source == resolved else "lies inside" if _within(resolved, source) else "contains"
            raise ArtifactError(
                f"{option} {out} {relation} the {name} input {source}: writing there would overwrite what the "
                f"command reads: choose an {option} outside it"
            )
    check_replaceable(resolved, force, option)
    return resolved


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


def _flock(path: Path, wait: bool):
    """(an open handle on `path` holding its exclusive fcntl lock, "") or, when another process holds it and
    wait is False, (None, the holder's pid). The file is re-opened when its holder removed it between our
    open and our lock."""
    import fcntl

    while True:
        handle = open(path, "a+")  # noqa: SIM115 - kept open as the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:  # held: the holder's pid, read from the file
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            return None, owner
        if os.path.exists(path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
            return handle, ""
        handle.close()


class OutputLock:
    """An exclusive lock on DIR, as .DIR.lock beside it; released (and the file removed) by release()."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")
        self.file = None

    def acquire(self, out: Path, force: bool) -> OutputLock:
        try:
            import fcntl  # noqa: F401
        except ImportError:  # not POSIX: no lock, as before
            return self
        handle, owner = _flock(self.path, wait=False)
        if handle is None:
            raise ArtifactError(
                f"another apet-export build (process {owner}) is writing {out}: wait for it to finish, "
                f"or choose another --out"
            )
        self._hold(handle)
        try:  # checked again under the lock: a build may have just finished, a folder just appeared
            check_replaceable(out, force)
        except ArtifactError:
            self.release()
            raise
        return self

    def wait(self) -> OutputLock:
        """Take the lock, waiting for its holder (a command that updates a finished build in place)."""
        try:
            import fcntl  # noqa: F401
        except ImportError:
            return self
        self._hold(_flock(self.path, wait=True)[0])
        return self

    def _hold(self, handle) -> None:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self.file = handle

    def release(self) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so nobody locks a removed file
            self.file.close()
            self.file = None


@contextlib.contextmanager
def updating(build_dir: Path):
    """DIR's lock held while a command changes a finished build in place (engine's manifest update): two
    such updates at once would each write the manifest they had read, and one would be lost. A build of
    DIR holds the same lock, so neither replaces DIR under the other."""
    lock = OutputLock(build_dir).wait()
    try:
        yield
    finally:
        lock.release()


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
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; a build is an ordinary directory
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
        with exit_on_sigterm(), temporary_files_in(staging):
            yield staging
        publish(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in DISK_FULL:  # one line naming the output, not the staging file that hit the limit
            raise ArtifactError(
                f"cannot write {out}: {describe(error)}; nothing was kept (the partial output was removed): "
                f"free space, or choose an --out on another disk"
            ) from error
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.release()


@contextlib.contextmanager
def temporary_files_in(staging: Path):
    """Point tempfile (which onnxruntime's quantiser, torch and our own code use) at STAGING/.tmp while the
    block runs: temporary files then live beside the output and go with the staging folder, also after a
    SIGKILL. The folder is removed when the block ends, before the staging folder is published."""
    scratch = staging / SCRATCH
    scratch.mkdir()
    previous = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Give every file the permissions the umask gives new files (some writers create 0600), then replace
    `out` by `staging` with renames only (the old build is removed after the swap)."""
    umask = current_umask()
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
