"""An export's quality gate ran on one CPU class; this re-checks it briefly where it is loaded.

`ttd export` stores a few reference inputs with PyTorch fp32's outputs for them
(`reference_samples.npz`, hashed in the manifest like every file) and the CPU it gated on. A
reduced-precision export loaded on a CPU of another ISA class (docs/architecture.md §5: int8 kernels differ
between AVX2, VNNI and AMX) is run on those inputs and must still reach the gate's cosine, or it
is refused; an export without samples says plainly that it was not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttd.errors import TTDError, TTDWarning
from ttd.model.contract import EMBEDDING_NAMES, IMAGE_ENCODER, TEXT_ENCODER
from ttd.runtime.hardware import Capabilities, cpu_capabilities

REFERENCE_SAMPLES = "reference_samples.npz"
MIN_COSINE = 0.99  # the variant gate of export/checks.py
SAMPLE_COUNT = 4


class PortabilityNotice(TTDWarning):
    """Whether a reduced-precision export was re-checked on this CPU."""


class PortabilityError(TTDError, RuntimeError):
    """A reduced-precision export lost quality on this CPU; the message gives the figures."""


@dataclass(frozen=True)
class PortabilityCheck:
    checked: bool
    message: str  # one line for the user
    min_cosine: dict[str, float] | None = None


def write_reference_samples(out_dir: Path, backend, pixel_values: np.ndarray, input_ids: np.ndarray) -> Path:
    """Store a few preprocessed inputs and `backend`'s (PyTorch fp32) outputs for them."""
    pixel_values, input_ids = pixel_values[:SAMPLE_COUNT].astype(np.float32), input_ids[:SAMPLE_COUNT].astype(np.int64)
    arrays = {IMAGE_ENCODER.inputs[0]: pixel_values, TEXT_ENCODER.inputs[0]: input_ids,
              **backend.encode_images(pixel_values)._asdict(), TEXT_ENCODER.outputs[0]: backend.encode_texts(input_ids)}
    path = out_dir / REFERENCE_SAMPLES
    with path.open("wb") as f:  # np.savez on a file object: no second name, hashes stay stable
        np.savez_compressed(f, **arrays)
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
    outputs = {**backend.encode_images(samples[IMAGE_ENCODER.inputs[0]])._asdict(),
               TEXT_ENCODER.outputs[0]: backend.encode_texts(samples[TEXT_ENCODER.inputs[0]])}
    # patch embeddings are unit vectors along the channel axis (1); the others along the last
    cosines = {name: _min_cosine(samples[name], outputs[name], 1 if name == "patch_embeds" else -1)
               for name in EMBEDDING_NAMES}
    misses = [f"{name} cosine {value:.4f} < {MIN_COSINE}" for name, value in cosines.items() if value < MIN_COSINE]
    if misses:
        raise PortabilityError(f"{root}: {precision} export {origin} loses quality on this {here.isa_class} CPU "
                               f"({'; '.join(misses)} against PyTorch fp32 on {len(samples['input_ids'])} stored "
                               "samples); re-export it on this machine or use the fp32 export")
    worst = min(cosines.values())
    return PortabilityCheck(True, f"{precision} export {origin}; re-checked on this {here.isa_class} CPU: "
                                  f"min cosine {worst:.4f} ≥ {MIN_COSINE} on {len(samples['input_ids'])} samples", cosines)
