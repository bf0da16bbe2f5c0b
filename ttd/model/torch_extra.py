"""Whether the `torch` extra is installed, and the one-line error of what needs it (or another extra).

The base install (`pip install ttd-toolkit`) runs exports on onnxruntime; torch, torchvision and
open_clip come with `pip install 'ttd-toolkit[torch]'` (docs/edge.md). Here, at the bottom of the
layers, so that the model package (tokenizers) and the runtime say the same thing.
"""

from __future__ import annotations

import importlib.util

from ttd.errors import TTDError

TORCH_EXTRA = "torch"
INSTALL_TORCH = f"pip install 'ttd-toolkit[{TORCH_EXTRA}]'"


class MissingExtra(TTDError, ImportError):
    """A command needs a package of an extra (serve, parquet, ray, torch) that this install leaves out."""


class TorchMissing(MissingExtra):
    """A command or setting needs torch (or open_clip), which the base install leaves out."""


def installed(module: str) -> bool:
    """Whether `import module` can succeed here, without importing it (torch takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_installed() -> bool:
    return installed("torch")


def require_torch(what: str) -> None:
    """TorchMissing naming `what` and the extra that brings torch, where torch is not installed."""
    if not torch_installed():
        raise TorchMissing(f"{what} needs torch, which this install leaves out: {INSTALL_TORCH}")


# import name -> the extra that installs it (safetensors: the torch checkpoints' format)
MODULE_EXTRAS = {**{m: TORCH_EXTRA for m in ("torch", "torchvision", "open_clip", "safetensors", "onnx", "onnxscript")},
                 **{m: "serve" for m in ("aiohttp", "tritonclient", "pytriton")}, "pyarrow": "parquet", "ray": "ray"}


def as_missing_extra(error: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """The one-line MissingExtra (TorchMissing for torch's) for an import of an extra's module that
    failed while doing `what` (e.g. "`ttd train`"); None when the missing module is no extra's (a bug)."""
    module = (error.name or "").split(".")[0]
    extra = MODULE_EXTRAS.get(module)
    if extra is None:
        return None
    error_class = TorchMissing if extra == TORCH_EXTRA else MissingExtra
    return error_class(f"{what} needs {module}, which this install leaves out: pip install 'ttd-toolkit[{extra}]'")
