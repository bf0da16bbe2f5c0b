"""Fitting the `negatives` score's margin to a model (`ttd calibrate`, and the end of `ttd train`).

The margin m of N_k = sigmoid(ℓ_k − m) (ttd/model/scoring.py) is a property of the model: TTD
fine-tuning raises the tags' cosines against the negative prompts, so a fine-tuned model keeps
selecting absent tags at its base model's margin (world: fitted 2.2 for the base, 9.8–20.7 after
300 TTD steps). Calibration fits m on labelled pairs for the best F1 at a minimum precision.

Selection is monotonic in m, so each candidate tag has a critical margin m*_k: it is selected
(s_k ≥ δ) exactly when m ≤ m*_k. Without flip TTA m*_k = max_i ℓ_k(i) − logit(δ); with flip TTA
(N maps averaged over the views) it is found by bisection. The best margin is then read off the
sorted critical margins, exactly, without a grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ttd.errors import InputError, TTDError
from ttd.model.config import DEFAULT_MIN_PRECISION, ModelConfig
from ttd.data.annotations import EvalSample
from ttd.runtime.tagger import Tagger, sigmoid
from ttd.model.tags import candidate_tags

BISECTION_STEPS = 60


@dataclass
class MarginFit:
    margin: float
    precision: float
    recall: float
    f1: float
    candidates: int
    relevant: int
    min_precision: float
    met_min_precision: bool

    def line(self) -> str:
        verdict = "" if self.met_min_precision else f" (no margin reaches precision {100 * self.min_precision:.0f} %: best F1 kept)"
        return (f"negative_margin {self.margin:.3f}: precision {100 * self.precision:.1f}  recall {100 * self.recall:.1f}  "
                f"F1 {100 * self.f1:.1f} on {self.candidates} candidate tags ({self.relevant} relevant){verdict}")

    def as_dict(self) -> dict:
        return asdict(self)


def critical_margins(logits: np.ndarray, threshold: float) -> np.ndarray:
    """m*_k [B, K] from the views' margin-free logits [V, B, K, h, w]: tag k is selected at δ =
    `threshold` exactly when negative_margin ≤ m*_k."""
    if not 0 < threshold < 1:
        raise InputError(f"threshold δ must be in (0, 1) for the negatives score, got {threshold}")
    offset = math.log(threshold / (1 - threshold))
    if logits.shape[0] == 1:
        return logits[0].max(axis=(-2, -1)) - offset
    # max_i mean_v sigmoid(ℓ_v(i) − m) is decreasing in m: bisect where it crosses δ
    low = logits.min(axis=(0, -2, -1)) - offset - 1.0
    high = logits.max(axis=(0, -2, -1)) - offset + 1.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        selected = sigmoid(logits - middle[None, :, :, None, None]).mean(axis=0).max(axis=(-2, -1)) >= threshold
        low, high = np.where(selected, middle, low), np.where(selected, high, middle)
    return low


def best_margin(critical: np.ndarray, relevant: np.ndarray, min_precision: float = DEFAULT_MIN_PRECISION) -> MarginFit:
    """The margin of best F1 among those with precision ≥ `min_precision` (best F1 overall if
    none reaches it), placed halfway between the last selected and the first rejected tag."""
    critical, relevant = np.asarray(critical, np.float64).ravel(), np.asarray(relevant, bool).ravel()
    if critical.size == 0:
        raise InputError("calibration needs at least one candidate tag")
    if not relevant.any():
        raise InputError("calibration needs at least one relevant (present) tag among the candidates")
    order = np.argsort(-critical, kind="stable")
    ranked, hits = critical[order], relevant[order]
    # a cut can only fall between distinct critical margins: the last index of each run of ties
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])
    true_positives = np.cumsum(hits)[ends]
    selected = ends + 1
    precision = true_positives / selected
    recall = true_positives / hits.sum()
    f1 = np.where(true_positives > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    allowed = precision >= min_precision
    pick = int(np.argmax(np.where(allowed, f1, -1.0))) if allowed.any() else int(np.argmax(f1))
    end = ends[pick]
    margin = ranked[end] if end + 1 == len(ranked) else (ranked[end] + ranked[end + 1]) / 2
    return MarginFit(float(margin), float(precision[pick]), float(recall[pick]), float(f1[pick]), int(critical.size),
                     int(relevant.sum()), min_precision, bool(allowed.any()))


def fit_negative_margin(tagger: Tagger, samples: list[EvalSample], min_precision: float = DEFAULT_MIN_PRECISION,
                        batch_size: int = 64, progress: bool = True) -> MarginFit:
    """Fit the tagger's `negatives` margin on labelled samples (caption candidates vs their
    relevant tags), through the tagger's own backend, flip TTA and threshold δ."""
    return best_margin(*sample_critical_margins(tagger, samples, batch_size, progress), min_precision)


