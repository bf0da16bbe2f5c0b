"""`ttd export`: graphs, gates, variants, manifest, optional TensorRT engines — in that order.

The fp32 graphs are always exported and gated against PyTorch first. A precision variant is then
made from them and gated against the same PyTorch fp32 reference; if it misses, the error says by
how much it missed.

Everything is written into a staging folder beside OUT_DIR (inside it where its parent is
read-only) and moved into OUT_DIR only after the
gates passed, so a refused, failed or interrupted export (Ctrl-C, a precision this CPU cannot run)
leaves an earlier export in OUT_DIR as it was.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from export.checks import FP32_GATE, VARIANT_GATE, GateError, check_pairs, compare, enforce
from export.int8_portability import worst_pair_sum
from export.onnx_graphs import DEFAULT_OPSET, export_graphs
from export.precision import CONVERTERS, ENCODERS, PRECISIONS, Int8Settings, VariantJob, portable_settings
from ttd.errors import InputError
from ttd.model.contract import CONTRACT_VERSION, GRAPH_NAMES, IMAGE_ENCODER, TEXT_ENCODER
from ttd.model.factory import save_checkpoint
from ttd.runtime.hardware import cpu_capabilities
from ttd.runtime.images import Preprocess, normalize
from ttd.model.lora import has_lora, merge_lora
from ttd.model.clip import TTDModel
from ttd.runtime import model_tagger
from ttd.model.tokenizer import torch_free_spec
from ttd.runtime.export_dir import CONFIG, MANIFEST, TOKENIZER, TORCH_WEIGHTS, ExportDir, ExportError, sha256
from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend
from ttd.runtime.portability import REFERENCE_SAMPLES, write_reference_samples
from ttd.runtime.tagger import Tagger
from ttd.runtime.torch_backend import TorchBackend
from ttd.model.tags import STOPWORDS


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


def calibration_feeds(model: TTDModel, images: np.ndarray, captions: list[str]
                      ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Static int8 calibration inputs of each encoder: the gate's images and captions, 8 at a time."""
    pixels = normalize(images, model.config.mean, model.config.std)
    tokens = model.tokenizer(captions)
    return {graph.name: [{graph.inputs[0]: values[i : i + 8]} for i in range(0, len(values), 8)]
            for graph, values in ((IMAGE_ENCODER, pixels), (TEXT_ENCODER, tokens))}


def _write_side_files(model: TTDModel, out_dir: Path, torch_weights: bool) -> None:
    if torch_weights:  # writes CONFIG beside it
        save_checkpoint(model, out_dir / TORCH_WEIGHTS)
    else:
        (out_dir / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=1))
    (out_dir / "stopwords.txt").write_text("\n".join(sorted(STOPWORDS)) + "\n")
    if model.config.tokenizer.get("kind") == "open_clip":
        import open_clip

        vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        if vocab.is_file():
            shutil.copy(vocab, out_dir / vocab.name)
            spec = torch_free_spec(model.tokenizer)  # what the runtime without torch tokenises with
            if spec is not None:
                (out_dir / TOKENIZER).write_text(json.dumps(spec, indent=1) + "\n")


