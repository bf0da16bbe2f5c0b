"""Tag metrics over candidate decisions (P / R / F1 / accuracy, threshold-free AP and
R-precision) and mask metrics (IoU, FPR, FNR) — DESIGN §3.5.

FPR = FP / (FP + TN) and FNR = FN / (FN + TP) over the pixels of one mask, averaged over masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TagCounts:
    """Accumulates decisions and rankings of one scorer over many captions."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    average_precisions: list[float] = field(default_factory=list)
    r_precisions: list[float] = field(default_factory=list)

    def add(self, scores: np.ndarray, relevant: np.ndarray, threshold: float) -> None:
        scores, relevant = np.asarray(scores, np.float64), np.asarray(relevant, bool)
        predicted = scores >= threshold
        self.tp += int((predicted & relevant).sum())
        self.fp += int((predicted & ~relevant).sum())
        self.fn += int((~predicted & relevant).sum())
        self.tn += int((~predicted & ~relevant).sum())
        if relevant.any():
            self.average_precisions.append(average_precision(scores, relevant))
            self.r_precisions.append(r_precision(scores, relevant))

    def summary(self) -> dict[str, float]:
        precision = self.tp / max(self.tp + self.fp, 1)
        recall = self.tp / max(self.tp + self.fn, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        total = self.tp + self.fp + self.fn + self.tn
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "accuracy": (self.tp + self.tn) / max(total, 1),
            "map": float(np.mean(self.average_precisions)) if self.average_precisions else 0.0,
            "r_precision": float(np.mean(self.r_precisions)) if self.r_precisions else 0.0,
        }


def _rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Order by descending score; ties broken against the relevant ones (pessimistic): among equal
    scores the irrelevant candidates come first, so a tie never earns credit."""
    return np.lexsort((np.asarray(relevant, bool), -np.asarray(scores, np.float64)))


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    order = _rank(scores, relevant)
    hits = relevant[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / max(hits.sum(), 1))


def r_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    r = int(relevant.sum())
    return float(relevant[_rank(scores, relevant)[:r]].mean()) if r else 0.0


@dataclass
class MaskCounts:
    ious: list[float] = field(default_factory=list)
    fprs: list[float] = field(default_factory=list)
    fnrs: list[float] = field(default_factory=list)

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        predicted, truth = predicted.astype(bool), truth.astype(bool)
        tp = int((predicted & truth).sum())
        fp = int((predicted & ~truth).sum())
        fn = int((~predicted & truth).sum())
        tn = int((~predicted & ~truth).sum())
        self.ious.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
        self.fprs.append(fp / (fp + tn) if fp + tn else 0.0)
        self.fnrs.append(fn / (fn + tp) if fn + tp else 0.0)

    def summary(self) -> dict[str, float]:
        mean = lambda values: float(np.mean(values)) if values else 0.0  # noqa: E731
        return {"iou": mean(self.ious), "fpr": mean(self.fprs), "fnr": mean(self.fnrs)}
