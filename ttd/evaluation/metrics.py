"""Tag metrics over candidate decisions (P / R / F1 / accuracy, threshold-free AP and
R-precision) and mask metrics (IoU, FPR, FNR) — docs/architecture.md §3.5.

FPR = FP / (FP + TN) and FNR = FN / (FN + TP) over the pixels of one mask, averaged over masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ttd.errors import InputError


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


@dataclass
class SegmentationCounts:
    """A confusion matrix of label maps over a dataset (docs/architecture.md §3.5): per-class IoU, FPR and FNR
    over all pixels of all images, and their means over the classes.

    A class's IoU = TP / (TP + FP + FN) counts when the class is in the ground truth or the
    prediction (absent from both: no IoU, no FPR); FPR = FP / (FP + TN); FNR = FN / (FN + TP)
    needs ground-truth pixels. Pixels labelled `ignore_index` in the ground truth are left out."""

    num_classes: int
    ignore_index: int = 255
    confusion: np.ndarray = field(init=False)  # [truth, predicted], int64

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        if predicted.shape != truth.shape:
            raise InputError(f"prediction {predicted.shape} and ground truth {truth.shape} differ in size")
        keep = truth != self.ignore_index
        truth, predicted = truth[keep].astype(np.int64), predicted[keep].astype(np.int64)
        if truth.size and (truth.max() >= self.num_classes or truth.min() < 0):
            raise InputError(f"ground-truth label {int(truth.max())} outside 0..{self.num_classes - 1} "
                             f"(and not the ignore label {self.ignore_index})")
        if predicted.size and (predicted.max() >= self.num_classes or predicted.min() < 0):
            raise InputError(f"predicted label {int(predicted.max())} outside 0..{self.num_classes - 1}")
        self.confusion += np.bincount(truth * self.num_classes + predicted,
                                      minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def per_class(self) -> dict[str, np.ndarray]:
        """{"iou", "fpr", "fnr", "pixels"}: arrays over classes (NaN where undefined)."""
        c = self.confusion.astype(np.float64)
        tp = np.diag(c)
        fp, fn = c.sum(axis=0) - tp, c.sum(axis=1) - tp
        tn = c.sum() - tp - fp - fn
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
            fnr = np.where(tp + fn > 0, fn / (tp + fn), np.nan)
            fpr = np.where((tp + fp + fn > 0) & (fp + tn > 0), fp / (fp + tn), np.nan)
        return {"iou": iou, "fpr": fpr, "fnr": fnr, "pixels": c.sum(axis=1)}

    def summary(self) -> dict[str, float]:
        """{"miou", "mfpr", "mfnr", "pixel_accuracy"}: means over the classes where defined."""
        per = self.per_class()
        mean = lambda values: float(np.nanmean(values)) if np.isfinite(values).any() else 0.0  # noqa: E731
        total = self.confusion.sum()
        return {"miou": mean(per["iou"]), "mfpr": mean(per["fpr"]), "mfnr": mean(per["fnr"]),
                "pixel_accuracy": float(np.trace(self.confusion) / total) if total else 0.0}
