"""Served vs direct tagging, measured so that the comparison holds on a shared machine.

    python benchmarks/serve_load.py --export-dir runs/export_default --flavours fused python \\
        --clients 8 --requests 512 --rounds 5

For each flavour a repository is built with `ttd triton build`'s defaults and served with
`ttd serve` (front + tritonserver + its Python stubs, in subprocesses); the direct side is one
process holding the runtime Tagger (onnxruntime, 1 thread: the engine settings the served models
use) that decodes the same PNG bytes and tags them in batches of 8. All sides are warmed first
(sessions, tag-embedding caches), then measured in alternating rounds (direct, then each
flavour, the order rotating each round), so a change in the machine's load hits every side.

- **CPU time per image** (the headline, robust where other work shares the cores): the serving
  processes' user + system time (`/proc/<pid>/stat` of `ttd serve` and every descendant) per
  answered request, against the direct process's own CPU time per image. The clients are
  separate processes and not counted.
- **Wall clock** beside it: images/s of each side, and the served/direct ratio (the clients run
  on the same cores, so this ratio is pessimistic for the served side where cores are few).
- Latency p50 / p99 of the served requests; errors; answers different from direct (tags,
  selection, scores within 1e-5).
- Malformed requests after the rounds (each must be refused with a reason), then health.
- `--no-front`: each flavour is also measured with the clients calling tritonserver's own
  loopback port (KServe v2 HTTP), as a row of its own: what the served path costs without the
  front, in the same processes and rounds.
- `--grpc`: the same over tritonserver's gRPC port (KServe v2 gRPC; `ttd serve --grpc-port`).
- `--engine torch|tensorrt --kind KIND_GPU`: the served models and the direct job on a GPU (the
  direct job on `--direct-device`, cuda by default); there the wall-clock ratio is the figure
  (the GPU's time is not CPU time).
- `fused:images_per_request=8`: the clients send 8 images a request (a batch axis of 8, as
  Triton clients batch; the direct job's batch), so the costs per request are shared by 8 images.
  CPU time, images/s and answers different from direct count images; errors and the latency
  percentiles count requests.
- The mean batch of each round from ttd_tagger's statistics (inferences / executions: images per model execution).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DIRECT_SIDES = {"direct": 1, "direct_all_cores": 0}  # onnxruntime threads: the served models' 1, `ttd tag`'s default
RUNTIME_BACKENDS = {"onnx": "onnxruntime", "torch": "torch", "tensorrt": "tensorrt"}  # --engine -> load_tagger's


def world_pairs(count: int, size: int) -> tuple[np.ndarray, list[tuple[bytes, str]]]:
    """World image-caption pairs (seed 2): the images at `size` (uint8), and (PNG bytes, caption)."""
    from ttd.data.world import make_sample

    images, pairs = [], []
    for i in range(count):
        sample = make_sample(2, i)
        buffer = io.BytesIO()
        Image.fromarray(sample.image).save(buffer, "PNG")
        images.append(np.asarray(Image.fromarray(sample.image).resize((size, size), Image.BICUBIC)))
        pairs.append((buffer.getvalue(), sample.caption))
    return np.stack(images), pairs


def malformed_requests(url: str) -> dict[str, str]:
    """Each malformed request and the error the server answered with."""
    import tritonclient.http as http

    from load_client import tagger_request
    from ttd.data.world import make_sample

    client = http.InferenceServerClient(url)
    good_image = io.BytesIO()
    Image.fromarray(make_sample(2, 0).image).save(good_image, "PNG")
    fp32 = http.InferInput("image", [1, 1], "FP32")
    fp32.set_data_from_numpy(np.zeros((1, 1), np.float32))
    cases = {
        "not an image": lambda: tagger_request(http, client, b"\x00garbage", "a red circle"),
        "empty caption": lambda: tagger_request(http, client, good_image.getvalue(), ""),
        "only stopwords": lambda: tagger_request(http, client, good_image.getvalue(), "and the of"),
        "too many tags": lambda: tagger_request(http, client, good_image.getvalue(), tags=[f"t{i}" for i in range(5000)]),
        "oversized payload": lambda: tagger_request(http, client, b"\x89PNG" + b"\0" * (21 << 20), "a red circle"),
        "wrong dtype": lambda: client.infer("ttd_tagger", [fp32]),
    }
    answers = {}
    for name, call in cases.items():
        try:
            call()
            answers[name] = "ACCEPTED (should have been refused)"
        except Exception as error:
            answers[name] = str(error)
    return answers


def batch_counts(url: str) -> tuple[int, int]:
    """ttd_tagger's (requests, executions) so far: their ratio is the batch the dynamic batcher formed."""
    import urllib.request

    with urllib.request.urlopen(f"http://{url}/v2/models/ttd_tagger/stats", timeout=10) as answer:
        stats = json.load(answer)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def healthy(url: str) -> bool:
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    return bool(client.is_server_live() and client.is_server_ready() and client.is_model_ready("ttd_tagger"))


