"""Label-free margin calibration against the labelled fit, on world splits never used for fitting.

Splits: label-free and labelled fits on the calibration split (seed 7; the label-free fit reads
its images and captions only); the default --max-false-rate chosen on seed 5 (labelled, held out
for that choice alone); every F1 measured on the held-out split (seed 2). Scores are exact at any
margin: a tag is selected exactly when m ≤ its critical margin (ttd/evaluation/calibrate.py).

    python benchmarks/label_free.py --ttd-checkpoint runs/ttd/model.safetensors --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from ttd.data.annotations import world_eval_samples
from ttd.evaluation.calibrate import fit_negative_margin, sample_critical_margins
from ttd.evaluation.label_free import (empirical_null, fit_label_free, margins_of_pairs, null_margin)
from ttd.model.config import CALIBRATION_SEED, DEFAULT_MIN_PRECISION, LABEL_FREE_SELECTION_SEED
from ttd.runtime import Tagger, load_tagger

EVAL_SEED = 2
RATES = (1e-2, 1e-3, 1e-4, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 3e-8, 1e-8, 1e-9)


def prf(critical: np.ndarray, relevant: np.ndarray, margin: float) -> dict:
    selected = critical >= margin
    tp = int((selected & relevant).sum())
    precision = tp / max(1, int(selected.sum()))
    recall = tp / max(1, int(relevant.sum()))
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"margin": round(float(margin), 3), "precision": round(100 * precision, 2), "recall": round(100 * recall, 2),
            "f1": round(100 * f1, 2)}


def with_prompts(tagger: Tagger, prompts: tuple[str, ...]) -> Tagger:
    config = dataclasses.replace(tagger.config, negative_prompts=tuple(prompts))
    return Tagger(tagger.backend, config, tagger.threshold, tagger.flip_tta, tagger.score_method,
                  tagger.mask_weight, tagger.mask_bias)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor()


def rate_choice(taggers: dict[str, Tagger], count: int) -> dict:
    """P/R/F1 on the selection split (seed 5) at each candidate rate, per model: the default is
    the rate of best worst-model F1 among those with precision ≥ 97 % for every model."""
    samples = world_eval_samples(LABEL_FREE_SELECTION_SEED, count)
    rows = {}
    for name, tagger in taggers.items():
        critical, relevant = sample_critical_margins(tagger, samples, progress=False)
        (own, null), = margins_of_pairs(tagger, [s.image for s in samples], [s.caption for s in samples],
                                        [tuple(tagger.config.negative_prompts)], progress=False)[0]
        centre, scale = empirical_null(np.concatenate([own, null]))
        rows[name] = {f"{rate:g}": prf(critical, relevant, null_margin(centre, scale, rate)) for rate in RATES}
    ok = [r for r in RATES if all(rows[n][f"{r:g}"]["precision"] >= 100 * DEFAULT_MIN_PRECISION for n in rows)]
    worst_f1 = {f"{r:g}": min(rows[n][f"{r:g}"]["f1"] for n in rows) for r in ok}
    chosen = max(ok, key=lambda r: worst_f1[f"{r:g}"]) if ok else None
    return {"seed": LABEL_FREE_SELECTION_SEED, "pairs": count, "per_model": rows, "worst_f1_meeting_precision": worst_f1,
            "chosen_rate": chosen}


def model_rows(name: str, tagger: Tagger, fit_samples, eval_samples, subsets: int, subset_size: int, rate: float) -> dict:
    critical, relevant = sample_critical_margins(tagger, eval_samples, progress=False)
    labelled = fit_negative_margin(tagger, fit_samples, progress=False)
    images, captions = [s.image for s in fit_samples], [s.caption for s in fit_samples]
    label_free = fit_label_free(tagger, images, captions, rate, choose_prompts=False, progress=False)
    chosen = fit_label_free(tagger, images, captions, rate, choose_prompts=True, progress=False)
    chosen_tagger = with_prompts(tagger, chosen.negative_prompts)
    chosen_critical, chosen_relevant = sample_critical_margins(chosen_tagger, eval_samples, progress=False)
    rng = np.random.default_rng(0)
    stability = []
    for _ in range(subsets):
        pick = np.sort(rng.choice(len(fit_samples), subset_size, replace=False))
        fit = fit_label_free(tagger, [images[i] for i in pick], [captions[i] for i in pick], rate,
                             choose_prompts=False, progress=False)
        stability.append(prf(critical, relevant, fit.margin))
    return {
        "model": name,
        "config_margin": prf(critical, relevant, tagger.config.negative_margin),
        "labelled": prf(critical, relevant, labelled.margin),
        "label_free": {**prf(critical, relevant, label_free.margin), "null_centre": round(label_free.null_centre, 3),
                       "null_scale": round(label_free.null_scale, 3)},
        "label_free_chosen_prompts": {**prf(chosen_critical, chosen_relevant, chosen.margin),
                                      "negative_prompts": list(chosen.negative_prompts),
                                      "separations": [[list(p), s] for p, s in chosen.prompt_separations]},
        "subsets": stability,
        "subset_margin_spread": round(max(r["margin"] for r in stability) - min(r["margin"] for r in stability), 3),
        "subset_f1_spread": round(max(r["f1"] for r in stability) - min(r["f1"] for r in stability), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ttd-checkpoint", type=Path, required=True, help="a TTD model trained with `ttd train` defaults")
    parser.add_argument("--count", type=int, default=500, help="pairs of each split")
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--subset-size", type=int, default=300)
    parser.add_argument("--wrong-margin", type=float, default=9.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/label_free.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    taggers = {"base (embedded world model)": load_tagger("torch", device="cpu"),
               "TTD (ttd train defaults)": load_tagger("torch", checkpoint=str(args.ttd_checkpoint), device="cpu")}
    choice = rate_choice(taggers, args.count)
    from ttd.model.config import DEFAULT_MAX_FALSE_RATE

    fit_samples = world_eval_samples(CALIBRATION_SEED, args.count)
    eval_samples = world_eval_samples(EVAL_SEED, args.count)
    rows = [model_rows(name, tagger, fit_samples, eval_samples, args.subsets, args.subset_size, DEFAULT_MAX_FALSE_RATE)
            for name, tagger in taggers.items()]
    base = taggers["base (embedded world model)"]
    wrong = Tagger(base.backend, dataclasses.replace(base.config, negative_margin=args.wrong_margin), base.threshold,
                   base.flip_tta, base.score_method, base.mask_weight, base.mask_bias)
    critical, relevant = sample_critical_margins(wrong, eval_samples, progress=False)
    recovered = fit_label_free(wrong, [s.image for s in fit_samples], [s.caption for s in fit_samples],
                               DEFAULT_MAX_FALSE_RATE, choose_prompts=False, progress=False)
    result = {"cpu": cpu_name(), "threads": args.threads, "fit_seed": CALIBRATION_SEED, "eval_seed": EVAL_SEED,
              "count": args.count, "max_false_rate": DEFAULT_MAX_FALSE_RATE, "rate_choice": choice, "models": rows,
              "wrong_margin": {"given": prf(critical, relevant, args.wrong_margin),
                               "after_label_free": prf(critical, relevant, recovered.margin)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
