"""Running the tritonserver that nvidia-pytriton bundles (Python backend only) on a model
repository: a workspace with the server and the stub for this Python, the library path and
interpreter the stub needs, 127.0.0.1 by default, readiness wait, clean stop.

The stub embeds Python and ignores PYTHONPATH: it takes its prefix (and so its site-packages)
from the first `python3` on PATH. So PATH starts with this interpreter's folder, which makes a
`ttd serve` started by absolute path (systemd, cron, container entrypoints) find the same
packages as one started from an activated environment, and the `ttd` package that runs the
server is linked into the stub's own folder, so the models import the same code."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ttd.errors import TTDError
from ttd.model.contract import TAGGER_MODEL


class ServerError(TTDError, RuntimeError):
    """tritonserver could not be started; the message says why (with its log's tail)."""


def _pytriton_dist() -> Path:
    try:
        import pytriton
    except ImportError as error:
        raise ServerError("serving needs nvidia-pytriton (pip install -e '.[serve]'), which bundles tritonserver") from error
    dist = Path(pytriton.__file__).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServerError(f"{dist} holds no tritonserver binary; reinstall nvidia-pytriton")
    return dist


def prepare_workspace(workspace: Path) -> Path:
    """Copy the bundled server and put the stub for this Python version into backends/python/."""
    dist = _pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
    server = workspace / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"), dirs_exist_ok=True)
    shutil.copy(stub, server / "backends" / "python" / "triton_python_backend_stub")
    (server / "backends" / "python" / "ttd").symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    return server


def server_environment() -> dict[str, str]:
    """LD_LIBRARY_PATH starting with this interpreter's LIBDIR (pyenv builds) and the bundled
    libraries; PATH starting with this interpreter's folder, whose `python3` the stub takes its
    prefix from (an activated environment does the same; a service manager does not)."""
    import pytriton

    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    interpreter_bin = str(Path(sys.executable).parent)
    env["PATH"] = ":".join([interpreter_bin] + ([env["PATH"]] if env.get("PATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*)\"\s*$")


def load_errors(log_text: str) -> list[str]:
    """The models that failed to load and why, from tritonserver's log (one line each: the
    error and the model.py line it came from), instead of the status table at the log's end."""
    errors = []
    for line in log_text.splitlines():
        match = LOAD_FAILURE.search(line)
        if not match:
            continue
        message = match.group(2).replace("\\n", "\n").strip()
        first, *rest = [part.strip() for part in message.splitlines() if part.strip()]
        where = [part for part in rest if ".py(" in part and not part.startswith("<frozen")]
        errors.append(f"{match.group(1)}: {first}" + (f" (at {where[-1]})" if where else ""))
    return errors


@dataclass
class TritonServer:
    process: subprocess.Popen
    http_url: str
    grpc_url: str
    log_path: Path
    workspace: tempfile.TemporaryDirectory

    def log_tail(self, lines: int = 30) -> str:
        """The models' load errors when there are any, else the log's last lines."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(load_errors(text) or text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.workspace.cleanup()
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


SERVER_STACK_BYTES = 1 << 30


def _raise_stack_limit() -> None:
    """Run in the child before exec: tritonserver 2.51 parses a form-encoded (curl's default)
    HTTP body on the stack of its HTTP threads, about one byte of stack per byte of body, and
    dies of SIGSEGV when that passes the stack limit (8 MiB by default: a 6 MB POST kills it).
    Threads take their stack size from this limit, so 1 GiB moves the crash past 1 GB bodies
    (address space only: stack pages are used on demand); `supervise` restarts it past that."""
    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]  # soft "unlimited" would give threads only 32 MiB
    limit = SERVER_STACK_BYTES if hard == resource.RLIM_INFINITY else min(SERVER_STACK_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (limit, hard))


def server_ready(http_url: str) -> bool:
    """Whether the server at host:port answers its readiness endpoint."""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(repo: Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int | None = 8001,
                 timeout_s: float = 120, log_verbose: int = 0, metrics_port: int | None = None) -> TritonServer:
    """Start tritonserver on `repo` and wait until it is ready; raises ServerError with its log.
    `grpc_port` None: no gRPC endpoint at all. `metrics_port`: tritonserver's Prometheus
    endpoint, on 127.0.0.1 only (ttd/serve/metrics.py serves it on through the metrics port);
    None: no metrics."""
    if not (repo / TAGGER_MODEL / "config.pbtxt").is_file():
        raise ServerError(f"{repo} is not a TTD model repository (create one with `ttd triton build`)")
    workspace = tempfile.TemporaryDirectory(prefix="ttd-triton-")
    server = prepare_workspace(Path(workspace.name))
    log_path = Path(workspace.name) / "tritonserver.log"
    command = [str(server / "bin" / "tritonserver"), f"--model-repository={repo.resolve()}",
               f"--backend-directory={server / 'backends'}", f"--http-address={host}", f"--http-port={http_port}",
               *([f"--grpc-address={host}", f"--grpc-port={grpc_port}"] if grpc_port else ["--allow-grpc=false"]),
               *(["--allow-metrics=true", "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}"]
                 if metrics_port else ["--allow-metrics=false"]),
               f"--log-verbose={log_verbose}", "--exit-on-error=true", "--strict-readiness=true"]
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(),
                               start_new_session=True, preexec_fn=_raise_stack_limit)
    handle = TritonServer(process, f"{host}:{http_port}", f"{host}:{grpc_port}" if grpc_port else "", log_path, workspace)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = handle.log_tail()
                raise ServerError(f"tritonserver exited with code {process.returncode} while starting:\n{tail}")
            if server_ready(handle.http_url):
                return handle
            time.sleep(0.5)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{handle.log_tail()}")
    except BaseException:  # a start that fails or is interrupted (Ctrl-C, SIGTERM) leaves no server behind
        handle.stop()
        raise


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within it, SIGTERM and SIGHUP (timeout, systemd, docker stop, a closed terminal) stop
    `ttd serve` the way Ctrl-C does: tritonserver is stopped and its workspace removed, nothing
    is orphaned. SIGINT is handled too, even when the process started with it ignored (a
    background job of a non-interactive shell, e.g. `nohup ttd serve ... &`, inherits SIGINT
    ignored, and `kill -INT` would then be lost). The previous handlers are restored on the way out."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def supervise(server: TritonServer, restart: Callable[[], TritonServer], say: Callable[[str], None],
              max_restarts: int = 5, window_s: float = 600, poll_s: float = 0.2,
              before_stop: Callable[[], None] = lambda: None) -> int:
    """Keep a server up: when tritonserver dies (it was seen to crash on one malformed request),
    report why and start a new one on the same ports, at most `max_restarts` times in `window_s`
    seconds; stop cleanly on Ctrl-C / SIGTERM, calling `before_stop` first (tritonserver waits up
    to 30 s for open HTTP connections, so whoever holds some closes them there). Returns the exit
    code for `ttd serve`."""
    restarts: list[float] = []
    try:
        while True:
            while server.process.poll() is None:
                time.sleep(poll_s)
            died = time.monotonic()
            say(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")
            server.stop()
            while True:  # a restart that itself fails counts as one more
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < window_s] + [now]
                if len(restarts) > max_restarts:
                    say(f"giving up: {len(restarts) - 1} restarts in the last {window_s:.0f} s")
                    return 1
                try:
                    server = restart()
                    break
                except ServerError as error:
                    say(f"restart failed: {error}")
            say(f"restarted tritonserver in {time.monotonic() - died:.1f} s "
                f"(restart {len(restarts)} of at most {max_restarts} in {window_s:.0f} s)")
    except KeyboardInterrupt:
        say("stopping ...")
        before_stop()
        server.stop()
        return 0
