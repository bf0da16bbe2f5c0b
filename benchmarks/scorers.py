"""Choosing the pixel-tag score: candidate scorers on the held-out world split.

Every candidate is a function of the same cosine maps cos(f_i, e_t) of a model, computed once for
the whole world vocabulary. A candidate with a free threshold (peak cosine, margins, z-scores,
the negatives score's margin) has it fitted on a calibration split (world seed 7, never trained
on) for the best F1 at precision ≥ 97 %, then it is applied unchanged to three disjoint held-out
slices of world seed 2 (mean ± std over the slices). Candidates with a fixed δ = 0.5 are scored
as they are. Recall is reported by kind of tag (ttd/evaluation/tag_kinds.py).

    python benchmarks/scorers.py --out benchmarks/results/scorers.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ttd.evaluation.calibrate import best_margin
from ttd.model.config import CALIBRATION_SEED, DEFAULT_MIN_PRECISION
from ttd.data.annotations import world_eval_samples
from ttd.data.world import COLOURS, SHAPES, vocabulary
from ttd.model.factory import DEFAULT_CHECKPOINT, load_checkpoint
from ttd.runtime.images import normalize
from ttd.evaluation.tag_kinds import KindCounts
from ttd.model.tags import candidate_tags

HELD_OUT_SEED = 2


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def candidates(tau: float, w: float, b: float, negatives: list[int]) -> dict[str, tuple[Callable, float | None]]:
    """name -> (scores of a caption's tags from (cosines [V, h, w], tag indices), fixed δ or None = fitted)."""
    kind_of = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}

    def negatives_logit(cos, idx):  # τ·cos_k − log Σ_n exp(τ·cos_n), at every pixel
        pooled = np.log(np.exp(tau * cos[negatives]).sum(0))
        return tau * cos[idx] - pooled[None]

    def softmax_within_kind(cos, idx, tags):
        out = np.zeros(len(idx))
        kinds = [kind_of.get(t, "other") for t in tags]
        for kind in set(kinds):
            members = [i for i, k in enumerate(kinds) if k == kind]
            out[members] = _softmax(tau * cos[[idx[i] for i in members]], 0).max((1, 2))
        return out

    def vocabulary_z(cos, idx):  # best-pixel cosine as a z-score among the whole vocabulary's on this image
        peaks = cos.max((1, 2))
        return (peaks[idx] - peaks.mean()) / peaks.std()

    return {
        "softmax (paper)": (lambda cos, idx, tags: _softmax(tau * cos[idx], 0).max((1, 2)), 0.5),
        "sigmoid mask peak, w and b of the model": (lambda cos, idx, tags: _sigmoid(w * cos[idx] + b).max((1, 2)), 0.5),
        "sigmoid mask peak, calibrated (= peak cosine)": (lambda cos, idx, tags: cos[idx].max((1, 2)), None),
        "softmax within kind (oracle kinds)": (softmax_within_kind, 0.5),
        "vs negatives, margin 0": (lambda cos, idx, tags: _sigmoid(negatives_logit(cos, idx)).max((1, 2)), 0.5),
        "vs negatives, calibrated margin": (lambda cos, idx, tags: negatives_logit(cos, idx).max((1, 2)), None),
        "peak minus image mean (image-relative)": (lambda cos, idx, tags: (cos[idx].max((1, 2)) - cos[idx].mean((1, 2))), None),
        "z-score among the vocabulary (image-relative)": (lambda cos, idx, tags: vocabulary_z(cos, idx), None),
    }


def cosine_maps(model, samples, vocab_embeds: torch.Tensor) -> np.ndarray:
    images = np.stack([s.image for s in samples])
    with torch.no_grad():
        patch = model.encode_image(torch.from_numpy(normalize(images, model.config.mean, model.config.std)))[1]
        return torch.einsum("bdhw,vd->bvhw", patch.float(), vocab_embeds).numpy()


