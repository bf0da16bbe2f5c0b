"""Open-vocabulary segmentation on the world's segmentation split: base vs TTD, per-class mIoU /
mFPR / mFNR (ttd eval-segmentation's numbers), for the background threshold θ and for whole-image
inference vs the centre crop on larger images.

    python benchmarks/segmentation.py --ttd runs/ttd/model.safetensors --count 100 \
        --labelling shapes --out benchmarks/results/segmentation_shapes.json

Each row is one `ttd eval-segmentation` run, e.g.
    ttd eval-segmentation --count 100 --mask-threshold 0.9 --checkpoint runs/ttd/model.safetensors
    ttd eval-segmentation --count 100 --size 128 --scales 2 --stride 32 --mask-threshold 0.9 --world-classes colours
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ttd.data.voc import world_segmentation_samples
from ttd.model.factory import DEFAULT_CHECKPOINT
from ttd.runtime import load_tagger
from ttd.evaluation.segmentation import evaluate_segmentation
from ttd.segment.segmentation import SegmentOptions

SETTINGS = (  # (name, world image side, options)
    ("64 px, θ 0.5", 64, SegmentOptions(mask_threshold=0.5)),
    ("64 px, θ 0.9", 64, SegmentOptions(mask_threshold=0.9)),
    ("64 px, θ 0.9, PAMR", 64, SegmentOptions(mask_threshold=0.9, pamr=True)),
    ("128 px, θ 0.9, centre crop", 128, SegmentOptions(crop="center", mask_threshold=0.9)),
    ("128 px, θ 0.9, whole, scale 2, stride 32", 128, SegmentOptions(scales=(2.0,), stride=32, mask_threshold=0.9)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--ttd", type=Path, default=None, help="a TTD checkpoint (ttd train --objective ttd)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--labelling", choices=("shapes", "colours"), default="shapes",
                        help="world classes: the objects' shapes (8) or colours (6)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/segmentation.json"))
    args = parser.parse_args()
    models = [("base", args.base)] + ([("ttd", args.ttd)] if args.ttd else [])
    rows = []
    for name, size, options in SETTINGS:
        dataset = world_segmentation_samples(args.seed, args.count, size, labelling=args.labelling)
        row = {"setting": name}
        for label, checkpoint in models:
            tagger = load_tagger("torch", checkpoint=str(checkpoint), device="cpu", flip_tta="flip" in name)
            start = time.time()
            result = evaluate_segmentation(tagger, dataset, options, progress=False)
            row[label] = {k: round(100 * result[k], 1) for k in ("miou", "mfpr", "mfnr")}
            row[label]["seconds"] = round(time.time() - start, 1)
            row[label]["classes"] = result["classes"]
        rows.append(row)
        print(f"| {name} | " + " | ".join(f"{row[label]['miou']} / {row[label]['mfpr']} / {row[label]['mfnr']}"
                                         for label, _ in models) + " |", flush=True)
        write(args, models, rows)  # after every row: a stopped run keeps what it measured


def write(args: argparse.Namespace, models: list, rows: list) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"count": args.count, "seed": args.seed, "labelling": args.labelling,
                                    "models": {label: str(path) for label, path in models}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
