"""`ttd tag` output formats: JSON lines vs Parquet shards, without and with --rle-masks.

    PYTHONPATH=. python benchmarks/tag_output_formats.py --count 512 --repeats 2

The same streaming job (ttd.jobs.stream_job.tag_stream, embedded world model, torch, one thread, no
decoding workers) on `count` world PNGs, once per output; prints wall and CPU seconds, images/s
and the bytes on disk. Model loading and writing the images are excluded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from ttd.data.world import make_sample
    from ttd.data.items import open_items
    from ttd.runtime import load_tagger
    from ttd.jobs.stream_job import tag_stream

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        for i in range(args.count):
            sample = make_sample(5, i)
            Image.fromarray(sample.image).save(folder / f"img{i}.png")
            rows.append({"image": f"img{i}.png", "caption": sample.caption})
        captions = folder / "captions.jsonl"
        captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tagger = load_tagger("torch", device="cpu", threads=1)
        for repeat in range(args.repeats):
            for name, rle in (("tags.jsonl", False), ("tags.parquet", False), ("rle.jsonl", True),
                              ("rle.parquet", True)):
                out = folder / name
                shutil.rmtree(out, ignore_errors=True)
                out.unlink(missing_ok=True)
                wall, cpu = time.perf_counter(), time.process_time()
                summary = tag_stream(tagger, open_items(captions), out, batch_size=args.batch_size, progress=False,
                                     decode_workers=0, rle_masks=rle)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
                print(f"repeat {repeat}  {name:13s} {summary.items} records  wall {wall:.2f} s  cpu {cpu:.2f} s  "
                      f"{summary.items / wall:.0f} img/s  {size / 1e3:.0f} kB", flush=True)


if __name__ == "__main__":
    main()
