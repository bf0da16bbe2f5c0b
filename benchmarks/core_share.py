"""The model's thread keeps a core (ttd/jobs/core_share.py): jobs with and without it, paired.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/core_share.py --rounds 20 --json benchmarks/results/core_share_paired.json

On a shared or throttled machine the speed moves by ±10 % from one minute to the next, so
separate runs of two trees compare badly. Here one process runs each job with the share and
without it (its helpers never wait: `CoreShare.helper` made a no-op for that job), back to back,
the order alternating by round, and the encoder alone once per round:

- P9 / P5 jobs (docs/benchmarks.md): 400 world images of 64 px, `ttd segment --captions`,
  `ttd tag --crop whole` and the centre-crop `ttd tag`; the ratio encoder seconds ÷ job seconds;
- jobs whose helpers are the slower side: 120 JPEGs of 1024×768 made from scikit-image's
  astronaut photo — the centre crop (decoding-bound) and `ttd segment --captions` (two windows an
  image, masks built and RLE-encoded at 1024×768: the record stage is the slower side); seconds
  per job.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image

from whole_throughput import write_captions, write_images


def write_photos(folder: Path, count: int) -> Path:
    """`count` JPEGs of 1024×768, each a slightly different crop and turn of a real photo."""
    location = importlib.util.find_spec("skimage")
    if location is None:
        raise SystemExit("the photos come from scikit-image's data: pip install scikit-image")
    photo = Path(location.submodule_search_locations[0]) / "data" / "astronaut.png"
    base = Image.open(photo).convert("RGB").resize((1024, 768))
    rows = []
    for i in range(count):
        image = base.rotate(i % 7).crop((i % 13, i % 11, 1024 - i % 5, 768 - i % 3))
        image.save(folder / f"photo_{i:04d}.jpg", quality=90)
        rows.append({"image": f"photo_{i:04d}.jpg", "caption": "a red circle and a blue square on the grass"})
    return write_captions(folder / "photos.jsonl", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--heavy-rounds", type=int, default=6, help="rounds of the 1024×768 JPEG jobs")
    parser.add_argument("--warmup-jobs", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from ttd.data.items import open_items
    from ttd.jobs import core_share
    from ttd.jobs.job import Job, _step
    from ttd.jobs.runner import JobOptions, run_job
    from ttd.jobs.stream_job import tag_stream
    from ttd.runtime import load_tagger

    tagger = load_tagger("torch", device="cpu", threads=1)
    steps = {"segment": _step(Job("-", "-", segment=True, batch_size=32), None),
             "tag_whole": _step(Job("-", "-", crop="whole", batch_size=32), None)}
    sharing = [True]
    helper = core_share.CoreShare.helper

    @contextlib.contextmanager
    def switchable(share):
        if sharing[0]:
            with helper(share):
                yield
        else:
            yield

    core_share.CoreShare.helper = switchable

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        world = write_images(folder, 400, tagger.config.image_size)
        photos = write_photos(folder, 120)
        decoded = tagger.prepare([item.path for item in open_items(world)])

        def job(kind: str, captions: Path) -> float:
            if kind == "centre":
                return tag_stream(tagger, open_items(captions), folder / "centre.jsonl", batch_size=32,
                                  progress=False, decode_workers=0).seconds
            return run_job(tagger, steps[kind], open_items(captions), folder / f"{kind}.jsonl", {},
                           JobOptions(32, 0, progress=False)).seconds

        def encoder() -> float:
            started = time.perf_counter()
            for start in range(0, len(decoded), 32):
                tagger.encode_images(decoded[start : start + 32])
            return time.perf_counter() - started

        for _ in range(args.warmup_jobs):  # the encoders' traces made (ttd/runtime/traced_graph.py)
            job("segment", world)
        for kind in ("centre", "segment"):
            job(kind, photos)
        def sides(n: int):
            """"share" and "no_share", the share switched to each in turn (which first: by round)."""
            for on in ((True, False) if n % 2 == 0 else (False, True)):
                sharing[0] = on
                yield "share" if on else "no_share"
            sharing[0] = True

        world_ratio: dict[str, dict[str, list[float]]] = {}
        photo_seconds: dict[str, dict[str, list[float]]] = {}
        for n in range(args.rounds):
            for kind in ("segment", "tag_whole", "centre"):
                seconds = encoder()
                for side in sides(n):
                    world_ratio.setdefault(kind, {}).setdefault(side, []).append(seconds / job(kind, world))
            if n < args.heavy_rounds:
                for kind in ("centre", "segment"):
                    for side in sides(n):
                        photo_seconds.setdefault(kind, {}).setdefault(side, []).append(job(kind, photos))

    def summary(values: list[float]) -> dict:
        return {"median": statistics.median(values), "worst": min(values), "best": max(values),
                "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    report = {"cpu": cpu.split(":", 1)[-1].strip(), "rounds": args.rounds, "heavy_rounds": args.heavy_rounds,
              "world_ratio": {k: {s: summary(v) for s, v in sides.items()} for k, sides in world_ratio.items()},
              "photo_seconds": {k: {s: summary(v) for s, v in sides.items()} for k, sides in photo_seconds.items()},
              "load_average": open("/proc/loadavg").read().split()[:3]}
    for kind, sides in report["world_ratio"].items():
        print(f"world {kind}: encoder ÷ job, median (worst): " + ", ".join(
            f"{side} {s['median']:.3f} ({s['worst']:.3f})" for side, s in sides.items()))
    for kind, sides in report["photo_seconds"].items():
        print(f"1024x768 JPEGs {kind}: seconds per 120 images, median: " + ", ".join(
            f"{side} {s['median']:.3f}" for side, s in sides.items()))
    print(f"{report['cpu']}; load {report['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
