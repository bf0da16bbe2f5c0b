"""Memory high-water of `ttd serve` when a client calls the models with a huge tag list (issue #8,
item 12: the encoder models called directly with 200,000 tags once took the server to 1.2 GB).

    python benchmarks/huge_tags_memory.py --export-dir out/export --tags 200000

Starts `ttd serve` by absolute path with a bare environment, then sends each case once and reads,
for every process of the service (`ttd serve` with its HTTP front, tritonserver, the Python-backend
stubs), the peak resident memory during the case (VmHWM, reset before each case through
/proc/PID/clear_refs) and the resident memory after it. The cases go through the front, and the
largest also straight to tritonserver's loopback port (what a client reached before the front).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from export.triton import build_repository
from ttd.data.world import make_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import cpu_model, served  # noqa: E402


def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children.get(p, []))
    return pids


def memory_kib(pids: list[int], field: str) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1])
    return total


def reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak resident set size


def main() -> None:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--tags", type=int, default=200_000)
    parser.add_argument("--port", type=int, default=18700)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/huge_tags_memory.json"))
    args = parser.parse_args()

    def call(url: str, model: str, arrays: dict[str, tuple[np.ndarray, str]]) -> str:
        client = http.InferenceServerClient(url, network_timeout=300, connection_timeout=300)
        inputs = []
        for name, (array, dtype) in arrays.items():
            tensor = http.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            client.infer(model, inputs)
            return "200 accepted"
        except InferenceServerException as error:
            return f"{error.status()} {error.message()[:160]}"

    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(args.export_dir, Path(tmp) / "repo", "python")
        with served(repo, args.port, Path(tmp)) as (serve, direct):
            front = f"127.0.0.1:{args.port}"
            config = http.InferenceServerClient(front).get_model_config("ttd_tag_head")
            dims = {i["name"]: [int(d) for d in i["dims"]] for i in config["input"]}
            width, context = dims["tag_embeds"][1], 32
            patch = np.zeros((1, *dims["patch_embeds"]), np.float32)
            n = args.tags
            tag_head = {"patch_embeds": (patch, "FP32"), "tag_embeds": (np.zeros((1, n, width), np.float32), "FP32")}
            under_bound = {"patch_embeds": (patch, "FP32"),
                           "tag_embeds": (np.zeros((1, (60 << 20) // (4 * width), width), np.float32), "FP32")}
            ids = np.zeros((n, context), np.int64)
            buffer = io.BytesIO()
            Image.fromarray(make_sample(3, 0).image).save(buffer, "PNG")
            image = buffer.getvalue()
            tags = np.array([[f"tag{i}".encode() for i in range(n)]], dtype=np.object_)
            cases = [
                ("baseline (no request)", None, None, None),
                (f"ttd_tagger, {n:,} tags, via front", front, "ttd_tagger",
                 {"image": (np.array([[image]], dtype=np.object_), "BYTES"), "tags": (tags, "BYTES")}),
                (f"ttd_text_encoder, {n:,} rows, via front", front, "ttd_text_encoder", {"input_ids": (ids, "INT64")}),
                (f"ttd_tag_head, {n:,} tags, via front", front, "ttd_tag_head", tag_head),
                (f"ttd_tag_head, {under_bound['tag_embeds'][0].shape[1]:,} tags (60 MiB, under the 64 MiB bound), "
                 "via front", front, "ttd_tag_head", under_bound),
                (f"ttd_tag_head, {n:,} tags, straight to tritonserver (loopback only)", direct, "ttd_tag_head", tag_head),
            ]
            rows = []
            for name, url, model, arrays in cases:
                pids = tree(serve.pid)
                reset_peaks(pids)
                answer = call(url, model, arrays) if url else ""
                time.sleep(1.0)
                pids = [p for p in pids if Path(f"/proc/{p}").exists()]
                rows.append({"case": name, "answer": answer, "peak_mib": round(memory_kib(pids, "VmHWM") / 1024, 1),
                             "resident_after_mib": round(memory_kib(pids, "VmRSS") / 1024, 1)})
                print(json.dumps(rows[-1]), flush=True)
    report = {"tags": n, "peak": "sum over the service's processes of VmHWM, reset before each case", "cases": rows,
              "cpu": cpu_model()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
