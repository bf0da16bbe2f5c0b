"""Running the tritonserver that nvidia-pytriton bundles (Python backend only) on a model
repository: a workspace with the server and the stub for this Python, the library path and
PYTHONPATH the stub needs, 127.0.0.1 by default, readiness wait, clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
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
    return server


def server_environment() -> dict[str, str]:
    """LD_LIBRARY_PATH starting with this interpreter's LIBDIR (pyenv builds), the bundled
    libraries, and a PYTHONPATH that lets the stub import this environment's packages and ttd."""
    import pytriton

    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    ttd_root = str(Path(__file__).resolve().parents[2])
    paths = [ttd_root, *site.getsitepackages()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = ":".join(paths)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class TritonServer:
    process: subprocess.Popen
    http_url: str
    grpc_url: str
    log_path: Path
    workspace: tempfile.TemporaryDirectory

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

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


def _ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(repo: Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 timeout_s: float = 120, log_verbose: int = 0) -> TritonServer:
    """Start tritonserver on `repo` and wait until it is ready; raises ServerError with its log."""
    if not (repo / "ttd_tagger" / "config.pbtxt").is_file():
        raise ServerError(f"{repo} is not a TTD model repository (create one with `ttd triton build`)")
    workspace = tempfile.TemporaryDirectory(prefix="ttd-triton-")
    server = prepare_workspace(Path(workspace.name))
    log_path = Path(workspace.name) / "tritonserver.log"
    command = [str(server / "bin" / "tritonserver"), f"--model-repository={repo.resolve()}",
               f"--backend-directory={server / 'backends'}", f"--http-address={host}", f"--grpc-address={host}",
               f"--http-port={http_port}", f"--grpc-port={grpc_port}", "--allow-metrics=false",
               f"--log-verbose={log_verbose}", "--exit-on-error=true", "--strict-readiness=true"]
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(),
                               start_new_session=True)
    handle = TritonServer(process, f"{host}:{http_port}", f"{host}:{grpc_port}", log_path, workspace)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = handle.log_tail()
            handle.stop()
            raise ServerError(f"tritonserver exited with code {process.returncode} while starting:\n{tail}")
        if _ready(handle.http_url):
            return handle
        time.sleep(0.5)
    tail = handle.log_tail()
    handle.stop()
    raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{tail}")
