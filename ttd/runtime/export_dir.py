"""Reading an export directory written by `ttd export` (docs/architecture.md §4): the manifest, the model
config, and the graphs, with every file's sha256 checked against the manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ttd.errors import TTDError
from ttd.model.config import ModelConfig
from ttd.model.contract import CONTRACT_VERSION, GRAPH_NAMES

MANIFEST = "manifest.json"
CONFIG = "model.json"
TORCH_WEIGHTS = "model.safetensors"  # a TTD checkpoint with CONFIG as its config: the torch engine's weights
TOKENIZER = "tokenizer.json"  # the torch-free tokenizer of an open_clip model (ttd/model/clip_bpe.py)


class ExportError(TTDError, ValueError):
    """An export directory is incomplete, altered or of another format."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ExportDir:
    root: Path
    manifest: dict
    config: ModelConfig

    @property
    def mask_weight(self) -> float:
        return float(self.manifest["mask_weight"])

    @property
    def mask_bias(self) -> float:
        return float(self.manifest["mask_bias"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    def graph(self, name: str) -> Path:
        return self.root / f"{name}.onnx"

    def torch_weights(self) -> Path:
        """The exported model's fp32 weights, for the torch backend and the Triton torch engine."""
        if TORCH_WEIGHTS not in self.manifest.get("files", {}) or not (self.root / TORCH_WEIGHTS).is_file():
            raise ExportError(f"{self.root} has no {TORCH_WEIGHTS} (exported without torch weights); "
                              "re-export with `ttd export` (weights are written unless --no-torch-weights)")
        return self.file(TORCH_WEIGHTS)

    def file(self, name: str) -> Path:
        """A file that the manifest names (e.g. a TensorRT engine): inside the export and hashed."""
        if name not in self.manifest.get("files", {}):
            raise ExportError(f"{self.root}: {name!r} has no sha256 in the manifest; refusing to use it")
        return contained(self.root, name)


def contained(root: Path, name: str) -> Path:
    """root/name, refusing a name from a manifest that leads outside the export (absolute,
    '..', or through a symlink)."""
    path = root / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise ExportError(f"{root}: manifest entry {name!r} points outside the export directory")
    return path


def verify_hashes(root: Path, manifest: dict) -> None:
    """Every file the manifest lists matches its sha256; the hashes are mandatory and must
    cover the model config and the three graphs."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{root / MANIFEST} has no file hashes (\"files\"); re-export with `ttd export`")
    unhashed = [n for n in (CONFIG, *(f"{g}.onnx" for g in GRAPH_NAMES)) if n not in files]
    if unhashed:
        raise ExportError(f"{root / MANIFEST}: no sha256 for {', '.join(unhashed)}; re-export with `ttd export`")
    for name, expected in files.items():
        path = contained(root, name)
        if not path.is_file():
            raise ExportError(f"{root}: {name} is listed in the manifest but missing")
        if sha256(path) != expected:
            raise ExportError(f"{root}: {name} does not match its sha256 in the manifest (altered or corrupted)")


def read_export(root: str | Path, verify: bool = True) -> ExportDir:
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{root} is not an export directory: no {MANIFEST} (create one with `ttd export`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportError(f"{manifest_path} is not valid JSON ({error}); re-export with `ttd export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "ttd-export/1":
        raise ExportError(f"{manifest_path}: unknown format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}")
    if manifest.get("contract") != CONTRACT_VERSION:
        raise ExportError(f"{root} was exported with tag-head contract {manifest.get('contract', 1)}; this version of "
                          f"ttd runs contract {CONTRACT_VERSION}: re-export it with `ttd export`")
    if verify:
        verify_hashes(root, manifest)
    try:
        config = ModelConfig.from_dict(json.loads((root / CONFIG).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ExportError(f"{root / CONFIG} is not a usable model config ({type(error).__name__}: {error})") from None
    return ExportDir(root, manifest, with_export_tokenizer(root, manifest, config))


def with_export_tokenizer(root: Path, manifest: dict, config: ModelConfig) -> ModelConfig:
    """`config` tokenising with the export's own files (TOKENIZER and its merges) where it has
    them: the same ids as open_clip's tokenizer, without torch (docs/edge.md)."""
    if TOKENIZER not in manifest.get("files", {}):
        return config
    try:
        spec = json.loads(contained(root, TOKENIZER).read_text(encoding="utf-8"))
        merges = contained(root, spec["merges"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{root / TOKENIZER} is not a usable tokenizer description ({error}); "
                          "re-export with `ttd export`") from None
    if spec["merges"] not in manifest["files"]:
        raise ExportError(f"{root}: {spec['merges']!r} has no sha256 in the manifest; refusing to use it")
    return dataclasses.replace(config, tokenizer={**spec, "path": str(merges)})
