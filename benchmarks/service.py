"""`ttd serve` started as a service manager starts it, for the serving benchmarks: by absolute
path, with a bare environment (no activated venv), stopped with SIGTERM as systemd stops it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def served(repo: Path, port: int, workdir: Path, timeout_s: float = 180) -> Iterator[tuple[subprocess.Popen, str]]:
    """(the `ttd serve` process, tritonserver's loopback address behind the front on `port`)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "PYTHONPATH": str(ROOT),
           "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = workdir / "serve.log"
    serve = subprocess.Popen([str(Path(sys.executable).parent / "ttd"), "serve", str(repo), "--http-port", str(port)],
                             stderr=log.open("w"), env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while not (found := re.search(r"tritonserver on (127\.0\.0\.1:\d+)", log.read_text())):
            if time.monotonic() > deadline or serve.poll() is not None:
                raise SystemExit(f"ttd serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield serve, found.group(1)
    finally:  # SIGTERM: ttd serve stops its front and tritonserver (SIGKILL would orphan tritonserver)
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown")
