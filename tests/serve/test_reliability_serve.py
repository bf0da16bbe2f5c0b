"""Reliability of `ttd serve` (issue #8, items 1-3): started by absolute path as a service
manager starts it, stopped by SIGTERM without orphans, load errors shown, a tritonserver
crash survived by restarting it, and malformed requests refused by its HTTP front."""

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from ports import free_port
from PIL import Image

from export.pipeline import run_export
from export.triton import BatchingOptions, build_repository
from ttd.data.world import make_sample
from ttd.model.factory import create_model
from ttd.serve.triton_server import server_ready

pytest.importorskip("tritonclient")
pytest.importorskip("pytriton")

# each test starts tritonserver: a hang fails the test in minutes (tests/conftest.py)
pytestmark = pytest.mark.deadline(600)

ROOT = Path(__file__).resolve().parents[2]
TTD_SCRIPT = Path(sys.executable).parent / "ttd"  # the environment's console script, by absolute path


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    export = tmp_path_factory.mktemp("export")
    run_export(create_model("world-tiny", seed=0), export, check_count=8)
    return build_repository(export, tmp_path_factory.mktemp("repo") / "repo", "python",
                            batching=BatchingOptions(max_batch_size=4, preferred_batch_sizes=(2,)))


def service_env(tmp_path: Path) -> dict[str, str]:
    """What systemd or a container entrypoint gives: no activated environment (no VIRTUAL_ENV, the
    environment's bin/ not on PATH). PYTHONPATH only points the script at the tree under test."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8"}


class Served:
    """`ttd serve` as a child process, its stderr collected line by line."""

    def __init__(self, repo: Path, tmp_path: Path, *extra: str) -> None:
        if not TTD_SCRIPT.is_file():
            pytest.skip(f"no console script at {TTD_SCRIPT}")
        self.http_port, self.grpc_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [str(TTD_SCRIPT), "serve", str(repo), "--http-port", str(self.http_port), "--grpc-port",
             str(self.grpc_port), *extra], stderr=subprocess.PIPE, text=True, env=service_env(tmp_path))
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.children: set[int] = set()  # every tritonserver seen, killed at close even if orphaned
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if text in line:
                self.tritonserver_pids()
                return line
        raise AssertionError(f"{text!r} not printed; stderr so far:\n{''.join(self.seen)}")

    def tritonserver_pids(self) -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        self.children.update(pids)
        return pids

    def close(self) -> None:
        self.tritonserver_pids()  # the current one too (a restarted server not yet seen by a wait_for)
        if self.process.poll() is None:
            self.process.terminate()  # `ttd serve` stops its tritonserver on SIGTERM
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ready(port: int) -> bool:
    return server_ready(f"127.0.0.1:{port}")


def tag_one(port: int) -> dict:
    import tritonclient.http as http

    from benchmarks.load_client import tagger_request

    sample = make_sample(3, 0)
    buffer = io.BytesIO()
    Image.fromarray(sample.image).save(buffer, "PNG")
    return tagger_request(http, http.InferenceServerClient(f"127.0.0.1:{port}"), buffer.getvalue(), sample.caption)


def test_serve_started_by_absolute_path_without_an_activated_environment(repo, tmp_path):
    from ttd.model.tags import candidate_tags

    served = Served(repo, tmp_path)
    try:
        line = served.wait_for("serving")
        assert f"HTTP 127.0.0.1:{served.http_port}" in line
        answer = tag_one(served.http_port)
        assert answer["tags"] == candidate_tags(make_sample(3, 0).caption)
        assert answer["scores"].shape == (len(answer["tags"]),) and ((answer["scores"] >= 0) & (answer["scores"] <= 1)).all()
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(timeout=60) == 0
    finally:
        served.close()


def test_load_errors_are_shown_not_the_status_table(repo, tmp_path):
    import shutil

    from ttd.serve.triton_server import ServerError, start_server

    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    (broken / "ttd_text_encoder" / "1" / "model.py").write_text("import module_that_does_not_exist_xyz\n")
    with pytest.raises(ServerError) as error:
        start_server(broken, http_port=free_port(), grpc_port=free_port(), timeout_s=120)
    message = str(error.value)
    assert "ttd_text_encoder: " in message and "No module named 'module_that_does_not_exist_xyz'" in message
    assert "ttd_text_encoder/1/model.py(1)" in message
    assert "+----" not in message  # not the model status table


def test_sigterm_stops_tritonserver_and_removes_its_workspace(repo, tmp_path):
    served = Served(repo, tmp_path)
    try:
        served.wait_for("serving")
        children = served.tritonserver_pids()
        assert len(children) == 1, children
        assert list((tmp_path / "tmp").glob("ttd-triton-*"))
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not Path(f"/proc/{children[0]}").exists(), "tritonserver was orphaned"
        assert not ready(served.http_port)
        assert not list((tmp_path / "tmp").glob("ttd-triton-*")), "workspace left behind"
    finally:
        served.close()


def form_post(port: int, size: int) -> int | str:
    """A body of `size` NUL bytes with curl's default (form) content type: HTTP status or the error."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/ttd_tagger/infer", data=bytes(size),
                                     method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError as error:
        return type(error).__name__


