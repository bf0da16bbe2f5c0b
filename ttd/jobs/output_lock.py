"""One job per output: an advisory lock that a second job on the same output meets at once, with
the holder named, and that dies with its process (a kill -9 never leaves a stale lock behind:
the kernel drops a `flock` with the last descriptor of its holder).

The lock file is `.NAME.lock` beside the output `NAME` (a JSON-lines file or a Parquet folder):
hidden, never part of the output, and left in place after the job (deleting a lock file while
another process waits on it would let two jobs in).
"""

from __future__ import annotations

from ttd.errors import TTDError
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


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
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _read_holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder.get('command') or '?'}")
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file cannot be read"
