"""What a path the user passed is, said in words: 'a folder', 'a named pipe (FIFO)', 'a character device' ..."""

from __future__ import annotations

import stat
from pathlib import Path

KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(path: Path) -> str | None:
    """None for a regular file (symlinks followed); 'missing' if nothing is there; else what it is."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:  # missing, or a symlink to nothing
        return "missing"
    for test, kind in KINDS:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def require_file(path: Path, noun: str, error: type[Exception], expected: str) -> Path:
    """path, if it is a regular file; else `error` saying what it is: '{path} is a named pipe (FIFO), not
    {noun}: pass {expected}'. Reading a FIFO would block, a device would never end."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "missing":
        raise error(f"{noun.split(' ', 1)[-1]} {path} does not exist: pass {expected}")
    if kind is not None:
        raise error(f"{path} is {kind}, not {noun}: pass {expected}")
    return path
