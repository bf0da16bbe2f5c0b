"""TTD over N training seeds × M data seeds: every run, the worst, and mean ± std.

A method default is judged on its worst run: one run in six of the former default collapsed
(caption IoU 34.6 against the base's 54.5) while three lucky seeds reported 60.9 ± 0.8.

Each run is `ttd train --objective ttd` with its defaults (plus --set overrides) on world data
seed D, evaluated like `ttd eval` on the held-out world pairs (seed 2) and like
benchmarks/segmentation.py (colour and shape classes, seed 2, 64 px, θ 0.5 and 0.9); the training
time is reported as wall time and as the process's CPU clock (fair on a shared machine). The default seeds were never used
before: training seeds 0-3 and data seeds 1, 2, 7, 11-13 and 4711 were.

    python benchmarks/seeds.py --threads 1 --out benchmarks/results/seeds.json
    python benchmarks/seeds.py --train-seeds 3 --data-seeds 4711 --set target_norm=mask   # the collapse (docs/training.md)

The report is written after every run and a rerun with the same --out skips the runs it holds;
a run killed mid-way resumes from its last.pt (exact: the same weights as an uninterrupted run),
so a stopped protocol continues where it stopped. A resumed run's time is not a run's time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ttd.data.annotations import world_eval_samples
from ttd.data.voc import world_segmentation_samples
from ttd.evaluation.evaluate import evaluate
from ttd.evaluation.segmentation import evaluate_segmentation
from ttd.model.factory import DEFAULT_CHECKPOINT, load_checkpoint
from ttd.runtime import load_tagger
from ttd.segment.segmentation import SegmentOptions
from ttd.train.loop import TrainConfig, train

TRAIN_SEEDS = (21, 22, 23, 24)
DATA_SEEDS = (31, 32)
HELD_OUT_SEED = 2
SEGMENTATION = (("colour mIoU θ 0.5", "colours", SegmentOptions(mask_threshold=0.5)),
                ("colour mIoU θ 0.9", "colours", SegmentOptions(mask_threshold=0.9)),
                ("shape mIoU θ 0.5", "shapes", SegmentOptions(mask_threshold=0.5)),
                ("shape mIoU θ 0.9", "shapes", SegmentOptions(mask_threshold=0.9)))
COLUMNS = ("caption IoU", "FPR", "FNR", "negatives F1", "colour mIoU θ 0.5", "colour mIoU θ 0.9", "shape mIoU θ 0.5",
           "shape mIoU θ 0.9", "train s", "train cpu s")


def parse_setting(text: str) -> tuple[str, object]:
    """`name=value` -> (name, value as JSON when it parses, else the text): --set lambda_tag=1."""
    name, _, value = text.partition("=")
    if name not in TrainConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{name!r} is not a TrainConfig field")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def measure(checkpoint: Path, samples: list, seg_samples: dict[str, list]) -> dict:
    """Held-out tag and caption-mask metrics (`ttd eval`'s) and colour / shape segmentation mIoU, in %."""
    model = load_checkpoint(checkpoint)
    result = evaluate(model, samples, progress=False)
    row = {"caption IoU": 100 * result["caption_mask"]["iou"], "FPR": 100 * result["caption_mask"]["fpr"],
           "FNR": 100 * result["caption_mask"]["fnr"],
           "negatives F1": 100 * result["tags"]["pixel-tag-negatives"]["f1"]}
    tagger = load_tagger("torch", checkpoint=str(checkpoint), device="cpu")
    for name, labelling, options in SEGMENTATION:
        row[name] = 100 * evaluate_segmentation(tagger, seg_samples[labelling], options, progress=False)["miou"]
    return {k: round(v, 1) for k, v in row.items()}


def run_one(base: Path, out: Path, seed: int, data_seed: int, overrides: dict) -> dict:
    """Train one TTD model (the defaults of `ttd train --objective ttd` under `overrides`)."""
    config = TrainConfig.for_objective("ttd", out_dir=str(out), seed=seed, data_seed=data_seed, **overrides)
    resumed = (out / "last.pt").is_file() and not (out / "model.safetensors").is_file()
    start, cpu = time.time(), time.process_time()
    train(load_checkpoint(base), config, resume=resumed, progress=False)  # resume is exact: same weights
    seconds, cpu = time.time() - start, time.process_time() - cpu  # CPU clock: fair on a shared machine
    logged = json.loads((out / "train_config.json").read_text())
    return {"train s": round(seconds, 1), "train cpu s": round(cpu, 1), "guard": logged.get("collapse_guard"), **({"resumed": True} if resumed else {})}


def summary(runs: dict[str, dict], base: dict) -> dict:
    """Worst (lowest caption IoU run), mean and std of every column, and the collapse checks."""
    values = {c: [r[c] for r in runs.values() if c in r] for c in COLUMNS}
    worst_name = min(runs, key=lambda k: runs[k]["caption IoU"])
    checks = {
        "caption IoU >= base + 3 on every run": all(r["caption IoU"] >= base["caption IoU"] + 3 for r in runs.values()),
        "negatives F1 >= base on every run": all(r["negatives F1"] >= base["negatives F1"] for r in runs.values()),
        "colour mIoU θ 0.5 >= base on every run": all(r["colour mIoU θ 0.5"] >= base["colour mIoU θ 0.5"]
                                                      for r in runs.values()),
        # the paper's gain on every run, and the segmentation half of its claim (docs/training.md)
        "caption IoU >= base + 5 on every run": all(r["caption IoU"] >= base["caption IoU"] + 5 for r in runs.values()),
        "colour mIoU θ 0.5 >= 45 on every run": all(r["colour mIoU θ 0.5"] >= 45 for r in runs.values()),
        "no run flagged by the guard": not any((r.get("guard") or {}).get("flagged") for r in runs.values()),
    }
    return {"worst": worst_name, "mean": {c: round(float(np.mean(v)), 1) for c, v in values.items() if v},
            "std": {c: round(float(np.std(v)), 1) for c, v in values.items() if v},
            "min": {c: round(float(np.min(v)), 1) for c, v in values.items() if v}, "checks": checks}


def markdown(report: dict) -> str:
    base, runs = report["base"], report["runs"]
    lines = ["| run | " + " | ".join(COLUMNS) + " | guard |", "|---" * (len(COLUMNS) + 2) + "|",
             "| base | " + " | ".join(str(base.get(c, "")) for c in COLUMNS) + " | |"]
    for name, r in runs.items():
        guard = (r.get("guard") or {}).get("flagged")
        lines.append(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + f" | {'FLAGGED' if guard else 'ok'} |")
    if runs:
        s = summary(runs, base)
        worst = runs[s["worst"]]
        lines.append(f"| **worst** ({s['worst']}) | " + " | ".join(f"**{worst[c]}**" if c in worst else "" for c in COLUMNS)
                     + " | |")
        lines.append("| lowest of each column | " + " | ".join(str(s["min"].get(c, "")) for c in COLUMNS) + " | |")
        lines.append("| mean ± std | " + " | ".join(f"{s['mean'][c]} ± {s['std'][c]}" if c in s["mean"] else ""
                                                 for c in COLUMNS) + " | |")
        lines += [""] + [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in s["checks"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=list(TRAIN_SEEDS))
    parser.add_argument("--data-seeds", type=int, nargs="+", default=list(DATA_SEEDS))
    parser.add_argument("--count", type=int, default=500, help="held-out world pairs (seed 2)")
    parser.add_argument("--seg-count", type=int, default=100, help="world segmentation images (seed 2, colours and shapes)")
    parser.add_argument("--set", dest="overrides", type=parse_setting, action="append", default=[],
                        help="a TrainConfig setting for every run, e.g. --set target_norm=mask")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seeds.json"))
    parser.add_argument("--table", action="store_true", help="print the table of --out (no training)")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    overrides = dict(args.overrides)
    samples = world_eval_samples(HELD_OUT_SEED, args.count)
    seg_samples = {labelling: world_segmentation_samples(HELD_OUT_SEED, args.seg_count, 64, labelling=labelling)
                   for labelling in ("colours", "shapes")}
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if report and report.get("overrides") != overrides:
        raise SystemExit(f"{args.out} holds runs with other settings ({report.get('overrides')}); pass another --out")
    if "base" not in report:
        report = {"base": measure(args.base, samples, seg_samples), "runs": {}, "overrides": overrides,
                  "cpu": _cpu_name(), "threads": args.threads}
        print("base", report["base"], flush=True)
    for data_seed in args.data_seeds:
        for seed in args.train_seeds:
            name = f"data {data_seed} / seed {seed}"
            if name in report["runs"]:
                continue
            out = args.runs / f"d{data_seed}_s{seed}"
            run = run_one(args.base, out, seed, data_seed, overrides)
            report["runs"][name] = {**measure(out / "model.safetensors", samples, seg_samples), **run}
            print(name, report["runs"][name], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    if report["runs"]:
        report["summary"] = summary(report["runs"], report["base"])
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