def decisions(split, score, vocab_index) -> tuple[list[list[str]], list[np.ndarray], list[np.ndarray]]:
    samples, cos = split
    tags, scores, relevant = [], [], []
    for sample, maps in zip(samples, cos):
        candidates_ = candidate_tags(sample.caption)
        if candidates_:
            tags.append(candidates_)
            scores.append(np.asarray(score(maps, [vocab_index[t] for t in candidates_], candidates_), np.float64))
            relevant.append(np.array([t in sample.relevant_tags for t in candidates_]))
    return tags, scores, relevant


def fit_threshold(scores: np.ndarray, relevant: np.ndarray) -> float:
    """The threshold of best F1 among those with precision ≥ DEFAULT_MIN_PRECISION: the exact cut
    of `ttd calibrate` (a tag is selected when its score ≥ the threshold)."""
    return best_margin(scores, relevant, DEFAULT_MIN_PRECISION).margin


def measure(tags, scores, relevant, threshold: float) -> dict:
    flat_s, flat_r = np.concatenate(scores), np.concatenate(relevant)
    chosen = flat_s >= threshold
    tp = int((chosen & flat_r).sum())
    precision, recall = tp / max(int(chosen.sum()), 1), tp / max(int(flat_r.sum()), 1)
    kinds = KindCounts()
    for t, s, r in zip(tags, scores, relevant):
        kinds.add(t, s >= threshold, r)
    by_kind = {k: v.get("recall", v.get("selected")) for k, v in kinds.summary().items()}
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            **{f"{k} {'selected' if k == 'absent' else 'recall'}": v for k, v in by_kind.items() if v is not None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--count", type=int, default=500, help="samples per split")
    parser.add_argument("--slices", type=int, default=3, help="disjoint held-out slices of world seed 2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scorers.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_checkpoint(args.checkpoint).eval()
    vocab = vocabulary()
    vocab_index = {t: i for i, t in enumerate(vocab)}
    with torch.no_grad():
        vocab_embeds = model.encode_tags(vocab).float()
    negatives = [vocab_index[t] for t in model.config.negative_prompts]
    splits = {"calibration": world_eval_samples(CALIBRATION_SEED, args.count)}
    for s in range(args.slices):
        splits[f"held-out {s}"] = world_eval_samples(HELD_OUT_SEED, args.count, start=s * args.count)
    cosines = {name: (samples, cosine_maps(model, samples, vocab_embeds)) for name, samples in splits.items()}
    report = {"checkpoint": str(args.checkpoint), "negative_prompts": list(model.config.negative_prompts),
              "min_precision": DEFAULT_MIN_PRECISION, "count": args.count, "scorers": {}}
    for name, (score, fixed) in candidates(model.config.tau, float(model.mask_weight), float(model.mask_bias),
                                           negatives).items():
        threshold = fixed
        if threshold is None:
            tags, scores, relevant = decisions(cosines["calibration"], score, vocab_index)
            threshold = fit_threshold(np.concatenate(scores), np.concatenate(relevant))
        per_slice = [measure(*decisions(cosines[s], score, vocab_index), threshold) for s in splits if s != "calibration"]
        keys = per_slice[0].keys()
        summary = {k: {"mean": float(np.mean([p[k] for p in per_slice])), "std": float(np.std([p[k] for p in per_slice]))}
                   for k in keys}
        report["scorers"][name] = {"threshold": threshold, "fitted": fixed is None, "held_out": summary,
                                   "per_slice": per_slice}
        print(f"{name:<48} δ={threshold:8.4f} " + "  ".join(
            f"{k}={100 * v['mean']:.1f}±{100 * v['std']:.1f}" for k, v in summary.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))


def markdown(report: dict) -> str:
    cols = ("precision", "recall", "f1", "colour recall", "shape recall", "background recall", "absent selected")
    lines = ["| scorer | δ | " + " | ".join(c.replace("recall", "R").replace("absent selected", "absent sel.")
                                           for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, r in report["scorers"].items():
        cells = [f"{100 * r['held_out'][c]['mean']:.1f} ± {100 * r['held_out'][c]['std']:.1f}" for c in cols]
        lines.append(f"| {name} | {r['threshold']:.3g}{' (fitted)' if r['fitted'] else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