def test_large_form_posts_do_not_crash_tritonserver(repo, tmp_path):
    """tritonserver 2.51 parses a form-encoded body on its HTTP threads' stack (~1 byte of stack
    per byte): with the default 8 MiB stack limit a 6 MB POST kills it (SIGSEGV). `ttd serve`'s
    front refuses such bodies (below); this is the server as the library starts it, no front."""
    from ttd.serve.triton_server import start_server

    with start_server(repo, http_port=free_port(), grpc_port=None) as server:
        port = int(server.http_url.split(":")[1])
        for size in (10_000_000, 50_000_000):
            status = form_post(port, size)
            assert status in (400, 500), f"{size:,} bytes: {status}"  # refused with the server's error
            assert server.process.poll() is None and ready(port), f"died on {size:,} bytes"
        assert tag_one(port)["tags"]


def raw_request(port: int, head: str, body_parts: list[bytes]) -> tuple[int, str, int]:
    """Send a request head and body parts on a bare socket (stopping when the server stops
    reading), then read the answer: (status, reason from the JSON error, bytes of body sent)."""
    import json
    import socket

    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        try:
            for part in body_parts:
                connection.sendall(part)
                sent += len(part)
        except OSError:
            pass  # the front answered and closed without reading the rest
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 "), f"no answer after {sent:,} bytes of body: {answer[:200]!r}"
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"], sent


