"""One job per output: an advisory lock that a second job on the same output meets at once, with
the holder named, and that dies with its process (a kill -9 never leaves a stale lock behind:
the kernel drops a `flock` with the last descriptor of its holder).

The lock file is `.NAME.lock` beside the output `NAME` (a JSON-lines file or a Parquet folder):
hidden, never part of the output, and left in place after the job (deleting a lock file while
another process waits on it would let two jobs in).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from ttd.errors import TTDError


class OutputInUse(TTDError, ValueError):
    """The output is being written by another job."""


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


class OutputLock:
    """Held from `acquire` to `release` (or the end of the process)."""

    def __init__(self, output: Path, descriptor: int) -> None:
        self.output, self._descriptor = output, descriptor

    @classmethod
    def acquire(cls, output: Path) -> OutputLock:
        """Lock `output` for this process, or raise OutputInUse naming the job that holds it."""
        output = Path(output)
        path = lock_path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = open_beside_output(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise OutputInUse(f"{output} is being written by another job ({holder}); wait for it to end, or choose "
                              "another output") from None
        except OSError:
            os.close(descriptor)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        return cls(output, descriptor)

    def release(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = -1


class UnsafeOutputPath(TTDError, ValueError):
    """A file the toolkit writes beside an output is a symbolic link or not a plain file."""


def open_beside_output(path: Path, flags: int, mode: int = 0o644) -> int:
    """Open a file the toolkit keeps beside a user's output (a lock, a partial output) without
    following a symbolic link and without blocking on a FIFO: in a shared folder a planted
    `.out.jsonl.lock -> victim.txt` would otherwise make the job truncate and overwrite the
    victim (docs/reliability.md, "One job per output"). Returns the descriptor of a plain file."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as error:
        if os.path.islink(path):
            raise UnsafeOutputPath(f"{path} is a symbolic link; a job never writes through one beside its output: "
                                   "remove it (or choose another output)") from None
        raise OSError(error.errno, f"cannot open {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise UnsafeOutputPath(f"{path} is not a plain file (a FIFO, a device or a folder); a job keeps only plain "
                               "files beside its output: remove it (or choose another output)")
    os.set_blocking(descriptor, True)
    return descriptor


def _read_holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder.get('command') or '?'}")
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file cannot be read"
