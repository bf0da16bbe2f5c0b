"""Load test of the served tagger, and served vs direct onnxruntime throughput, in one run.

    python benchmarks/serve_load.py --export-dir out/export --clients 8 --requests 400

Builds a python-flavour repository from the export, starts the bundled tritonserver on
127.0.0.1, tags world images with N concurrent clients (every answer checked against direct
onnxruntime), sends malformed requests between them, then checks the server is still healthy.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from export.triton import BatchingOptions, build_repository
from ttd.data.world import make_sample
from ttd.runtime import load_tagger
from ttd.serve.triton_server import start_server
from ttd.model.tags import candidate_tags
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_client import load_test, tagger_request  # noqa: E402


def world_pairs(count: int, size: int) -> tuple[np.ndarray, list[tuple[bytes, str]]]:
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

    client = http.InferenceServerClient(url)
    good_image = io.BytesIO()
    Image.fromarray(make_sample(2, 0).image).save(good_image, "PNG")
    answers = {}
    cases = {
        "not an image": lambda: tagger_request(http, client, b"\x00garbage", "a red circle"),
        "empty caption": lambda: tagger_request(http, client, good_image.getvalue(), ""),
        "only stopwords": lambda: tagger_request(http, client, good_image.getvalue(), "and the of"),
        "too many tags": lambda: tagger_request(http, client, good_image.getvalue(), tags=[f"t{i}" for i in range(5000)]),
        "oversized payload": lambda: tagger_request(http, client, b"\x89PNG" + b"\0" * (21 << 20), "a red circle"),
        "wrong dtype": lambda: client.infer("ttd_tagger", [_fp32_image(http)]),
    }
    for name, call in cases.items():
        try:
            call()
            answers[name] = "ACCEPTED (should have been refused)"
        except Exception as error:
            answers[name] = str(error)
    return answers


def _fp32_image(http):
    tensor = http.InferInput("image", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1), np.float32))
    return tensor


def run(export_dir: Path, clients: int, requests: int, port: int, pairs_count: int = 64, batch: int = 8) -> dict:
    direct = load_tagger("onnxruntime", export_dir=str(export_dir), device="cpu")
    images, pairs = world_pairs(pairs_count, direct.config.image_size)
    tag_lists = [candidate_tags(c) for _, c in pairs]
    start = time.perf_counter()
    results = []
    for i in range(0, len(images), batch):
        results += direct.tag(images[i : i + batch], tag_lists[i : i + batch])
    direct_seconds = time.perf_counter() - start
    expected = [{"tags": r.tags, "scores": r.scores, "selected": np.array([t in r.selected for t in r.tags])}
                for r in results]
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(export_dir, Path(tmp) / "repo", "python",
                                batching=BatchingOptions(max_batch_size=32, preferred_batch_sizes=(batch,)))
        with start_server(repo, http_port=port, grpc_port=port + 1) as server:
            url = server.http_url
            load_test(url, pairs, expected, clients, min(len(pairs), 16))  # warm the tag cache and the sessions
            first = load_test(url, pairs, expected, clients, requests // 2)
            bad = malformed_requests(url)
            second = load_test(url, pairs, expected, clients, requests - requests // 2)
            import tritonclient.http as http

            client = http.InferenceServerClient(url)
            healthy = client.is_server_live() and client.is_server_ready() and client.is_model_ready("ttd_tagger")
    merged = first.summary() | {"second_half": second.summary()}
    return {"direct_images_per_s": len(images) / direct_seconds, "served": merged, "malformed": bad,
            "healthy_after": bool(healthy), "clients": clients, "batch": batch,
            "errors": first.errors[:3] + second.errors[:3], "mismatches": first.mismatches[:3] + second.mismatches[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--port", type=int, default=18200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = parser.parse_args()
    report = run(args.export_dir, args.clients, args.requests, args.port)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
