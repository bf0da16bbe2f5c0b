"""`ttd export`: graphs, gates, variants, manifest, optional TensorRT engines — in that order.

The fp32 graphs are always exported and gated against PyTorch first. A precision variant is then
made from them and gated against the same PyTorch fp32 reference; if it misses, the export
directory is left without graphs and the error says by how much it missed.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from export.checks import FP32_GATE, VARIANT_GATE, check_pairs, compare, enforce
from export.onnx_graphs import DEFAULT_OPSET, export_graphs
from export.precision import ENCODERS, PRECISIONS, Int8Settings, portable_settings, to_fp16, to_int8
from export.int8_portability import INT16_MAX, worst_pair_sum
from ttd.hardware import cpu_capabilities
from ttd.images import normalize
from ttd.lora import has_lora, merge_lora
from ttd.model import TTDModel
from ttd.factory import save_checkpoint
from ttd.runtime.export_dir import CONFIG, GRAPH_NAMES, MANIFEST, TORCH_WEIGHTS, read_export, sha256
from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend
from ttd.runtime.portability import REFERENCE_SAMPLES, write_reference_samples
from ttd.runtime.tagger import Tagger
from ttd.runtime.torch_backend import TorchBackend
from ttd.tags import STOPWORDS


def tool_versions(packages: tuple[str, ...] = ("torch", "open_clip_torch", "onnx", "onnxruntime", "ttd-toolkit")
                  ) -> dict[str, str]:
    """Python and the installed versions of `packages` (for manifests and benchmark reports)."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _tagger(backend, model: TTDModel) -> Tagger:
    return Tagger(backend, model.config, mask_weight=model.mask_weight.item(), mask_bias=model.mask_bias.item())


def _calibration(model: TTDModel, images: np.ndarray, captions: list[str]) -> dict[str, list[dict[str, np.ndarray]]]:
    pixels = normalize(images, model.config.mean, model.config.std)
    tokens = model.tokenizer(captions)
    return {"image_encoder": [{"pixel_values": pixels[i : i + 8]} for i in range(0, len(pixels), 8)],
            "text_encoder": [{"input_ids": tokens[i : i + 8]} for i in range(0, len(tokens), 8)]}


def _write_side_files(model: TTDModel, out_dir: Path, torch_weights: bool) -> None:
    if torch_weights:  # writes CONFIG beside it
        save_checkpoint(model, out_dir / TORCH_WEIGHTS)
    else:  # and no stale weights of an earlier export in the same folder
        (out_dir / TORCH_WEIGHTS).unlink(missing_ok=True)
        (out_dir / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=1))
    (out_dir / "stopwords.txt").write_text("\n".join(sorted(STOPWORDS)) + "\n")
    if model.config.tokenizer.get("kind") == "open_clip":
        import open_clip

        vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        if vocab.is_file():
            shutil.copy(vocab, out_dir / vocab.name)


