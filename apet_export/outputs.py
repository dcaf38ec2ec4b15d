"""Single output files (bench --json-out, visualize -o, parity.json): checked before the work, written at the
end through a temporary file beside them, so a failed write (read-only folder, full disk) leaves nothing
half-written and costs one `error:` line, not the finished work."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from apet_export.errors import ArtifactError
from apet_export.paths import kind_of

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back): the permissions new files should get."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def describe(error: OSError) -> str:
    if error.errno in DISK_FULL:
        return f"the disk is full ({error.strerror})"
    return error.strerror or str(error)


def unwritable_reason(path: Path) -> str | None:
    """None if `path` can be written (its folder is created if missing), else why not, in words."""
    path = Path(path)
    kind = kind_of(path)
    if kind not in (None, "missing"):
        return f"{path} is {kind}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        return f"{path.parent}: {describe(error)}"  # the folder, not the name of the probe file
    return None


def check_output_file(path: Path, option: str) -> Path:
    """Before the work: `path` can be written (a missing folder is created), or ArtifactError."""
    reason = unwritable_reason(path)
    if reason:
        raise ArtifactError(f"cannot write {option} {path} ({reason}): choose a path in a writable folder")
    return Path(path)


def write_atomically(path: Path, data: bytes | str, option: str = "") -> Path:
    """Write via a temporary file in the same folder, then rename: `path` is complete or untouched."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {option + ' ' if option else ''}{path} ({describe(error)}): nothing was "
                            f"written; free space or choose another path") from error
    return path
