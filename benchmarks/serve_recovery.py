"""How long `ttd serve` takes to bring tritonserver back after it dies (issue #8).

    python benchmarks/serve_recovery.py REPO --kills 5

Starts `ttd serve REPO` by absolute path with a bare environment on 127.0.0.1, kills its
tritonserver with SIGSEGV (what a crashing request does) KILLS times, and reports, per kill, the
seconds until the server is ready again as a client sees it, and the figure `ttd serve` logs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ttd.serve.triton_server import server_ready

ROOT = Path(__file__).resolve().parents[1]


def ready(port: int) -> bool:
    return server_ready(f"127.0.0.1:{port}")


def child_of(pid: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--port", type=int, default=18400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        log = Path(tmp) / "serve.log"
        serve = subprocess.Popen([str(Path(sys.executable).parent / "ttd"), "serve", str(args.repo), "--http-port",
                                  str(args.port), "--grpc-port", str(args.port + 1), "--max-restarts", str(args.kills)],
                                 stderr=log.open("w"), env=env)
        try:
            while not ready(args.port):
                time.sleep(0.2)
            for kill in range(args.kills):
                began = time.monotonic()
                os.kill(child_of(serve.pid), signal.SIGSEGV)
                while log.read_text().count("restarted tritonserver") < kill + 1 or not ready(args.port):
                    time.sleep(0.05)
                print(f"kill {kill + 1}: ready again after {time.monotonic() - began:.2f} s (client view)", flush=True)
            logged = re.findall(r"restarted tritonserver in ([\d.]+) s", log.read_text())
            print(f"ttd serve logged: {', '.join(logged)} s")
            serve.send_signal(signal.SIGTERM)
            print(f"ttd serve exit code on SIGTERM: {serve.wait(60)}")
        finally:
            if serve.poll() is None:
                serve.kill()


if __name__ == "__main__":
    main()