def test_the_front_answers_every_malformed_request_4xx_with_a_reason(repo, tmp_path):
    """Item 1: what tritonserver answered 500 (or died on) is refused by `ttd serve`'s front with a
    4xx and a JSON reason, before tritonserver sees it; the server then answers a good request."""
    served = Served(repo, tmp_path, "--max-body-mb", "1")
    try:
        served.wait_for("serving")
        (pid,) = served.tritonserver_pids()
        infer = f"http://127.0.0.1:{served.http_port}/v2/models/ttd_tagger/infer"

        def post(body: bytes, **headers: str) -> tuple[int, str]:
            import json

            request = urllib.request.Request(infer, data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, ""
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())["error"]

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, reason = post(bytes(100_000), **form)  # curl's default content type, not JSON
        assert status == 400 and reason.startswith("the inference request is not valid JSON"), reason
        assert post(bytes(100_000), **{"Content-Type": "multipart/form-data"})[0] == 415
        assert post(b"{not json", **{"Content-Type": "application/json"})[0] == 400
        assert post(b'{"inputs": "x"}', **form) == (400, "'inputs' must be a list of input tensors")
        lying = b'{"inputs": []}abc'
        assert post(lying, **{"Inference-Header-Content-Length": "1000"}) == (
            400, f"Inference-Header-Content-Length is 1,000 but the body has only {len(lying)} bytes")
        assert post(bytes(10_000_000), **form) == (413, "body of 10,000,000 bytes exceeds the limit of 1,048,576")
        path = "/v2/models/ttd_tagger/infer HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        # declared too large: refused on the headers, after 64 KiB of a 2 GB body
        status, reason, sent = raw_request(served.http_port, f"POST {path}Content-Length: 2000000000\n",
                                           [bytes(65536)])
        assert (status, reason, sent) == (413, "body of 2,000,000,000 bytes exceeds the limit of 1,048,576", 65536)
        # undeclared (chunked): refused once it passes the bound, not read to its end
        chunk = b"10000\r\n" + bytes(65536) + b"\r\n"
        status, reason, sent = raw_request(served.http_port, f"POST {path}Transfer-Encoding: chunked\n",
                                           [chunk] * 64)
        assert (status, reason) == (413, "body exceeds the limit of 1,048,576 bytes")
        assert post(b"{}", **{"Content-Encoding": "br"})[0] == 415
        # item 12: a huge tag list for the tag head is refused from its shape; the model never sees it
        import numpy as np
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException

        client = http.InferenceServerClient(f"127.0.0.1:{served.http_port}")
        patch = http.InferInput("patch_views", [1, 1, 128, 8, 8], "FP32")
        patch.set_data_from_numpy(np.zeros((1, 1, 128, 8, 8), np.float32))
        tags = http.InferInput("tag_embeds", [1, 1500, 128], "FP32")
        tags.set_data_from_numpy(np.zeros((1, 1500, 128), np.float32))

        def requests_seen() -> int:  # a refusal by the model itself counts as one more (success or fail)
            stats = client.get_inference_statistics("ttd_tag_head")["model_stats"][0]["inference_stats"]
            return stats["success"]["count"] + stats["fail"]["count"]

        before = requests_seen()
        with pytest.raises(InferenceServerException) as error:
            client.infer("ttd_tag_head", [patch, tags])
        assert error.value.status() == "400"
        # the head takes the tagger's 1,024 tags (the negative prompts have an input of their own)
        assert error.value.message() == "input 'tag_embeds': dimension 1 is 1500, more than the limit of 1024"
        assert requests_seen() == before  # refused by the front: tritonserver never got the tensor
        assert tag_one(served.http_port)["tags"]  # and a good request is answered, by the same tritonserver
        assert served.tritonserver_pids() == [pid]
        assert served.process.poll() is None
    finally:
        served.close()
    assert "tritonserver exited" not in "".join(served.seen)


def test_a_request_in_flight_when_tritonserver_dies_is_retried(repo, tmp_path):
    """The front sends a request once more when its backend connection breaks and `ttd serve`
    has restarted tritonserver: tritonserver is frozen (SIGSTOP) so four requests are certainly in
    flight, then killed; every client gets its answer, not an error."""
    import concurrent.futures

    served = Served(repo, tmp_path, "--max-restarts", "2")
    try:
        served.wait_for("serving")
        expected = tag_one(served.http_port)
        (pid,) = served.tritonserver_pids()
        os.kill(pid, signal.SIGSTOP)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(tag_one, served.http_port) for _ in range(4)]
            time.sleep(1.0)  # the front has passed the requests on to the frozen server
            assert not any(answer.done() for answer in answers)
            os.kill(pid, signal.SIGKILL)
            got, *others = [answer.result(timeout=120) for answer in answers]
        assert all(other["tags"] == expected["tags"] for other in others)
        served.wait_for("front: backend connection lost during POST /v2/models/ttd_tagger/infer")
        served.wait_for("restarted tritonserver in")
        assert got["tags"] == expected["tags"] and (got["selected"] == expected["selected"]).all()
        assert abs(got["scores"] - expected["scores"]).max() < 1e-6
    finally:
        served.close()


def test_a_crashed_tritonserver_is_restarted(repo, tmp_path):
    served = Served(repo, tmp_path, "--max-restarts", "2")
    try:
        served.wait_for("serving")
        (pid,) = served.tritonserver_pids()
        os.kill(pid, signal.SIGSEGV)
        served.wait_for("tritonserver exited with code -11")
        line = served.wait_for("restarted tritonserver in")
        assert "restart 1 of at most 2" in line
        assert ready(served.http_port) and tag_one(served.http_port)["tags"]
        assert served.process.poll() is None
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0
    finally:
        served.close()


