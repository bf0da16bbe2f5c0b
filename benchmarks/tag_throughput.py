"""P5: end-to-end `ttd tag` throughput ÷ image-encoder-only throughput, same backend and batch.

    PYTHONPATH=. python benchmarks/tag_throughput.py --model world --count 512 --repeats 3
    PYTHONPATH=. python benchmarks/tag_throughput.py --model ViT-B-16 --count 96 --repeats 3

End-to-end is the streaming job behind `ttd tag` (ttd.jobs.stream_job.tag_stream: read the captions
JSONL, decode the JPEGs, tokenise and encode the tags, run the image encoder and the tag head,
write the JSON lines) with a loaded model (model loading is excluded and reported apart).
Encoder-only is `Tagger.encode_images` on the same images already decoded, at the same batch.
The two are measured alternately `--repeats` times in one process; the machine may be shared,
so each figure comes with CPU seconds (this process + its decoding workers), the ratio by CPU
time (encoder CPU s ÷ job CPU s: the share of the job's work that is the encoder) and the spread,
and each job's stage times (ttd/jobs/runner.py STAGES: decode, upload, encode, head, host, write).
Decoding processes (--decode-workers N > 0) are one pool started before the first run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_images(folder: Path, count: int, size: int) -> Path:
    """`count` world scenes as JPEGs of `size` px (+ captions.jsonl), as a dataset would hold them."""
    from ttd.data.world import make_sample

    rows = []
    for i in range(count):
        sample = make_sample(7, i, size)
        Image.fromarray(sample.image).save(folder / f"{i:06d}.jpg", quality=90)
        rows.append({"image": f"{i:06d}.jpg", "caption": sample.caption})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="world", help="'world' (the embedded default model) or an open_clip "
                                                          "architecture with random weights (ViT-B-16)")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--decode-workers", type=int, default=None, help="default: as `ttd tag`")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="the plain (not pipelined) path of the job")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from ttd.data.items import open_items
    from ttd.runtime import load_tagger
    from ttd.jobs.stream_job import tag_stream
    from ttd.jobs.decoding import DecodingPool, default_decode_workers

    started = time.perf_counter()
    tagger = load_tagger(args.backend, model=None if args.model == "world" else args.model, device="cpu",
                         dtype=args.dtype, threads=args.threads)
    load_seconds = time.perf_counter() - started
    size = tagger.config.image_size
    workers = default_decode_workers() if args.decode_workers is None else args.decode_workers
    pool = DecodingPool(workers) if workers > 0 else None  # started once: every run below is steady state
    job = dict(batch_size=args.batch_size, progress=False, decode_workers=workers, decoding_pool=pool,
               pipelined=not args.plain)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        captions = write_images(folder, args.count, max(size, 256))
        items = list(open_items(captions))
        decoded = tagger.prepare([item.path for item in items])
        for start in range(0, min(len(decoded), 2 * args.batch_size), args.batch_size):  # warm-up
            tagger.encode_images(decoded[start : start + args.batch_size])
        tag_stream(tagger, open_items(captions), folder / "warm.jsonl", **job)
        runs = []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), cpu_seconds()
            for start in range(0, len(decoded), args.batch_size):
                tagger.encode_images(decoded[start : start + args.batch_size])
            encoder = (time.perf_counter() - wall, cpu_seconds() - cpu)
            wall, cpu = time.perf_counter(), cpu_seconds()
            summary = tag_stream(tagger, open_items(captions), folder / "tags.jsonl", **job)
            ran = (time.perf_counter() - wall, cpu_seconds() - cpu)
            assert summary.items == args.count and not summary.errors, summary.line()
            runs.append({"encoder_img_s": args.count / encoder[0], "encoder_cpu_s": encoder[1],
                         "job_img_s": args.count / ran[0], "job_cpu_s": ran[1],
                         "p5": encoder[0] / ran[0], "p5_cpu": encoder[1] / ran[1],
                         "stages_s": {k: round(v, 4) for k, v in summary.stages.items()}})
    if pool is not None:
        pool.close()
    cpu_name = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    p5, p5_cpu = [r["p5"] for r in runs], [r["p5_cpu"] for r in runs]
    report = {"model": args.model, "backend": args.backend, "dtype": args.dtype, "batch": args.batch_size,
              "count": args.count, "decode_workers": workers, "threads": args.threads, "pipelined": not args.plain, "load_s": load_seconds,
              "cpu": cpu_name.split(":", 1)[-1].strip(), "runs": runs, "p5_median": statistics.median(p5),
              "p5_min": min(p5), "p5_max": max(p5),
              "p5_cpu_median": statistics.median(p5_cpu), "p5_cpu_min": min(p5_cpu), "p5_cpu_max": max(p5_cpu)}
    for r in runs:
        print(f"encoder {r['encoder_img_s']:7.1f} img/s ({r['encoder_cpu_s']:.2f} CPU s)   "
              f"ttd tag {r['job_img_s']:7.1f} img/s ({r['job_cpu_s']:.2f} CPU s)   P5 {r['p5']:.3f} "
              f"(by CPU time {r['p5_cpu']:.3f})")
        print("    stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages_s"].items()))
    print(f"P5 {args.model} {args.backend} {args.dtype} batch {args.batch_size}: median {report['p5_median']:.3f} "
          f"(min {report['p5_min']:.3f}, max {report['p5_max']:.3f}); by CPU time: median {report['p5_cpu_median']:.3f} "
          f"(min {report['p5_cpu_min']:.3f}, max {report['p5_cpu_max']:.3f}); model load {load_seconds:.1f} s; {report['cpu']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
