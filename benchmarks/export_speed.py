"""Per-precision export figures and CPU throughput relative to PyTorch fp32, in one run.

    python benchmarks/export_speed.py --model ViT-B-16 --out benchmarks/results/export_vit_b_16.json

For each precision the model is exported (parity/quality gates included), then the image encoder
(batch --image-batch) and the text encoder (batch --text-batch) are timed in onnxruntime on this
machine's CPU, beside the PyTorch fp32 and bf16 baselines. Refused variants are listed with why.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.checks import GateError
from export.pipeline import run_export
from ttd.model.factory import load_model
from ttd.runtime.export_dir import read_export
from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend
from ttd.runtime.torch_backend import TorchBackend


def throughput(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return batch * repeats / (time.perf_counter() - start)


def measure(backend, size: int, context: int, image_batch: int, text_batch: int, repeats: int) -> dict:
    pixels = np.random.default_rng(0).normal(size=(image_batch, 3, size, size)).astype(np.float32)
    ids = np.random.default_rng(0).integers(3, 40, size=(text_batch, context)).astype(np.int64)
    return {"images_per_s": throughput(lambda: backend.encode_images(pixels), image_batch, repeats),
            "texts_per_s": throughput(lambda: backend.encode_texts(ids), text_batch, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip name or registered config (default: embedded model)")
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-count", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.model)
    config = model.config
    sizes = (config.image_size, config.context_length, args.image_batch, args.text_batch, args.repeats)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        rows[f"torch {dtype}"] = measure(TorchBackend(load_model(args.model), "cpu", dtype), *sizes)
        print(f"torch {dtype}", rows[f"torch {dtype}"], flush=True)
    for precision, mode in (("fp32", "dynamic"), ("fp16", "dynamic"), ("bf16", "dynamic"), ("int8", "dynamic"),
                            ("int8", "static")):
        name = f"onnx {precision}" + (f" ({mode})" if precision == "int8" else "")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                manifest = run_export(load_model(args.model), Path(tmp), precision, mode, check_count=args.check_count)
            except GateError as error:
                rows[name] = {"refused": str(error)}
                print(name, "refused:", error, flush=True)
                continue
            figures = manifest.get("quality", manifest["parity"])
            row = measure(OnnxRuntimeBackend(read_export(tmp), "cpu", threads=2), *sizes)
            row.update({"min_cosine": min(figures["min_cosine"][k] for k in ("image_embeds", "patch_embeds", "text_embeds")),
                        "max_abs_patch": figures["max_abs"]["patch_embeds"], "tag_agreement": figures["tag_agreement"],
                        "encoder_mb": sum((Path(tmp) / f"{g}.onnx").stat().st_size for g in ("image_encoder", "text_encoder")) / 1e6})
            rows[name] = row
            print(name, row, flush=True)
    base = rows["torch float32"]
    for row in rows.values():
        if "images_per_s" in row:
            row["image_speedup"] = row["images_per_s"] / base["images_per_s"]
            row["text_speedup"] = row["texts_per_s"] / base["texts_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": config.name, "settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
    print("| variant | min cosine | tag agreement | images/s | × torch fp32 | texts/s | × torch fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if "refused" in row:
            print(f"| {name} | refused: {row['refused'][:90]} | | | | | |")
            continue
        cos = f"{row['min_cosine']:.5f}" if "min_cosine" in row else ("reference" if name == "torch float32" else "—")
        agree = f"{100 * row['tag_agreement']:.1f}%" if "tag_agreement" in row else ""
        print(f"| {name} | {cos} | {agree} | {row['images_per_s']:.1f} | {row['image_speedup']:.2f} | "
              f"{row['texts_per_s']:.1f} | {row['text_speedup']:.2f} |")


if __name__ == "__main__":
    main()
