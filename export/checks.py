"""Parity and quality gates: an export is compared with the PyTorch fp32 model graph by graph
(max abs error, cosine) at several batch sizes, and end to end by selected-tag agreement on a
fixed set of world image-caption pairs. A gate that fails stops the export with the figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttd.errors import TTDError
from ttd.model.contract import EMBEDDING_NAMES
from ttd.data.world import make_sample
from ttd.runtime.images import Preprocess, normalize
from ttd.runtime.tagger import Tagger
from ttd.model.tags import candidate_tags

CHECK_SEED = 2  # the held-out world split


class GateError(TTDError, RuntimeError):
    """An export missed a parity or quality threshold; the message gives the figures."""


@dataclass(frozen=True)
class Thresholds:
    max_abs: float | None  # None: not gated (quantised variants differ by design)
    min_cosine: float
    min_agreement: float


FP32_GATE = Thresholds(max_abs=1e-3, min_cosine=0.9999, min_agreement=0.99)
VARIANT_GATE = Thresholds(max_abs=None, min_cosine=0.99, min_agreement=0.95)


def check_pairs(preprocess: Preprocess, count: int = 64) -> tuple[np.ndarray, list[str]]:
    """World images (through the model's preprocessing) and captions used by every gate."""
    samples = [make_sample(CHECK_SEED, i) for i in range(count)]
    images = np.stack([preprocess(s.image) for s in samples])
    return images, [s.caption for s in samples]


def _cosine(a: np.ndarray, b: np.ndarray, axis: int) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(axis=axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return float((num / np.maximum(den, 1e-12)).min())


def compare(reference: Tagger, candidate: Tagger, images: np.ndarray, captions: list[str],
            batch_sizes: tuple[int, ...] = (1, 3, 7)) -> dict:
    """Figures of `candidate` against `reference` (both Taggers over the same model config)."""
    config = reference.config
    pixels = normalize(images, config.mean, config.std)
    tokens = reference.tokenizer(captions)
    max_abs: dict[str, float] = {}
    min_cos: dict[str, float] = {}

    def record(name: str, ref: np.ndarray, out: np.ndarray, axis: int) -> None:
        if ref.shape != out.shape:
            raise GateError(f"{name}: shape {out.shape} differs from PyTorch's {ref.shape}")
        max_abs[name] = max(max_abs.get(name, 0.0), float(np.abs(ref - out).max()))
        min_cos[name] = min(min_cos.get(name, 1.0), _cosine(ref, out, axis))

    tags = reference.encode_tags(candidate_tags(" ".join(captions[:4]))[:6])
    for b in batch_sizes:
        ref_image, ref_patch = reference.backend.encode_images(pixels[:b])
        out_image, out_patch = candidate.backend.encode_images(pixels[:b])
        record("image_embeds", ref_image, out_image, -1)
        record("patch_embeds", ref_patch, out_patch, 1)
        record("text_embeds", reference.backend.encode_texts(tokens[:b]), candidate.backend.encode_texts(tokens[:b]), -1)
        request = reference.request(vocabulary_embeds=tags, with_cosines=True)
        ref_head = reference.backend.score_tags(ref_patch[:, None], request)
        out_head = candidate.backend.score_tags(ref_patch[:, None], request)
        record("tag_scores", ref_head.tag_scores, out_head.tag_scores, -1)
        record("tag_cosines", ref_head.tag_cosines, out_head.tag_cosines, 1)
    tag_lists = [candidate_tags(c) for c in captions]
    same = total = 0
    for start in range(0, len(images), 16):
        ref = reference.tag(images[start : start + 16], tag_lists[start : start + 16])
        out = candidate.tag(images[start : start + 16], tag_lists[start : start + 16])
        for r, o in zip(ref, out):
            chosen_r, chosen_o = set(r.selected), set(o.selected)
            same += sum((t in chosen_r) == (t in chosen_o) for t in r.tags)
            total += len(r.tags)
    return {"batch_sizes": list(batch_sizes), "max_abs": max_abs, "min_cosine": min_cos,
            "tag_agreement": same / max(total, 1), "tag_decisions": total}


def enforce(figures: dict, gate: Thresholds, what: str) -> None:
    """Raise GateError naming every figure that missed its threshold and by how much."""
    misses = []
    if gate.max_abs is not None:
        for name, value in figures["max_abs"].items():
            if name.endswith("embeds") and value > gate.max_abs:
                misses.append(f"{name} max abs error {value:.2e} > {gate.max_abs:.0e} (by {value - gate.max_abs:.2e})")
    for name in EMBEDDING_NAMES:
        value = figures["min_cosine"][name]
        if value < gate.min_cosine:
            misses.append(f"{name} cosine {value:.5f} < {gate.min_cosine} (by {gate.min_cosine - value:.5f})")
    agreement = figures["tag_agreement"]
    if agreement < gate.min_agreement:
        misses.append(f"selected-tag agreement {agreement:.1%} < {gate.min_agreement:.0%} "
                      f"(by {gate.min_agreement - agreement:.1%} of {figures['tag_decisions']} decisions)")
    if misses:
        raise GateError(f"{what} refused: " + "; ".join(misses))
