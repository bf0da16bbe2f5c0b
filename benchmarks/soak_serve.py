"""Bounded soak of the served tagger, started the way a service manager starts it (issue #8).

    python benchmarks/soak_serve.py --export-dir out/export --requests 10000 --clients 16 --malformed 0.05

Starts `ttd serve` by the absolute path of this environment's console script with a bare
environment (no activated venv), on 127.0.0.1 only. N client threads send the requests; each is
malformed with the given probability (a rotating set of bad requests). Every good answer is
checked against direct onnxruntime; every malformed one must be answered 4xx with a reason.
Resident memory of the whole service (`ttd serve` with its HTTP front, tritonserver and its
Python stubs) is read after warm-up and at the end, and `ttd serve`'s log is scanned for crashes
and restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from export.triton import BatchingOptions, build_repository
from ttd.runtime import load_tagger
from ttd.model.tags import candidate_tags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_client import tagger_request  # noqa: E402
from serve_load import world_pairs  # noqa: E402  (the sibling benchmark's world pairs)


def raw_post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{url}/v2/models/ttd_tagger/infer", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(300).decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read(300).decode(errors="replace")


def raw_oversized(url: str, declared: int = 2_000_000_000) -> tuple[int, str]:
    """A request that declares a 2 GB body and sends 64 KiB of it, then reads the answer (the front
    refuses it on its headers; a 2 GB body is never sent)."""
    import socket

    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(f"POST /v2/models/ttd_tagger/infer HTTP/1.1\r\nHost: {url}\r\nContent-Type: "
                           f"application/json\r\nContent-Length: {declared}\r\n\r\n".encode() + bytes(65536))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]) if head else 0, body[:300].decode(errors="replace")


def raw_post_binary(url: str, body: bytes, header_length: int) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{url}/v2/models/ttd_tagger/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream",
                                              "Inference-Header-Content-Length": str(header_length)})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(300).decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read(300).decode(errors="replace")


def malformed(kind: int, http, client, url: str, image: bytes) -> tuple[int, str]:
    """(HTTP status, reason) of one malformed request of the given kind."""
    from tritonclient.utils import InferenceServerException

    def via_client(call) -> tuple[int, str]:
        try:
            call()
            return 200, "ACCEPTED"
        except InferenceServerException as error:
            return int(error.status() or 0), error.message()

    cases = [
        lambda: via_client(lambda: tagger_request(http, client, b"\x00garbage", "a red circle")),
        lambda: via_client(lambda: tagger_request(http, client, image, "  ")),
        lambda: via_client(lambda: tagger_request(http, client, image, "and the of")),
        lambda: via_client(lambda: tagger_request(http, client, image, tags=[f"t{i}" for i in range(2000)])),
        lambda: raw_post(url, b'{"inputs": [{"name": "caption", "shape": [1, 1], "datatype": "BYTES", "data": ["a red circle"]}]}',
                         "application/json"),
        lambda: raw_post(url, b"{not json", "application/json"),
        lambda: raw_post(url, bytes(6_000_000), "application/x-www-form-urlencoded"),  # killed 2.51 before the fix
        lambda: raw_post(url, b'{"inputs": "not a list"}', "application/json"),  # 2.51 answers 500
        lambda: raw_post(url, bytes(100_000), "multipart/form-data"),
        lambda: raw_post_binary(url, b'{"inputs": []}abc', 1000),  # a binary header length that lies
        lambda: raw_oversized(url),
    ]
    return cases[kind % len(cases)]()


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (`ttd serve` + tritonserver + stubs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def own_rss_kib(pid: int) -> int:
    """Resident memory of `pid` alone (`ttd serve`: the HTTP front and the supervisor)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tritonserver_pid(parent: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            return int(stat.parent.name)
    return None


def run(export_dir: Path, requests: int, clients: int, malformed_share: float, port: int, warmup: int, seed: int) -> dict:
    import tritonclient.http as http

    direct = load_tagger("onnxruntime", export_dir=str(export_dir), device="cpu", threads=1)
    images, pairs = world_pairs(32, direct.config.image_size)
    results = direct.tag(images, [candidate_tags(c) for _, c in pairs])
    expected = [(r.tags, r.scores, [t in r.selected for t in r.tags]) for r in results]
    script = Path(sys.executable).parent / "ttd"
    rng = random.Random(seed)
    plan = ["bad" if rng.random() < malformed_share else "good" for _ in range(requests)]
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(export_dir, Path(tmp) / "repo", "python",
                                batching=BatchingOptions(max_batch_size=32, preferred_batch_sizes=(8,)))
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8",
               "HF_HUB_OFFLINE": "1"}
        log_path = Path(tmp) / "serve.log"
        serve = subprocess.Popen([str(script), "serve", str(repo), "--http-port", str(port)],
                                 stderr=log_path.open("w"), env=env)
        try:
            url = f"127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while "serving" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            server_pid = tritonserver_pid(serve.pid)
            lock = threading.Lock()
            counter = iter(range(requests))
            stats = {"good": 0, "good_ok": 0, "lost": [], "mismatched": [], "bad": 0, "bad_4xx_with_reason": 0,
                     "bad_other": [], "latencies_ms": [], "bad_statuses": {}}
            rss = {}

            def worker() -> None:
                client = http.InferenceServerClient(url, network_timeout=120)
                while True:
                    with lock:
                        index = next(counter, None)
                        if index == warmup and "after_warmup_kib" not in rss:
                            rss["after_warmup_kib"] = rss_kib(serve.pid)
                            rss["front_after_warmup_kib"] = own_rss_kib(serve.pid)
                    if index is None:
                        return
                    image, caption = pairs[index % len(pairs)]
                    if plan[index] == "bad":
                        status, reason = malformed(index, http, client, url, image)
                        with lock:
                            stats["bad"] += 1
                            stats["bad_statuses"][status] = stats["bad_statuses"].get(status, 0) + 1
                            if 400 <= status < 500 and reason.strip():
                                stats["bad_4xx_with_reason"] += 1
                            else:
                                stats["bad_other"].append(f"request {index}: {status} {reason[:200]}")
                        continue
                    start = time.perf_counter()
                    try:
                        got = tagger_request(http, client, image, caption)
                    except Exception as error:
                        with lock:
                            stats["good"] += 1
                            stats["lost"].append(f"request {index}: {type(error).__name__}: {str(error)[:200]}")
                        continue
                    tags, scores, selected = expected[index % len(pairs)]
                    same = got["tags"] == tags and list(got["selected"]) == selected and np.allclose(got["scores"], scores, atol=1e-5)
                    with lock:
                        stats["good"] += 1
                        stats["latencies_ms"].append((time.perf_counter() - start) * 1000)
                        if same:
                            stats["good_ok"] += 1
                        else:
                            stats["mismatched"].append(f"request {index}")

            began = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - began
            rss["end_kib"] = rss_kib(serve.pid)
            rss["front_end_kib"] = own_rss_kib(serve.pid)
            log = log_path.read_text()
            still_same_server = tritonserver_pid(serve.pid) == server_pid
            serve.send_signal(signal.SIGTERM)
            exit_code = serve.wait(timeout=60)
        finally:
            if serve.poll() is None:
                serve.kill()
    lat = np.array(stats.pop("latencies_ms") or [0.0])
    return {
        "requests": requests, "clients": clients, "malformed_share": malformed_share, "seconds": round(seconds, 1),
        "throughput_rps": round(requests / seconds, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "good": stats["good"], "good_correct": stats["good_ok"], "lost": len(stats["lost"]),
        "mismatched": len(stats["mismatched"]), "malformed": stats["bad"],
        "malformed_4xx_with_reason": stats["bad_4xx_with_reason"],
        "malformed_statuses": {str(k): v for k, v in sorted(stats["bad_statuses"].items())},
        "malformed_other": stats["bad_other"][:10],
        "crashes": log.count("tritonserver exited with code"), "restarts": log.count("restarted tritonserver"),
        "same_tritonserver_throughout": still_same_server, "serve_exit_code_on_sigterm": exit_code,
        "rss_after_warmup_mib": round(rss.get("after_warmup_kib", 0) / 1024, 1),
        "rss_end_mib": round(rss["end_kib"] / 1024, 1),
        "rss_growth": round(rss["end_kib"] / max(rss.get("after_warmup_kib", 1), 1) - 1, 3),
        "front_rss_after_warmup_mib": round(rss.get("front_after_warmup_kib", 0) / 1024, 1),
        "front_rss_end_mib": round(rss["front_end_kib"] / 1024, 1),
        "rss_measured": "ttd serve (front + supervisor) + tritonserver + Python-backend stubs",
        "lost_examples": stats["lost"][:5], "mismatch_examples": stats["mismatched"][:5],
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "unknown"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--malformed", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=500, help="Requests before the first memory reading.")
    parser.add_argument("--port", type=int, default=18300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak_serve.json"))
    args = parser.parse_args()
    report = run(args.export_dir, args.requests, args.clients, args.malformed, args.port, args.warmup, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
