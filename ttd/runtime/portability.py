"""An export's quality gate ran on one CPU class; this re-checks it briefly where it is loaded.

`ttd export` stores a few reference inputs with PyTorch fp32's outputs for them
(`reference_samples.npz`, hashed in the manifest like every file) and the CPU it gated on. A
reduced-precision export loaded on a CPU of another ISA class (DESIGN §5: int8 kernels differ
between AVX2, VNNI and AMX) is run on those inputs and must still reach the gate's cosine, or it
is refused; an export without samples says plainly that it was not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttd.hardware import Capabilities, cpu_capabilities

REFERENCE_SAMPLES = "reference_samples.npz"
MIN_COSINE = 0.99  # the variant gate of export/checks.py
SAMPLE_COUNT = 4


class PortabilityError(RuntimeError):
    """A reduced-precision export lost quality on this CPU; the message gives the figures."""


@dataclass(frozen=True)
class PortabilityCheck:
    checked: bool
    message: str  # one line for the user
    min_cosine: dict[str, float] | None = None


def write_reference_samples(out_dir: Path, backend, pixel_values: np.ndarray, input_ids: np.ndarray) -> Path:
    """Store a few preprocessed inputs and `backend`'s (PyTorch fp32) outputs for them."""
    image_embeds, patch_embeds = backend.encode_images(pixel_values[:SAMPLE_COUNT])
    text_embeds = backend.encode_texts(input_ids[:SAMPLE_COUNT])
    path = out_dir / REFERENCE_SAMPLES
    with path.open("wb") as f:  # np.savez on a file object: no second name, hashes stay stable
        np.savez_compressed(f, pixel_values=pixel_values[:SAMPLE_COUNT].astype(np.float32),
                            input_ids=input_ids[:SAMPLE_COUNT].astype(np.int64), image_embeds=image_embeds,
                            patch_embeds=patch_embeds, text_embeds=text_embeds)
    return path


def _min_cosine(a: np.ndarray, b: np.ndarray, axis: int) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis), 1e-12)
    return float(((a * b).sum(axis=axis) / den).min())


def check_here(root: Path, manifest: dict, backend, here: Capabilities | None = None) -> PortabilityCheck:
    """Re-check a reduced-precision export on this CPU when its gate ran on another CPU class.

    Raises PortabilityError when the stored samples miss the gate's cosine here."""
    precision = manifest.get("precision", "fp32")
    if precision == "fp32":
        return PortabilityCheck(False, "fp32 export: no CPU-dependent quantisation to re-check")
    here = here or cpu_capabilities(with_gpu=False)
    gated = manifest.get("gate_cpu")
    if gated and Capabilities.from_dict(gated).isa_class == here.isa_class:
        return PortabilityCheck(False, f"{precision} export gated on this CPU class ({here.isa_class}); not re-checked")
    origin = f"gated on {gated['isa_class']} ({gated['model']})" if gated else "gated on an unrecorded CPU"
    path = root / REFERENCE_SAMPLES
    if not path.is_file():
        return PortabilityCheck(False, f"{precision} export {origin}; NOT checked on this {here.isa_class} CPU "
                                       f"(the export has no {REFERENCE_SAMPLES}: re-export with this ttd to add them)")
    samples = np.load(path)
    image_embeds, patch_embeds = backend.encode_images(samples["pixel_values"])
    text_embeds = backend.encode_texts(samples["input_ids"])
    cosines = {"image_embeds": _min_cosine(samples["image_embeds"], image_embeds, -1),
               "patch_embeds": _min_cosine(samples["patch_embeds"], patch_embeds, 1),
               "text_embeds": _min_cosine(samples["text_embeds"], text_embeds, -1)}
    misses = [f"{name} cosine {value:.4f} < {MIN_COSINE}" for name, value in cosines.items() if value < MIN_COSINE]
    if misses:
        raise PortabilityError(f"{root}: {precision} export {origin} loses quality on this {here.isa_class} CPU "
                               f"({'; '.join(misses)} against PyTorch fp32 on {len(samples['input_ids'])} stored "
                               "samples); re-export it on this machine or use the fp32 export")
    worst = min(cosines.values())
    return PortabilityCheck(True, f"{precision} export {origin}; re-checked on this {here.isa_class} CPU: "
                                  f"min cosine {worst:.4f} ≥ {MIN_COSINE} on {len(samples['input_ids'])} samples", cosines)
