"""P9: whole-image windows/s ÷ image-encoder images/s (docs/benchmarks.md#p9-whole-image-windows--image-encoder-alone).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/whole_throughput.py --count 400 --repeats 3 --threads 1

World images at the model's own input size (64 px), so each image is exactly one window: the
whole-image job then does the encoder work of `ttd tag`'s centre crop, and any gap is the
whole-image path's own overhead. Measured alternately in one process (model loaded once):
the encoder alone on the decoded images (`Tagger.encode_images`, batch `--batch-size`), the
`ttd segment --captions` job and the `ttd tag --crop whole` job (the steps `ttd.Job` builds for
them, on the job runner) and, for reference, the `ttd tag` centre-crop job (P5).

On a shared machine wall time is not fair, so every run is also measured by CPU time:
- `*_by_cpu`: encoder CPU ÷ the job's CPU (every thread): the work the job adds to the encoder's;
- `*_bound`: encoder CPU ÷ the busier of the job's model thread (`main_cpu`) and the rest of the
  job (decoding, the record stage): the rate a pipelined job reaches with a core for each, the
  figure P9 is judged by on a loaded machine (the job's threads overlap; the encoder alone uses one).
Stage times come from the runner (ttd/jobs/runner.py STAGES; `record_cpu`: the record stage's CPU).
`--outputs DIR` keeps the last run's records (to diff against another tree's: identical bytes).
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

from PIL import Image


def cpu_seconds() -> float:
    """CPU seconds of this process, every thread (the machine may be shared: wall time alone misleads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def write_images(folder: Path, count: int, size: int) -> Path:
    from ttd.data.world import make_sample

    rows = []
    for i in range(count):
        sample = make_sample(7, i, size)
        Image.fromarray(sample.image).save(folder / f"{i:06d}.png")
        rows.append({"image": f"{i:06d}.png", "caption": sample.caption})
    return write_captions(folder / "captions.jsonl", rows)


def write_captions(path: Path, rows: list[dict]) -> Path:
    """A captions file (JSON lines: image, caption)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-jobs", type=int, default=25, help="whole-image jobs run before measuring (steady state)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile one segment job into this file")
    parser.add_argument("--outputs", type=Path, default=None, help="keep the last run's records in this folder")
    args = parser.parse_args()

    from ttd.data.items import open_items
    from ttd.jobs.job import Job, _step
    from ttd.jobs.runner import JobOptions, run_job
    from ttd.jobs.stream_job import tag_stream
    from ttd.runtime import load_tagger

    tagger = load_tagger("torch", device="cpu", threads=args.threads)
    size = tagger.config.image_size
    options = JobOptions(args.batch_size, args.decode_workers, progress=False)
    # the very steps `ttd segment --captions` and `ttd tag --crop whole` run (ttd/jobs/job.py)
    steps = {"segment": _step(Job("-", "-", segment=True, batch_size=args.batch_size), None),
             "tag_whole": _step(Job("-", "-", crop="whole", batch_size=args.batch_size), None)}
    steps["warm"] = steps["profiled"] = steps["segment"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        captions = write_images(folder, args.count, size)
        decoded = tagger.prepare([item.path for item in open_items(captions)])

        cpu: dict[str, float] = {}

        def encoder() -> float:
            started, used = time.perf_counter(), cpu_seconds()
            for start in range(0, len(decoded), args.batch_size):
                tagger.encode_images(decoded[start : start + args.batch_size])
            cpu["encoder"] = cpu_seconds() - used
            return args.count / (time.perf_counter() - started)

        def whole(name: str):
            started, used = time.perf_counter(), cpu_seconds()
            summary = run_job(tagger, steps[name], open_items(captions), folder / f"{name}.jsonl", {}, options)
            assert summary.items == args.count and not summary.errors, summary.line()
            cpu[name] = cpu_seconds() - used
            return args.count / (time.perf_counter() - started), summary

        def centre():
            started, used = time.perf_counter(), cpu_seconds()
            summary = tag_stream(tagger, open_items(captions), folder / "centre.jsonl", batch_size=args.batch_size,
                                 progress=False, decode_workers=args.decode_workers)
            cpu["centre"] = cpu_seconds() - used
            return args.count / (time.perf_counter() - started), summary

        # warm-up: the torch encoders trace a shape once its eager calls took 0.5 s
        # (ttd/runtime/traced_graph.py); the rarest caption-length bucket gets there after ~20 jobs
        encoder(), centre()
        for _ in range(args.warmup_jobs):
            whole("warm")
        if args.profile:
            import cProfile

            cProfile.runctx("whole('profiled')", globals(), locals(), str(args.profile))

        def bound(summary, total: float) -> float:
            main = summary.stages.get("main_cpu", 0.0)
            return cpu["encoder"] / max(main, total - main)

        for _ in range(args.repeats):
            enc = encoder()
            encoder_cpu = cpu["encoder"]
            seg, seg_summary = whole("segment")
            seg_bound = bound(seg_summary, cpu["segment"])
            enc2 = encoder()
            tag_whole, tag_summary = whole("tag_whole")
            cen, cen_summary = centre()
            runs.append({"encoder_img_s": [enc, enc2], "segment_windows_s": seg, "tag_whole_windows_s": tag_whole,
                         "centre_img_s": cen, "p9_segment": seg / enc, "p9_tag_whole": tag_whole / enc2,
                         "p5_centre": cen / enc2, "encoder_cpu_s": [encoder_cpu, cpu["encoder"]],
                         "segment_cpu_s": cpu["segment"], "tag_whole_cpu_s": cpu["tag_whole"],
                         "centre_cpu_s": cpu["centre"],
                         "p9_segment_by_cpu": encoder_cpu / cpu["segment"],
                         "p9_tag_whole_by_cpu": cpu["encoder"] / cpu["tag_whole"],
                         "p5_centre_by_cpu": cpu["encoder"] / cpu["centre"],
                         "p9_segment_bound": seg_bound,
                         "p9_tag_whole_bound": bound(tag_summary, cpu["tag_whole"]),
                         "p5_centre_bound": bound(cen_summary, cpu["centre"]),
                         "stages_segment_s": {k: round(v, 4) for k, v in seg_summary.stages.items()},
                         "stages_tag_whole_s": {k: round(v, 4) for k, v in tag_summary.stages.items()},
                         "stages_centre_s": {k: round(v, 4) for k, v in cen_summary.stages.items()}})
            r = runs[-1]
            print(f"encoder {enc:.0f}/{enc2:.0f} img/s; segment {seg:.0f} windows/s (P9 {r['p9_segment']:.3f}); "
                  f"tag --crop whole {tag_whole:.0f} (P9 {r['p9_tag_whole']:.3f}); centre {cen:.0f} img/s "
                  f"(P5 {r['p5_centre']:.3f})\n    by CPU time, job's total: segment {r['p9_segment_by_cpu']:.3f}, "
                  f"tag --crop whole {r['p9_tag_whole_by_cpu']:.3f}, centre {r['p5_centre_by_cpu']:.3f}; "
                  f"busier thread group: segment {r['p9_segment_bound']:.3f}, tag --crop whole "
                  f"{r['p9_tag_whole_bound']:.3f}, centre {r['p5_centre_bound']:.3f}\n"
                  f"    segment {seg_summary.profile()}\n    centre {cen_summary.profile()}", flush=True)
        if args.outputs:
            args.outputs.mkdir(parents=True, exist_ok=True)
            for name in ("segment", "tag_whole", "centre"):
                (args.outputs / f"{name}.jsonl").write_bytes((folder / f"{name}.jsonl").read_bytes())
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    report = {"count": args.count, "batch": args.batch_size, "threads": args.threads,
              "decode_workers": args.decode_workers, "cpu": cpu.split(":", 1)[-1].strip(), "runs": runs,
              "p9_segment_median": statistics.median(r["p9_segment"] for r in runs),
              "p9_tag_whole_median": statistics.median(r["p9_tag_whole"] for r in runs),
              "p5_centre_median": statistics.median(r["p5_centre"] for r in runs),
              "p9_segment_by_cpu_median": statistics.median(r["p9_segment_by_cpu"] for r in runs),
              "p9_tag_whole_by_cpu_median": statistics.median(r["p9_tag_whole_by_cpu"] for r in runs),
              "p5_centre_by_cpu_median": statistics.median(r["p5_centre_by_cpu"] for r in runs),
              "p9_segment_bound_median": statistics.median(r["p9_segment_bound"] for r in runs),
              "p9_tag_whole_bound_median": statistics.median(r["p9_tag_whole_bound"] for r in runs),
              "p5_centre_bound_median": statistics.median(r["p5_centre_bound"] for r in runs),
              "load_average": open("/proc/loadavg").read().split()[:3]}
    print(f"P9 median: segment {report['p9_segment_median']:.3f}, tag --crop whole {report['p9_tag_whole_median']:.3f}; "
          f"P5 centre {report['p5_centre_median']:.3f}; by CPU time, job's total: segment "
          f"{report['p9_segment_by_cpu_median']:.3f}, tag --crop whole {report['p9_tag_whole_by_cpu_median']:.3f}, "
          f"centre {report['p5_centre_by_cpu_median']:.3f}; busier thread group: segment "
          f"{report['p9_segment_bound_median']:.3f}, tag --crop whole {report['p9_tag_whole_bound_median']:.3f}, "
          f"centre {report['p5_centre_bound_median']:.3f}; {report['cpu']}; load {report['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
