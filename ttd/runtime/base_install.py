"""What the base install runs, and what it says when a command needs the `torch` extra.

`pip install ttd-toolkit` is the runtime: onnxruntime, numpy, pillow and the tokenizer, enough to
tag, segment, calibrate and serve from an export (docs/edge.md). torch, torchvision and
open_clip come with `pip install 'ttd-toolkit[torch]'` (training, export, the torch backend).
The embedded default model ships as its weights (for torch) and as an export of them (for
onnxruntime), so the model that `ttd tag` runs when none is named needs no torch either.
"""

from __future__ import annotations

from pathlib import Path

from ttd.model.torch_extra import INSTALL_TORCH, TorchMissing, require_torch, torch_installed

__all__ = ["DEFAULT_EXPORT", "INSTALL_TORCH", "TorchMissing", "export_for_torch_request", "require_torch",
           "torch_installed"]

ASSETS = Path(__file__).parents[1] / "assets"
DEFAULT_EXPORT = ASSETS / "world-base-export"  # `python -m export.embedded_default`: world-base.safetensors's export


def export_for_torch_request(model: str | None, pretrained: str | None, checkpoint: str | None,
                             export_dir: str | None, dtype: str = "fp32", compile: bool = False) -> str:
    """The export that onnxruntime runs for a torch-backend request where torch is not installed:
    `export_dir`, or the embedded default's export when no model is named. The same model at the
    same precision (fp32), so the records agree with torch's to float rounding; anything else
    (another model, bf16 weights, torch.compile) needs torch and says so."""
    named = [flag for flag, value in (("--model", model), ("--pretrained", pretrained),
                                      ("--checkpoint", checkpoint)) if value]
    if named:
        raise TorchMissing(f"{' and '.join(named)} {'loads' if len(named) == 1 else 'load'} a model with torch, which this install leaves out: "
                           f"{INSTALL_TORCH}, or run an export of it with --backend onnxruntime --export-dir DIR")
    if dtype not in ("fp32", "auto") or compile:
        what = "--compile" if compile else f"--dtype {dtype}"
        raise TorchMissing(f"{what} applies to the torch backend, which needs torch (not installed here): "
                           f"{INSTALL_TORCH}, or leave it out to run the fp32 export on onnxruntime")
    if export_dir:
        return str(export_dir)
    if not (DEFAULT_EXPORT / "manifest.json").is_file():
        raise TorchMissing(f"the embedded default's export {DEFAULT_EXPORT} is missing from this install and "
                           f"torch is not installed: reinstall ttd-toolkit, or {INSTALL_TORCH}")
    return str(DEFAULT_EXPORT)
