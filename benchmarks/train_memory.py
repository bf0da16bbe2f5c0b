"""Peak memory of `ttd train --objective ttd` on an open_clip ViT-B-16 (random init, fp32, CPU)
per batch size, with and without the memory changes of docs/training.md ("Memory"):

- `before`: open_clip's encode_text over the whole 77-token context, no gradient checkpointing;
- `trim`: texts encoded only up to the batch's longest pooled token (TTDModel.trim_text_context);
- `trim+checkpointing`: and TrainConfig.grad_checkpointing (open_clip's, in both towers).

Each measurement is a fresh process (peak RSS = VmHWM of /proc/self/status after `--steps`
training steps, before the end-of-run writes) on seven of scikit-image's photos with captions;
the step losses are printed too: every variant must give the same ones (to 1e-5).

    python benchmarks/train_memory.py --batch-sizes 2 4 8 --out benchmarks/results/train_memory_vit_b_16.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"before": (False, False), "trim": (True, False), "trim+checkpointing": (True, True)}
PHOTOS = {  # scikit-image's bundled photos, with captions naming several things in each
    "astronaut.png": "an astronaut in a white suit with a flag and a rocket model on a table",
    "chelsea.png": "a ginger cat with green eyes lying on a wooden floor next to a wall",
    "coffee.png": "a cup of coffee on a saucer with a spoon on a red table",
    "rocket.jpg": "a white rocket on a launch pad under a blue sky with clouds",
    "motorcycle_left.png": "a red motorcycle parked in a garage beside a bicycle and a box",
    "hubble_deep_field.jpg": "many bright galaxies and stars in a dark sky",
    "retina.jpg": "an orange retina with red blood vessels and a bright disc",
}


def write_pairs(folder: Path) -> Path:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": str(data / name), "caption": caption}) + "\n"
                            for name, caption in PHOTOS.items()))
    return path


def child(batch: int, variant: str, steps: int, threads: int) -> dict:
    """One measurement in this process: `steps` training steps, then the peak RSS."""
    import torch

    from ttd.model.factory import create_model
    from ttd.train.loop import TrainConfig, train

    torch.set_num_threads(threads)
    trim, checkpointing = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_pairs(Path(tmp))
        model = create_model("ViT-B-16", None)
        model.trim_text_context = trim
        config = TrainConfig.for_objective("ttd", data=str(pairs), out_dir=str(Path(tmp) / "run"), steps=steps,
                                           batch_size=batch, grad_checkpointing=checkpointing, seed=0, data_seed=0)
        start = time.process_time()
        train(model, config, progress=False, stop_after=steps)  # stops before the end-of-run writes
        cpu = time.process_time() - start
        logged = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    return {"batch": batch, "variant": variant, "peak_gb": round(peak_kb / 2**20, 3), "cpu_s_per_step": round(cpu / steps, 1),
            "losses": [{k: row[k] for k in ("loss", "distill", "tag", "clip")} for row in logged]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_memory_vit_b_16.json"))
    parser.add_argument("--child", nargs=2, metavar=("BATCH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.steps, args.threads)))
        return
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    for variant in args.variants:
        for batch in args.batch_sizes:
            if any(r["batch"] == batch and r["variant"] == variant for r in rows):
                continue
            done = subprocess.run([sys.executable, __file__, "--child", str(batch), variant, "--steps", str(args.steps),
                                   "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": "ViT-B-16 (random init), fp32, CPU", "steps": args.steps,
                                            "threads": args.threads, "rows": rows}, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Peak RSS per batch size and variant, and the growth per sample (least-squares slope)."""
    import numpy as np

    batches = sorted({r["batch"] for r in rows})
    lines = ["| variant | " + " | ".join(f"batch {b} (GB)" for b in batches) + " | GB per sample | CPU s per step |",
             "|---" * (len(batches) + 3) + "|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        got = {r["batch"]: r for r in rows if r["variant"] == variant}
        xs = [b for b in batches if b in got]
        slope = float(np.polyfit(xs, [got[b]["peak_gb"] for b in xs], 1)[0]) if len(xs) > 1 else float("nan")
        lines.append(f"| {variant} | " + " | ".join(str(got[b]["peak_gb"]) if b in got else "" for b in batches)
                     + f" | {slope:.3f} | " + " / ".join(str(got[b]["cpu_s_per_step"]) for b in xs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