def run_export(model: TTDModel, out_dir: Path, precision: str = "fp32", int8_mode: str = "dynamic",
               opset: int = DEFAULT_OPSET, check_count: int = 64, tensorrt: bool = False,
               tensorrt_limits=None, torch_weights: bool = True, int8_settings: Int8Settings | None = None) -> dict:
    """Export `model` to `out_dir` and return the manifest; raises GateError when a gate fails.

    The model is moved to the CPU in float32 and its LoRA adapters, if any, are merged in place.
    `torch_weights` also writes those weights (model.safetensors), for the torch backend and the
    Triton torch engine (GPU serving without TensorRT or onnxruntime-gpu)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if tensorrt:  # before any work: an export that cannot become engines should not take minutes to say so
        from export.tensorrt import preflight

        preflight(precision)
    int8_settings = int8_settings or portable_settings(int8_mode)
    model = model.float().cpu().eval()
    if has_lora(model):
        model = merge_lora(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = _tagger(TorchBackend(model, "cpu", "float32"), model)
    images, captions = check_pairs(model.config.image_size, check_count)
    _write_side_files(model, out_dir, torch_weights)
    export_graphs(model, out_dir, opset)
    write_reference_samples(out_dir, reference.backend, normalize(images, model.config.mean, model.config.std),
                            model.tokenizer(captions[:8]))
    manifest = _manifest(model, out_dir, "fp32", opset)  # hashes first: the runtime verifies them
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    parity = compare(reference, _tagger(OnnxRuntimeBackend(read_export(out_dir), "cpu"), model), images, captions)
    manifest["parity"] = parity
    try:
        enforce(parity, FP32_GATE, "fp32 export (ONNX vs PyTorch)")
        if precision != "fp32":
            manifest["quality"] = _make_variant(model, out_dir, precision, int8_mode, opset, images, captions, reference,
                                                int8_settings)
            variant = json.loads((out_dir / MANIFEST).read_text())  # written by _make_variant, hashes included
            manifest.update(files=variant["files"], precision=precision)
            if precision == "int8":
                manifest["int8_mode"] = int8_mode
                manifest["int8"] = {"mode": int8_mode, **int8_settings.to_dict(),
                                    "worst_pair_sum": max(worst_pair_sum(out_dir / f"{n}.onnx") for n in ENCODERS)}
    except Exception:
        for name in GRAPH_NAMES:
            (out_dir / f"{name}.onnx").unlink(missing_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        raise
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if tensorrt:
        from export.tensorrt import BatchLimits, build_engines, engines_manifest

        limits = tensorrt_limits or BatchLimits()
        engines = build_engines(out_dir, model.config, precision, limits)
        manifest["tensorrt"] = engines_manifest(engines, model.config, limits)
        manifest["files"].update({p.name: sha256(p) for p in engines.values()})
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _make_variant(model: TTDModel, out_dir: Path, precision: str, int8_mode: str, opset: int,
                  images: np.ndarray, captions: list[str], reference: Tagger,
                  int8_settings: Int8Settings) -> dict:
    if precision == "bf16":
        with tempfile.TemporaryDirectory() as tmp:
            # a copy: casting the reference model to bf16 and back would round its weights
            graphs = export_graphs(copy.deepcopy(model), Path(tmp), opset, torch.bfloat16)
            for name in ENCODERS:
                shutil.move(graphs[name], out_dir / f"{name}.onnx")
    elif precision == "fp16":
        for name in ENCODERS:
            to_fp16(out_dir / f"{name}.onnx")
    else:
        calibration = _calibration(model, images, captions) if int8_mode == "static" else {}
        for name in ENCODERS:
            to_int8(out_dir / f"{name}.onnx", int8_mode, calibration.get(name), int8_settings)
            worst = worst_pair_sum(out_dir / f"{name}.onnx")
            if worst > INT16_MAX:
                from export.checks import GateError

                raise GateError(f"int8 export refused: {name}'s u8s8 products can reach int16 pair sums of {worst} "
                                f"> {INT16_MAX}, which saturate on CPUs without VNNI (AVX2); quantise with reduce_range")
    manifest = _manifest(model, out_dir, precision, opset)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    try:
        candidate = _tagger(OnnxRuntimeBackend(read_export(out_dir), "cpu"), model)
    except Exception as error:  # onnxruntime lacks kernels for this precision on this device
        from export.checks import GateError

        raise GateError(f"{precision} export refused: onnxruntime cannot run it here "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from error
    quality = compare(reference, candidate, images, captions)
    enforce(quality, VARIANT_GATE, f"{precision} export (vs PyTorch fp32)")
    return quality


def _manifest(model: TTDModel, out_dir: Path, precision: str, opset: int) -> dict:
    config = model.config
    written = [CONFIG, TORCH_WEIGHTS, REFERENCE_SAMPLES, "stopwords.txt", "bpe_simple_vocab_16e6.txt.gz", *(f"{g}.onnx{x}" for g in GRAPH_NAMES for x in ("", ".data"))]
    files = sorted(name for name in written if (out_dir / name).is_file())  # what the export wrote, not what was there
    return {
        "format": "ttd-export/1",
        "model": config.name,
        "source": config.source,
        "dense_mode": config.dense_mode,
        "image_size": config.image_size,
        "mean": list(config.mean),
        "std": list(config.std),
        "interpolation": config.interpolation,
        "context_length": config.context_length,
        "embed_dim": config.embed_dim,
        "grid": list(config.grid_size),
        "tau": config.tau,
        "mask_weight": model.mask_weight.item(),
        "mask_bias": model.mask_bias.item(),
        "opset": opset,
        "precision": precision,
        "versions": tool_versions(),
        "gate_cpu": cpu_capabilities(with_gpu=False).to_dict(),  # where the gates ran (ttd/runtime/portability.py)
        "files": {name: sha256(out_dir / name) for name in files},
    }
