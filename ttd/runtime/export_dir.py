"""Reading an export directory written by `ttd export` (DESIGN §4): the manifest, the model
config, and the graphs, with every file's sha256 checked against the manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ttd.config import ModelConfig

GRAPH_NAMES = ("image_encoder", "text_encoder", "tag_head")
MANIFEST = "manifest.json"
CONFIG = "model.json"
TORCH_WEIGHTS = "model.safetensors"  # a TTD checkpoint with CONFIG as its config: the torch engine's weights


class ExportError(ValueError):
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
        path = self.root / TORCH_WEIGHTS
        if TORCH_WEIGHTS not in self.manifest.get("files", {}) or not path.is_file():
            raise ExportError(f"{self.root} has no {TORCH_WEIGHTS} (exported without torch weights); "
                              "re-export with `ttd export` (weights are written unless --no-torch-weights)")
        return path


def verify_hashes(root: Path, manifest: dict) -> None:
    for name, expected in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file():
            raise ExportError(f"{root}: {name} is listed in the manifest but missing")
        if sha256(path) != expected:
            raise ExportError(f"{root}: {name} does not match its sha256 in the manifest (altered or corrupted)")


def read_export(root: str | Path, verify: bool = True) -> ExportDir:
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{root} is not an export directory: no {MANIFEST} (create one with `ttd export`)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != "ttd-export/1":
        raise ExportError(f"{manifest_path}: unknown format {manifest.get('format')!r}")
    if verify:
        verify_hashes(root, manifest)
    config = ModelConfig.from_dict(json.loads((root / CONFIG).read_text()))
    return ExportDir(root, manifest, config)