def process_tree_cpu_s(root: int) -> float:
    """User + system seconds of `root` and every live descendant."""
    return sum(process_tree_cpu_by_name(root).values())


def process_tree_cpu_by_name(root: int) -> dict[str, float]:
    """User + system seconds of `root` and every live descendant, summed by process kind: the
    front (`ttd serve` itself), tritonserver, and the Python-backend stubs."""
    parents, times, names = {}, {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        names[int(entry)] = stat[stat.index("(") + 1 : stat.rindex(")")]
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    kinds: dict[str, float] = {}
    for pid in tree:
        kind = "front" if pid == root else "tritonserver" if names.get(pid) == "tritonserver" else "stubs"
        kinds[kind] = kinds.get(kind, 0.0) + times.get(pid, 0.0)
    return kinds


def direct_worker(export_dir: str, pairs: list, batch: int, threads: int, commands, results,
                  engine: str = "onnx", device: str = "cpu", torch_dtype: str = "fp32") -> None:
    """The direct job: one process, the runtime Tagger on onnxruntime with `threads` threads
    (1: the served models' setting; 0: every core, `ttd tag`'s default), decoding each PNG and
    finding each caption's tags inside its timing, as a served request does."""
    from ttd.model.tags import tags_of_caption
    from ttd.runtime import load_tagger

    options = {"threads": threads} if engine == "onnx" else {"dtype": torch_dtype} if engine == "torch" else {}
    tagger = load_tagger(RUNTIME_BACKENDS[engine], export_dir=export_dir, device=device, warn_unfitted=False, **options)

    def run(indices: list[int]) -> list:
        out = []
        for start in range(0, len(indices), batch):  # each caption's tags found here, as a served request's are
            chunk = indices[start : start + batch]
            out += tagger.tag(tagger.prepare([pairs[k][0] for k in chunk]), [tags_of_caption(pairs[k][1]) for k in chunk])
        return out

    expected = run(list(range(len(pairs))))  # also warms the sessions and the tag cache
    results.put([(r.tags, r.scores.tolist(), [t in r.selected for t in r.tags]) for r in expected])
    while (indices := commands.get()) is not None:
        cpu, wall = time.process_time(), time.perf_counter()
        run(indices)
        results.put((time.process_time() - cpu, time.perf_counter() - wall))


def client_worker(pairs: list, commands, results) -> None:
    """One load-generating process: a persistent client per server (gRPC for a `grpc://` url, HTTP
    otherwise); each command is (url, indices, images per request), answered with (indices,
    latency s, answers or None, error or None) per request."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    from load_client import tagger_batch_request

    clients: dict = {}
    while (command := commands.get()) is not None:
        url, indices, per_request = command
        if url not in clients:
            clients[url] = ((grpc, grpc.InferenceServerClient(url.removeprefix(GRPC))) if url.startswith(GRPC)
                            else (http, http.InferenceServerClient(url, network_timeout=120)))
        module, client = clients[url]
        out = []
        for first in range(0, len(indices), per_request):
            chunk = indices[first : first + per_request]
            start = time.perf_counter()
            try:
                got = tagger_batch_request(module, client, [pairs[k][0] for k in chunk], [pairs[k][1] for k in chunk])
                out.append((chunk, time.perf_counter() - start,
                            [(g["tags"], g["scores"].tolist(), g["selected"].tolist()) for g in got], None))
            except Exception as error:
                out.append((chunk, time.perf_counter() - start, None, str(error)[:300]))
        results.put(out)


def answer_of(process, queue, timeout_s: float = 600):
    """The next item `process` puts on `queue`; fails at once when the process has died (a direct
    job that cannot load its engine, say) instead of after the whole timeout."""
    import queue as queues

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=2)
        except queues.Empty:
            if not process.is_alive():
                raise RuntimeError(f"{process.name} exited with code {process.exitcode} (its error is above)") from None
    raise RuntimeError(f"{process.name} gave no answer in {timeout_s:.0f} s")


def same(got, want, atol: float = 1e-5) -> bool:
    return got[0] == want[0] and list(got[2]) == list(want[2]) and np.allclose(got[1], want[1], atol=atol)


TRITON_URL = re.compile(r"tritonserver on (\S+?)\)")
NO_FRONT = " (tritonserver, no front)"  # the side of a flavour whose clients call tritonserver's port
NO_FRONT_GRPC = " (tritonserver gRPC, no front)"  # the same over tritonserver's gRPC port
GRPC = "grpc://"


SERVE_SETTINGS = {"coalesce": "--coalesce"}  # flavour settings that are `ttd serve` options, not config.pbtxt's
CLIENT_SETTINGS = {"images_per_request"}  # flavour settings of the clients: `fused:images_per_request=8`


def images_per_request(side: str) -> int:
    """The images each request of a side carries (a no-front side's name ends in NO_FRONT)."""
    found = re.search(r"images_per_request=(\d+)", side)
    return int(found.group(1)) if found else 1


def start_serve(repo: Path, port: int, timeout_s: float = 180, grpc_port: int | None = None,
                options: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`ttd serve repo` on `port` (and tritonserver's gRPC on `grpc_port`) with `options`; returns
    the process and the loopback address of its tritonserver's HTTP port."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    grpc = ["--grpc-port", str(grpc_port)] if grpc_port else []
    process = subprocess.Popen([sys.executable, "-m", "ttd", "serve", str(repo), "--http-port", str(port), *grpc,
                                *(options or [])],
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if "serving" in line:
            return process, TRITON_URL.search(line).group(1)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"ttd serve {repo} did not start")


def stop_serve(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def served_round(url: str, process: subprocess.Popen, queues: list, results, indices: list[int],
                 expected: list, stats_url: str | None = None, per_request: int = 1) -> dict:
    """One round of `indices` through `url`, `per_request` images a request; `stats_url`: where
    ttd_tagger's statistics are read over HTTP (default `url`; a gRPC side reads tritonserver's
    HTTP port)."""
    shares = [indices[k :: len(queues)] for k in range(len(queues))]
    stats_url = stats_url or url
    counts = batch_counts(stats_url)
    before, wall = process_tree_cpu_by_name(process.pid), time.perf_counter()
    for queue, share in zip(queues, shares):
        queue.put((url, share, per_request))
    answers = [a for _ in queues for a in results.get(timeout=600)]
    wall = time.perf_counter() - wall
    after = process_tree_cpu_by_name(process.pid)
    inferences, executions = (a - b for a, b in zip(batch_counts(stats_url), counts))
    by_kind = {kind: after[kind] - before.get(kind, 0.0) for kind in after}
    cpu = sum(by_kind.values())
    errors = [e for *_, e in answers if e is not None]
    ok = [(chunk, lat, got) for chunk, lat, got, e in answers if e is None]
    images = sum(len(chunk) for chunk, _, _ in ok)
    mismatches = sum(not same(g, expected[i]) for chunk, _, got in ok for i, g in zip(chunk, got, strict=True))
    latency_ms = np.array([lat for _, lat, _ in ok]) * 1000 if ok else np.zeros(1)
    return {"requests": len(answers), "images": images, "errors": len(errors), "mismatches": mismatches,
            "first_errors": errors[:3], "cpu_ms_per_image": 1000 * cpu / max(1, images), "images_per_s": images / wall,
            "mean_batch": inferences / max(1, executions),
            "cpu_ms_per_image_by_process": {k: 1000 * v / max(1, images) for k, v in sorted(by_kind.items())},
            "p50_ms": float(np.percentile(latency_ms, 50)), "p99_ms": float(np.percentile(latency_ms, 99))}


def settings(flavour: str) -> list[tuple[str, str]]:
    return [tuple(s.split("=", 1)) for s in flavour.split(":", 1)[1].split(",")] if ":" in flavour else []


def serve_options(flavour: str) -> list[str]:
    """`fused:coalesce=0`: the `ttd serve` options among a flavour's settings."""
    return [item for key, value in settings(flavour) if key in SERVE_SETTINGS for item in (SERVE_SETTINGS[key], value)]


def tune(repo: Path, flavour: str) -> None:
    """`fused:decode_threads=0,queue_delay_us=8000,instances=2`: set ttd_tagger's config parameters,
    its dynamic batcher's queue delay and its instance count (config.pbtxt is what operators tune;
    the build does not hash it). `coalesce=N` is `ttd serve --coalesce N` (serve_options)."""
    config = repo / "ttd_tagger" / "config.pbtxt"
    text = config.read_text()
    for key, value in settings(flavour):
        if key in SERVE_SETTINGS or key in CLIENT_SETTINGS:
            continue
        if key == "queue_delay_us":
            text = re.sub(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {value}", text)
            continue
        if key == "instances":
            text = re.sub(r"count: \d+", f"count: {value}", text)
            continue
        pattern = re.compile(rf'(key: "{re.escape(key)}" value: {{ string_value: ")[^"]*(")')
        if not pattern.search(text):
            raise SystemExit(f"{flavour}: ttd_tagger has no parameter {key!r}")
        text = pattern.sub(rf"\g<1>{value}\g<2>", text)
    if any(key not in SERVE_SETTINGS and key not in CLIENT_SETTINGS for key, _ in settings(flavour)):
        config.write_text(text)


def cpu_name() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {"model": model, "cores": os.cpu_count(),
            "isa": sorted(f for f in flags if f.startswith(("amx", "avx512f", "avx512_vnni", "avx2")))}


def median(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def run(export_dir: Path, flavours: list[str], clients: int, requests: int, rounds: int, pairs_count: int = 64,
        batch: int = 8, no_front: bool = False, grpc: bool = False, engine: str = "onnx", kind: str | None = None,
        torch_dtype: str = "fp32", direct_device: str | None = None) -> dict:
    """`no_front`: each flavour also measured with its clients calling tritonserver's loopback
    port (KServe v2 HTTP, what an operator's own front or a sidecar would call): the same
    processes and CPU accounting, the front idle. `grpc`: the same over tritonserver's gRPC port.
    `engine`, `kind`, `torch_dtype`: what the served models run on (`ttd triton build`'s
    --graph-engine, --kind, --torch-dtype); the direct side runs the same engine on
    `direct_device` (cpu for onnx, else cuda), as one side ("direct")."""
    direct_sides = DIRECT_SIDES if engine == "onnx" else {"direct": 0}
    direct_device = direct_device or ("cpu" if engine == "onnx" else "cuda")
    from export.triton import BatchingOptions, build_repository
    from ttd.serve.service import free_loopback_port

    context = mp.get_context("spawn")
    _, pairs = world_pairs(pairs_count, 64)
    directs = {}  # side -> (process, commands, results)
    for side, threads in direct_sides.items():
        commands, results = context.Queue(), context.Queue()
        process = context.Process(target=direct_worker, args=(str(export_dir), pairs, batch, threads, commands, results,
                                                              engine, direct_device, torch_dtype))
        process.start()
        directs[side] = (process, commands, results)
    client_queues = [context.Queue() for _ in range(clients)]
    client_results = context.Queue()
    workers = [context.Process(target=client_worker, args=(pairs, q, client_results)) for q in client_queues]
    for w in workers:
        w.start()
    indices = [k % pairs_count for k in range(requests)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        servers, stats_urls = {}, {}
        try:
            expected = answer_of(directs["direct"][0], directs["direct"][2])
            if "direct_all_cores" in directs and answer_of(directs["direct_all_cores"][0],
                                                           directs["direct_all_cores"][2]) is None:
                raise RuntimeError("the all-cores direct job did not start")
            for flavour in flavours:
                repo = build_repository(export_dir, Path(tmp) / flavour.replace(":", "_").replace("=", "-"),
                                        flavour.split(":")[0], engine, BatchingOptions(kind=kind),
                                        torch_dtype=torch_dtype)
                tune(repo, flavour)
                port = free_loopback_port()
                grpc_port = free_loopback_port() if grpc else None
                process, triton_url = start_serve(repo, port, grpc_port=grpc_port, options=serve_options(flavour))
                servers[flavour] = (f"127.0.0.1:{port}", process)
                stats_urls[flavour] = servers[flavour][0]
                if no_front:
                    servers[flavour + NO_FRONT] = (triton_url, process)
                    stats_urls[flavour + NO_FRONT] = triton_url
                if grpc:
                    servers[flavour + NO_FRONT_GRPC] = (f"{GRPC}127.0.0.1:{grpc_port}", process)
                    stats_urls[flavour + NO_FRONT_GRPC] = triton_url
            for flavour, (url, process) in servers.items():  # warm: sessions, tag caches, connections
                warm = served_round(url, process, client_queues, client_results, list(range(pairs_count)), expected,
                                    stats_urls[flavour], images_per_request(flavour))
                if warm["errors"]:
                    raise RuntimeError(f"{flavour}: warm-up errors {warm['first_errors']}")
            sides = [*direct_sides, *servers]
            measured: dict[str, list[dict]] = {side: [] for side in sides}
            for r in range(rounds):
                for side in sides[r % len(sides):] + sides[: r % len(sides)]:
                    if side in directs:
                        directs[side][1].put(indices)
                        cpu, wall = answer_of(directs[side][0], directs[side][2])
                        measured[side].append({"cpu_ms_per_image": 1000 * cpu / len(indices),
                                               "images_per_s": len(indices) / wall})
                    else:
                        url, process = servers[side]
                        measured[side].append(served_round(url, process, client_queues, client_results, indices,
                                                           expected, stats_urls[side], images_per_request(side)))
            # malformed requests go through the front only: tritonserver alone was seen to crash on some
            malformed = {flavour: malformed_requests(servers[flavour][0]) for flavour in flavours}
            health = {flavour: healthy(servers[flavour][0]) for flavour in flavours}
        finally:
            for flavour in flavours:
                if flavour in servers:
                    stop_serve(servers[flavour][1])
            for process, commands, _ in directs.values():
                commands.put(None)
            for q in client_queues:
                q.put(None)
            for process, _, _ in directs.values():
                process.join(30)
            for w in workers:
                w.join(30)
    summary = {side: {"cpu_ms_per_image": median(measured[side], "cpu_ms_per_image"),
                      "images_per_s": median(measured[side], "images_per_s")} for side in direct_sides}
    direct_cpu, direct_ips = summary["direct"]["cpu_ms_per_image"], summary["direct"]["images_per_s"]
    for flavour in servers:
        rows = measured[flavour]
        summary[flavour] = {
            "cpu_ms_per_image": median(rows, "cpu_ms_per_image"), "images_per_s": median(rows, "images_per_s"),
            "p50_ms": median(rows, "p50_ms"), "p99_ms": median(rows, "p99_ms"),
            "errors": sum(r["errors"] for r in rows), "mismatches": sum(r["mismatches"] for r in rows),
            "served_over_direct_by_cpu": direct_cpu / median(rows, "cpu_ms_per_image"),
            "served_over_direct_by_wall": median(rows, "images_per_s") / direct_ips,
            "p99_over_p50": median(rows, "p99_ms") / median(rows, "p50_ms"),
            "mean_batch": median(rows, "mean_batch"),
            "cpu_ms_per_image_by_process": {k: float(np.median([r["cpu_ms_per_image_by_process"].get(k, 0.0)
                                                                 for r in rows]))
                                            for k in rows[0]["cpu_ms_per_image_by_process"]},
        }
        if "direct_all_cores" in summary:
            summary[flavour]["served_over_direct_all_cores_by_cpu"] = (summary["direct_all_cores"]["cpu_ms_per_image"]
                                                                       / median(rows, "cpu_ms_per_image"))
    return {"summary": summary, "rounds": measured, "malformed": malformed, "healthy_after": health,
            "settings": {"clients": clients, "client_processes": clients, "requests_per_round": requests,
                         "rounds": rounds, "pairs": pairs_count, "direct_batch": batch, "direct_threads": direct_sides,
                         "served_intra_op_threads": 1, "repository": "ttd triton build defaults (max batch 32, "
                                                                       "preferred 8,16, queue delay 2 ms, 1 instance)",
                         "export": str(export_dir), "no_front": no_front, "grpc": grpc, "engine": engine,
                         "kind": kind or "KIND_CPU (KIND_GPU for tensorrt)", "torch_dtype": torch_dtype,
                         "direct_device": direct_device},
            "cpu": cpu_name(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "shared_machine": "the cores were shared with other jobs during the run (see load averages); "
                              "CPU time per image is the robust figure, wall clock is indicative"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--flavours", nargs="+", default=["fused", "python"],
                        help="Repository flavours to serve, each optionally tuned: fused:decode_threads=2,queue_delay_us=4000,coalesce=0")
    parser.add_argument("--clients", type=int, default=8, help="Client processes (one request at a time each).")
    parser.add_argument("--requests", type=int, default=512, help="Images per round and side.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-front", action="store_true",
                        help="Also measure each flavour with the clients calling tritonserver's own port (no front).")
    parser.add_argument("--grpc", action="store_true",
                        help="Also measure each flavour with the clients calling tritonserver's gRPC port (no front).")
    parser.add_argument("--engine", choices=sorted(RUNTIME_BACKENDS), default="onnx",
                        help="What the served models and the direct job run (ttd triton build --graph-engine).")
    parser.add_argument("--kind", choices=["KIND_CPU", "KIND_GPU"], default=None,
                        help="The served models' instance kind (ttd triton build --kind); KIND_GPU with torch/tensorrt.")
    parser.add_argument("--torch-dtype", default="fp32", help="Torch engine: weight precision (both sides).")
    parser.add_argument("--direct-device", default=None, help="The direct job's device (default cpu for onnx, else cuda).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = parser.parse_args()
    report = run(args.export_dir, args.flavours, args.clients, args.requests, args.rounds, no_front=args.no_front,
                 grpc=args.grpc, engine=args.engine, kind=args.kind, torch_dtype=args.torch_dtype,
                 direct_device=args.direct_device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