def test_malformed_requests_get_4xx_with_a_reason_and_no_server_paths(repo, tmp_path):
    """Item 12: a missing input, and an encoder called directly past the tagger's tag cap."""
    import numpy as np
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from ttd.serve.triton_server import start_server

    with start_server(repo, http_port=free_port(), grpc_port=free_port()) as server:
        client = http.InferenceServerClient(server.http_url)
        caption = http.InferInput("caption", [1, 1], "BYTES")
        caption.set_data_from_numpy(np.array([[b"a red circle"]], dtype=np.object_))
        with pytest.raises(InferenceServerException) as error:
            client.infer("ttd_tagger", [caption])
        assert error.value.status() == "400", (error.value.status(), error.value.message())
        assert "input 'image' is missing" in error.value.message() and "/" not in error.value.message()
        config = client.get_model_config("ttd_tag_head")
        dims = {i["name"]: [int(d) for d in i["dims"]] for i in config["input"]}
        views = [1, *dims["patch_views"][1:]]  # one view: the views axis is variable
        patch = http.InferInput("patch_views", [1, *views], "FP32")
        patch.set_data_from_numpy(np.zeros((1, *views), np.float32))
        dim = dims["tag_embeds"][1]
        arrays = {"tag_embeds": np.zeros((1, 2000, dim), np.float32), "tag_valid": np.ones((1, 2000), np.bool_),
                  "negative_embeds": np.zeros((1, 5, dim), np.float32), "negative_margin": np.zeros((1, 1), np.float32)}
        inputs = [patch]
        for name, array in arrays.items():
            inputs.append(http.InferInput(name, list(array.shape), "BOOL" if array.dtype == np.bool_ else "FP32"))
            inputs[-1].set_data_from_numpy(array)
        with pytest.raises(InferenceServerException) as error:
            client.infer("ttd_tag_head", inputs)
        assert error.value.status() == "400"
        assert "input 'tag_embeds': dimension 1 is 2000, more than the limit of 1024" in error.value.message()
        # the tagger's own refusals: each a 400 with the reason, nothing else disturbed
        from benchmarks.load_client import tagger_request

        png = io.BytesIO()
        Image.fromarray(make_sample(3, 0).image).save(png, "PNG")
        refusals = [(b"not an image", "a red circle", None, "cannot decode image"),
                    (png.getvalue(), "the of and a", None, "no candidate tags"),
                    (png.getvalue(), "  ", None, "empty caption"),
                    (b"\0" * (21 << 20), "a red circle", None, "exceeds the limit of 20,971,520")]
        for image, text, tag_list, reason in refusals:
            with pytest.raises(InferenceServerException) as error:
                tagger_request(http, client, image, text, tag_list)
            assert error.value.status() == "400", (reason, error.value.status(), error.value.message())
            assert reason in error.value.message(), error.value.message()
        image = http.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[png.getvalue()]], dtype=np.object_))
        wrong = http.InferInput("return_masks", [1, 1], "INT32")  # declared BOOL
        wrong.set_data_from_numpy(np.array([[1]], dtype=np.int32))
        with pytest.raises(InferenceServerException) as error:
            client.infer("ttd_tagger", [image, caption, wrong])
        assert error.value.status() == "400" and "return_masks" in error.value.message(), error.value.message()
        assert tag_one(int(server.http_url.split(":")[1]))["tags"]  # and the server still answers


def test_a_triton_client_rides_out_a_server_restart(repo, tmp_path):
    """`ttd tag --backend triton` keeps going when tritonserver crashes and `ttd serve` restarts it."""
    import numpy as np

    from ttd.runtime.triton_backend import TritonBackend

    served = Served(repo, tmp_path, "--max-restarts", "2")
    try:
        served.wait_for("serving")
        backend = TritonBackend(f"127.0.0.1:{served.http_port}", retry_s=90)
        ids = np.zeros((3, 32), np.int64)
        ids[:, 0] = 1
        before = backend.encode_texts(ids)
        (pid,) = served.tritonserver_pids()
        os.kill(pid, signal.SIGSEGV)
        served.wait_for("tritonserver exited with code -11")
        after = backend.encode_texts(ids)  # sent while the server is down or restarting
        np.testing.assert_allclose(after, before, atol=1e-6)
        assert "restarted tritonserver in" in "".join(served.seen) or served.wait_for("restarted tritonserver in")
    finally:
        served.close()
