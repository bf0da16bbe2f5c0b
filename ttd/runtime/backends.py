"""The backends, registered in one place: each name with the facts the rest of the toolkit asks
about it and the function that builds a Tagger on it. Adding a backend is one entry here (and its
module); the CLI's choices, the job runner and the vocabulary cache read this table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ttd.errors import TTDError
from ttd.runtime.tagger import Tagger


class BackendError(TTDError, ValueError):
    """A backend that does not exist, or one asked for without what it needs."""


@dataclass(frozen=True)
class BackendEntry:
    name: str
    runs_export: bool  # runs the graphs of an export directory (needs --export-dir)
    thread_safe: bool  # its graphs may run from two threads at once (the job runner's record stage)
    keyed_by_export: bool  # its vocabulary embeddings are cached under the export's hash
    build: Callable[..., Tagger]


def _torch(model: str | None, pretrained: str | None, checkpoint: str | None, dense_mode: str | None,
           device: str | None, dtype: str, export_dir: str | None, threads: int, compile: bool,
           **options: Any) -> Tagger:
    from ttd.model.factory import load_model
    from ttd.runtime.torch_backend import TorchBackend

    if threads:
        import torch

        torch.set_num_threads(threads)
    if export_dir and not (checkpoint or model):
        from ttd.runtime.export_dir import read_export

        checkpoint = str(read_export(export_dir).torch_weights())
    loaded = load_model(model, pretrained, checkpoint, dense_mode)
    return Tagger(TorchBackend(loaded, device, dtype, compile=compile), loaded.config,
                  mask_weight=loaded.mask_weight.item(), mask_bias=loaded.mask_bias.item(), **options)


def _export(export_dir: str | None, name: str) -> Any:
    if not export_dir:
        raise BackendError(f"--backend {name} needs the export directory (for preprocessing and tokenizer "
                           "settings, and the graphs): pass --export-dir DIR (from `ttd export`)")
    from ttd.runtime.export_dir import read_export

    return read_export(export_dir)


def _export_tagger(runner: Any, export: Any, options: dict[str, Any]) -> Tagger:
    return Tagger(runner, export.config, mask_weight=export.mask_weight, mask_bias=export.mask_bias, **options)


def _onnxruntime(export_dir: str | None, device: str | None, threads: int, url: str | None,
                 **options: Any) -> Tagger:
    from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend

    export = _export(export_dir, "onnxruntime")
    runner = OnnxRuntimeBackend(export, device, threads)
    if runner.providers[0] == "CPUExecutionProvider" and export.precision != "fp32":
        import warnings

        from ttd.runtime.portability import PortabilityNotice, check_here

        warnings.warn(check_here(export.root, export.manifest, runner).message, PortabilityNotice, stacklevel=3)
    return _export_tagger(runner, export, options)


def _tensorrt(export_dir: str | None, device: str | None, threads: int, url: str | None, **options: Any) -> Tagger:
    from ttd.runtime.tensorrt_backend import TensorRTBackend

    export = _export(export_dir, "tensorrt")
    runner = TensorRTBackend(export, device=device if device not in (None, "auto") else "cuda")
    return _export_tagger(runner, export, options)


def _triton(export_dir: str | None, device: str | None, threads: int, url: str | None, **options: Any) -> Tagger:
    from ttd.runtime.triton_backend import TritonBackend

    export = _export(export_dir, "triton")
    return _export_tagger(TritonBackend(url or "127.0.0.1:8000"), export, options)


REGISTRY: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("torch", runs_export=False, thread_safe=True, keyed_by_export=False, build=_torch),
    BackendEntry("onnxruntime", runs_export=True, thread_safe=True, keyed_by_export=True, build=_onnxruntime),
    BackendEntry("tensorrt", runs_export=True, thread_safe=False, keyed_by_export=True, build=_tensorrt),
    # the triton backend gives each thread its own client
    BackendEntry("triton", runs_export=True, thread_safe=True, keyed_by_export=False, build=_triton),
)}


def backend_entry(name: str) -> BackendEntry:
    """The registered backend `name`; BackendError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(REGISTRY)}") from None


BACKENDS: tuple[str, ...] = tuple(REGISTRY)
