"""What `ttd serve`'s HTTP front costs (issue #8): the same load sent to the front and, in the
same run, straight to the tritonserver behind it (its loopback port, printed by `ttd serve`).

    python benchmarks/front_overhead.py --export-dir out/export --requests 1000 --clients 16 --rounds 2

Starts `ttd serve` by absolute path with a bare environment on 127.0.0.1. Two loads, each run
front / direct in alternation `--rounds` times (so drift on a shared machine hits both alike):
`tagger` (a ttd_tagger call on a world image and caption: what clients do) and `light` (a one-row
ttd_text_encoder call: little model time, so the front's own cost shows). Reports throughput and
p50 / p99 latency per path, summed over rounds, and the CPU time the front process (`ttd serve`)
spent per request: on a machine shared with other work the wall-clock figures are noisy, the CPU
time is not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from export.triton import BatchingOptions, build_repository

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_client import run_clients, tagger_request  # noqa: E402
from serve_load import world_pairs  # noqa: E402
from service import cpu_model, served  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, requests: int, clients: int, call) -> tuple[float, list[float]]:
    """(seconds, latencies in ms) of `requests` calls of `call(client, index)` from `clients` threads."""
    lock, latencies = threading.Lock(), []

    def timed(client, index: int) -> None:
        start = time.perf_counter()
        call(client, index)
        with lock:
            latencies.append((time.perf_counter() - start) * 1000)

    return run_clients(url, clients, requests, timed), latencies


def main() -> None:
    import tritonclient.http as http

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=1000, help="Per load, path and round.")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/front_overhead.json"))
    args = parser.parse_args()
    _, pairs = world_pairs(32, 64)
    ids = np.zeros((1, 32), np.int64)
    ids[0, 0] = 1

    def tagger(client, index):
        image, caption = pairs[index % len(pairs)]
        tagger_request(http, client, image, caption)

    def light(client, index):
        tensor = http.InferInput("input_ids", list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids)
        client.infer("ttd_text_encoder", [tensor])

    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(args.export_dir, Path(tmp) / "repo", "python",
                                batching=BatchingOptions(max_batch_size=32, preferred_batch_sizes=(8,)))
        with served(repo, args.port, Path(tmp)) as (serve, direct):
            paths = {"front": f"127.0.0.1:{args.port}", "direct": direct}
            for url in paths.values():  # warm-up
                load(url, 64, args.clients, tagger)
            results = {}
            for name, call in (("tagger", tagger), ("light", light)):
                seconds = {path: 0.0 for path in paths}
                latencies = {path: [] for path in paths}
                front_cpu = 0.0
                for _ in range(args.rounds):
                    for path, url in paths.items():
                        cpu = cpu_seconds(serve.pid)
                        took, lat = load(url, args.requests, args.clients, call)
                        if path == "front":
                            front_cpu += cpu_seconds(serve.pid) - cpu
                        seconds[path] += took
                        latencies[path] += lat
                        print(f"{name} {path}: {args.requests / took:.0f} req/s", flush=True)
                results[name] = {path: {"throughput_rps": round(len(latencies[path]) / seconds[path], 1),
                                        "p50_ms": round(float(np.percentile(latencies[path], 50)), 2),
                                        "p99_ms": round(float(np.percentile(latencies[path], 99)), 2)}
                                 for path in paths}
                results[name]["front_cpu_ms_per_request"] = round(front_cpu * 1000 / (args.requests * args.rounds), 3)
    report = {"requests_per_path": args.requests * args.rounds, "clients": args.clients, "rounds": args.rounds,
              **results, "cpu": cpu_model(),
              "cores": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