def _gate(model: TTDModel, out_dir: Path, manifest: dict, reference: Tagger, images: np.ndarray,
          captions: list[str], gate, what: str, versus: str) -> dict:
    """Run the export as it stands (graphs in `out_dir`, `manifest` in memory) against `reference`."""
    try:
        backend = OnnxRuntimeBackend(ExportDir(out_dir, manifest, model.config), "cpu")
    except Exception as error:  # onnxruntime lacks kernels for this precision on this device
        raise GateError(f"{what} refused: onnxruntime cannot run it here "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from error
    figures = compare(reference, model_tagger(backend, model), images, captions)
    enforce(figures, gate, f"{what} ({versus})")
    return figures


def run_export(model: TTDModel, out_dir: Path, precision: str = "fp32", int8_mode: str = "dynamic",
               opset: int = DEFAULT_OPSET, check_count: int = 64, tensorrt: bool = False,
               tensorrt_limits=None, torch_weights: bool = True, int8_settings: Int8Settings | None = None) -> dict:
    """Export `model` to `out_dir` and return the manifest; raises GateError when a gate fails.

    The export is made in a staging folder beside `out_dir` (see staging_dir) and moved in only when its gates
    passed (see swap_in): an export that fails, is refused or is interrupted leaves `out_dir` as it
    was. The model is moved to the CPU in
    float32 and its LoRA adapters, if any, are merged in place. `torch_weights` also writes those
    weights (model.safetensors), for the torch backend and the Triton torch engine."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if tensorrt:  # before any work: an export that cannot become engines should not take minutes to say so
        from export.tensorrt import preflight

        preflight(precision)
    int8_settings = int8_settings or portable_settings(int8_mode)
    # before minutes of work: the names this export may write
    refuse_foreign_files(out_dir, [n for n in EXPORT_NAMES if torch_weights or n != TORCH_WEIGHTS])
    model = model.float().cpu().eval()
    if has_lora(model):
        model = merge_lora(model)
    try:
        staging = staging_dir(out_dir)
    except OSError as error:  # OUT_DIR does not exist and its parent cannot be written, or neither can
        raise ExportError(f"cannot export to {out_dir}: cannot make its staging folder in "
                          f"{Path(os.path.abspath(out_dir)).parent} or in it ({error.strerror or error}); an export "
                          "is staged beside its folder, or inside an existing one whose parent is read-only: export "
                          "into a writable folder") from None
    try:
        manifest = _gated_export(model, staging, precision, int8_mode, opset, check_count, torch_weights,
                                 int8_settings)
    except Exception as error:
        reason = _write_failure(error)
        if reason is None:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(staging, ignore_errors=True)  # a full disk, a quota: one line, and OUT_DIR is untouched
        raise ExportError(f"cannot write the export in {staging.parent} ({reason}); {out_dir} is left as it "
                          "was") from None
    except BaseException:  # a refused gate, Ctrl-C: OUT_DIR is untouched
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        if tensorrt:
            from export.tensorrt import BatchLimits, build_engines, engines_manifest

            limits = tensorrt_limits or BatchLimits()
            engines = build_engines(staging, model.config, precision, limits)
            manifest["tensorrt"] = engines_manifest(engines, model.config, limits)
            manifest["files"].update({p.name: sha256(p) for p in engines.values()})
    finally:  # the gated ONNX export is moved in even when the engines fail to build
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        swap_in(staging, out_dir)
    return manifest


def _write_failure(error: BaseException) -> str | None:
    """Why a write failed (a full disk, a quota, a file-size limit), or None for another error.
    safetensors reports its write failures as its own error, "I/O error: REASON (os error N)"."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(error))
    return found.group(1) if found else None


def _gated_export(model: TTDModel, out_dir: Path, precision: str, int8_mode: str, opset: int, check_count: int,
                  torch_weights: bool, int8_settings: Int8Settings) -> dict:
    """Graphs, side files and the manifest (returned, not written) in `out_dir`; raises GateError."""
    reference = model_tagger(TorchBackend(model, "cpu", "fp32"), model)
    images, captions = check_pairs(Preprocess.for_model(model.config), check_count)
    _write_side_files(model, out_dir, torch_weights)
    export_graphs(model, out_dir, opset)
    write_reference_samples(out_dir, reference.backend, normalize(images, model.config.mean, model.config.std),
                            model.tokenizer(captions[:8]))
    manifest = _manifest(model, out_dir, "fp32", opset)
    manifest["parity"] = _gate(model, out_dir, manifest, reference, images, captions, FP32_GATE,
                               "fp32 export", "ONNX vs PyTorch")
    if precision != "fp32":
        CONVERTERS[precision](VariantJob(model, out_dir, opset, int8_mode, int8_settings,
                                         lambda: calibration_feeds(model, images, captions)))
        manifest.update(_manifest(model, out_dir, precision, opset))  # the variant's hashes
        manifest["quality"] = _gate(model, out_dir, manifest, reference, images, captions, VARIANT_GATE,
                                    f"{precision} export", "vs PyTorch fp32")
        if precision == "int8":
            manifest["int8"] = {"mode": int8_mode, **int8_settings.to_dict(),
                                "worst_pair_sum": max(worst_pair_sum(out_dir / f"{n}.onnx") for n in ENCODERS)}
    return manifest


STAGING_PREFIX = ".ttd-export-"  # .ttd-export-NAME.PID.XXXX beside (or inside) OUT_DIR while an export runs


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_staging(out_dir: Path) -> list[Path]:
    """Staging folders of `out_dir` left by exports that were killed (SIGKILL, SIGTERM, a power
    cut) — those whose process is gone, beside `out_dir` or inside it (see staging_dir); a running
    export's folder is kept. Returns what went."""
    removed = []
    # exactly .ttd-export-NAME.PID.XXXXXXXX (mkdtemp's 8-character suffix): a loose match took the
    # staging folder of a running export to NAME.99991 for a dead export's to NAME (pid 99991)
    exact = re.compile(re.escape(f"{STAGING_PREFIX}{out_dir.name}.") + r"(\d+)\.[A-Za-z0-9_]{8}")
    for where in (out_dir.parent, out_dir):
        for folder in where.glob(f"{STAGING_PREFIX}{out_dir.name}.*.*"):
            match = exact.fullmatch(folder.name)
            if match and folder.is_dir() and not folder.is_symlink() and not _process_alive(int(match.group(1))):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


# the parent cannot take a folder (read-only, no permission): an existing OUT_DIR may still
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def staging_dir(out_dir: Path) -> Path:
    """A new, empty folder on `out_dir`'s file system, so that moving from it is a rename, with the
    mode a new folder gets from the umask (mkdtemp would make it 0700). Beside `out_dir`, or inside
    an existing `out_dir` that is a mount point of its own or whose parent cannot be written (a
    volume in a read-only container; docs/reliability.md, "Exports"). Folders that killed exports
    left there are removed first."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder")
    remove_dead_staging(out_dir)
    prefix = f"{STAGING_PREFIX}{out_dir.name}.{os.getpid()}."
    if out_dir.is_dir() and out_dir.stat().st_dev != out_dir.parent.stat().st_dev:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))  # beside it would be another file system
    else:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
        except OSError as error:
            if error.errno not in _UNWRITABLE or not out_dir.is_dir():
                raise
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


# every name an export writes besides its manifest (TensorRT engines are named by the manifest alone)
EXPORT_NAMES = (CONFIG, TORCH_WEIGHTS, REFERENCE_SAMPLES, "stopwords.txt", "bpe_simple_vocab_16e6.txt.gz", TOKENIZER,
                *(f"{g}.onnx{x}" for g in GRAPH_NAMES for x in ("", ".data")))
# the old manifest while a swap is under way: a swap killed half-way still says which files were the export's
PREVIOUS_MANIFEST = ".ttd-export-previous-manifest.json"


def exported_files(out_dir: Path) -> set[str]:
    """The files an earlier export wrote into `out_dir`, as its manifest lists them (the manifest of
    a swap that was killed half-way included); empty when there is none to read."""
    owned: set[str] = set()
    for manifest in (out_dir / MANIFEST, out_dir / PREVIOUS_MANIFEST):
        try:
            files = json.loads(manifest.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(files, dict):
            owned |= {name for name in files if isinstance(name, str) and Path(name).name == name
                      and name not in (".", "..")}  # a manifest's names never lead out of the folder
    return owned


def refuse_foreign_files(out_dir: Path, names) -> None:
    """An export replaces or removes only what an earlier export wrote (its manifest says which):
    a checkpoint's model.json / model.safetensors in OUT, or any file of the user's under an
    export's name, is refused, named (docs/reliability.md, "Exports")."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    owned = exported_files(out_dir)
    foreign = sorted(name for name in names if name not in owned and os.path.lexists(out_dir / name))
    if foreign:
        raise ExportError(f"{out_dir / foreign[0]} is not a file an earlier export wrote (no manifest in {out_dir} "
                          f"lists it{'; also ' + ', '.join(foreign[1:]) if foreign[1:] else ''}): an export would "
                          "replace it; export into another folder, or move it away first")


def swap_in(staging: Path, out_dir: Path) -> None:
    """Move the finished export in `staging` into `out_dir`. A new `out_dir` is one rename. An
    existing one keeps the user's own files: its old manifest goes first (so a kill in the middle
    leaves a folder no runtime loads, never a mix vouched for), then the old export's files that
    the new one lacks, then each new file is renamed over, and the manifest last."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    new = {p.name for p in staging.iterdir()} - {MANIFEST}
    try:  # checked again: a file may have been put there while the gates ran
        refuse_foreign_files(out_dir, new)
    except ExportError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stale = exported_files(out_dir)
    old = out_dir / MANIFEST
    if old.is_file() and not old.is_symlink():
        os.replace(old, out_dir / PREVIOUS_MANIFEST)
    else:
        old.unlink(missing_ok=True)
    for name in stale - new:
        path = out_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()  # never a folder
    for name in sorted(new):
        os.replace(staging / name, out_dir / name)
    os.replace(staging / MANIFEST, out_dir / MANIFEST)
    (out_dir / PREVIOUS_MANIFEST).unlink(missing_ok=True)
    staging.rmdir()


def _manifest(model: TTDModel, out_dir: Path, precision: str, opset: int) -> dict:
    """What an export is beyond its model config (CONFIG, the one source of that): the head's
    fitted mask weight and bias, precision, versions, where the gates ran, and file hashes."""
    files = sorted(name for name in EXPORT_NAMES if (out_dir / name).is_file())  # what the export wrote, not what was there
    return {
        "format": "ttd-export/1",
        "contract": CONTRACT_VERSION,
        "mask_weight": model.mask_weight.item(),
        "mask_bias": model.mask_bias.item(),
        # the score's margin and how it was fitted (null: never fitted to these weights), for whoever ships
        # the export; the runtimes read the margin from model.json, the one source of model facts
        "negative_margin": model.config.negative_margin,
        "margin_fit": model.config.margin_fit,
        "opset": opset,
        "precision": precision,
        "versions": tool_versions(),
        "gate_cpu": cpu_capabilities(with_gpu=False).to_dict(),  # where the gates ran (ttd/runtime/portability.py)
        "files": {name: sha256(out_dir / name) for name in files},
    }
