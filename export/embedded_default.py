"""The embedded default model's export (ttd/assets/world-base-export): what the base install runs
when no model is named (docs/edge.md). Regenerate it after world-base.safetensors changes:

    python -m export.embedded_default

tests/runtime/test_base_install.py holds it in step with the weights: the manifest records the
sha256 of the weights it was exported from, and its records equal the torch default's.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from export.pipeline import run_export
from ttd.model.factory import DEFAULT_CHECKPOINT, load_checkpoint
from ttd.runtime.base_install import DEFAULT_EXPORT
from ttd.runtime.export_dir import MANIFEST, sha256

SOURCE_KEY = "exported_from"  # manifest entry: {"file": name, "sha256": ...} of the weights


def write_embedded_default(out_dir: Path = DEFAULT_EXPORT) -> dict:
    """fp32 graphs of the embedded default, without torch weights (world-base.safetensors beside
    it is those), with the weights' sha256 in the manifest."""
    manifest = run_export(load_checkpoint(DEFAULT_CHECKPOINT), out_dir, precision="fp32", torch_weights=False)
    manifest[SOURCE_KEY] = {"file": DEFAULT_CHECKPOINT.name, "sha256": sha256(DEFAULT_CHECKPOINT)}
    # the gates' CPU and tool versions say where it was made; they are not needed to run it
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for stale in out_dir.glob("*.onnx.data"):
        stale.unlink()
    return manifest


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_EXPORT
    if target.exists() and target == DEFAULT_EXPORT:
        shutil.rmtree(target)
    written = write_embedded_default(target)
    print(f"wrote {target}: {', '.join(sorted(written['files']))}")