def sample_critical_margins(tagger: Tagger, samples: list[EvalSample], batch_size: int = 64,
                            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(critical margin, relevant) of every candidate tag of the samples' captions, in order."""
    critical, relevant = [], []
    for start in tqdm(range(0, len(samples), batch_size), disable=not progress, desc="calibrate"):
        batch = [s for s in samples[start : start + batch_size] if candidate_tags(s.caption)]
        if not batch:
            continue
        tag_lists = [candidate_tags(s.caption) for s in batch]
        _, views = tagger.encode_images(np.stack([s.image for s in batch]))
        for sample, tags, margins in zip(batch, tag_lists, view_critical_margins(tagger, views, tag_lists)):
            critical.append(margins)
            relevant.append(np.array([t in sample.relevant_tags for t in tags]))
    if not critical:
        raise InputError("no sample has a caption with candidate tags: nothing to calibrate on")
    return np.concatenate(critical), np.concatenate(relevant)


def view_critical_margins(tagger: Tagger, views: np.ndarray, tag_lists: list[list[str]],
                          negative_embeds: np.ndarray | None = None) -> list[np.ndarray]:
    """m*_k of each image's tags, for patch views [B, V, D, h, w] already encoded, against the
    model's negative prompts or `negative_embeds` [N, D] (calibration choosing prompts)."""
    tag_embeds = tagger.request(tag_lists).tag_embeds  # zero-padded: a padded tag's margin is never read
    critical = critical_margins(tagger.negative_logits(views, tag_embeds, negative_embeds), tagger.threshold)
    return [critical[row, : len(tags)] for row, tags in enumerate(tag_lists)]


def labelled_record(fit: MarginFit, data: str, threshold: float, flip_tta: bool) -> dict:
    """The config's `margin_fit` of a labelled fit: how the margin was fitted, for whoever loads it."""
    return {"method": "labelled", "data": data, "threshold": threshold, "flip_tta": flip_tta,
            "min_precision": fit.min_precision, "candidates": fit.candidates,
            "fit": {"precision": round(fit.precision, 4), "recall": round(fit.recall, 4), "f1": round(fit.f1, 4)}}


def fitted_config(config: ModelConfig, margin: float, record: dict,
                  negative_prompts: tuple[str, ...] | None = None) -> ModelConfig:
    """`config` with a fitted margin (and negative prompts, when calibration chose them) and how."""
    return replace(config, negative_margin=round(float(margin), 4), margin_fit=record,
                   negative_prompts=tuple(negative_prompts or config.negative_prompts))


class CalibrationRefused(TTDError, ValueError):
    """A calibration whose writes would damage what it reads (an export, its own inputs)."""


def check_calibration_outputs(checkpoint: Path | None, out_dir: Path | None, json_path: Path | None,
                              inputs: list, dry_run: bool = False) -> None:
    """Before any work (a fit takes minutes): refuse to write into an exported checkpoint (its
    manifest's hash of model.json would no longer match, and every later load would refuse the
    export) and refuse an output (--json, --out's files) that is one of the command's inputs."""
    from ttd.data.inputs import refuse_output_over_input

    read = [p for p in inputs if p is not None]
    if checkpoint is not None:  # a checkpoint is torch's: the base install calibrates exports (docs/edge.md)
        from ttd.model.factory import config_path

        read += [Path(checkpoint), config_path(Path(checkpoint))]
        if out_dir is None and not dry_run:
            manifest = Path(checkpoint).parent / "manifest.json"
            try:
                listed = json.loads(manifest.read_text(encoding="utf-8")).get("files", {})
            except (OSError, ValueError, AttributeError):
                listed = {}
            if isinstance(listed, dict) and config_path(Path(checkpoint)).name in listed:
                raise CalibrationRefused(
                    f"{checkpoint} belongs to the export {Path(checkpoint).parent} (its {manifest.name} holds the hash "
                    f"of {config_path(Path(checkpoint)).name}): calibrating it in place would make every later load "
                    "refuse the export. Calibrate the checkpoint it was exported from, then export again; or write a "
                    "calibrated copy with --out DIR")
    if json_path is not None:
        refuse_output_over_input(json_path, read, "--json")
    if out_dir is not None:
        for name in ("model.safetensors", "model.json"):
            refuse_output_over_input(Path(out_dir) / name, read + ([json_path] if json_path else []), "--out")


def calibrate_checkpoint(checkpoint: Path, fit: MarginFit | float, record: dict | None = None,
                         negative_prompts: tuple[str, ...] | None = None) -> float:
    """Write the fitted margin (and how it was fitted) into the checkpoint's config (atomically);
    returns the old margin. An export made before this keeps its own config: export again."""
    from ttd.model.factory import config_path, save_config

    path = config_path(Path(checkpoint))
    if not path.is_file():
        raise InputError(f"{path} does not exist: calibration writes into a checkpoint's config (.json beside it)")
    config = ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    margin = fit.margin if isinstance(fit, MarginFit) else fit
    save_config(Path(checkpoint), fitted_config(config, margin, record or {"method": "labelled"}, negative_prompts))
    return config.negative_margin
