"""File modes of files written through a temporary file: torch-free, so that the runtime's writers
(the vocabulary cache) need no torch (docs/edge.md)."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where /proc shows it (os.umask, which
    sets it for a moment, only as the fallback)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def keep_mode(tmp: str | Path, path: str | Path) -> None:
    """Give `tmp` (a temporary file made by mkstemp, mode 600) the mode that `path` should keep
    when `tmp` replaces it: the old file's mode if there is one, else what the umask gives a new
    file (as open() would), so that a service running as another user can still read it."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~current_umask()
    os.chmod(tmp, mode)
