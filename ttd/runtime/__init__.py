"""One inference interface, several backends (torch, onnxruntime, tensorrt, triton).

`load_tagger` builds a Tagger around the backend a user names; the backends themselves only run
the three contract graphs of docs/architecture.md §4.
"""

from __future__ import annotations

from ttd.errors import TTDWarning
from ttd.model.config import DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD
from ttd.runtime.backends import BACKENDS
from ttd.runtime.portability import PortabilityNotice
from ttd.runtime.tagger import Backend, Tagger, TagResult



class UnfittedMarginWarning(TTDWarning):
    """The `negatives` score's margin was never fitted to the model's weights: its selections mean little."""


class MarginFitMismatchWarning(UnfittedMarginWarning):
    """The margin was fitted for another δ or flip TTA than the tagger uses: its selections differ
    from what the fit measured (world: precision 1.000 at the fit's δ 0.95, 0.978 at δ 0.5)."""


def margin_fit_mismatch(config, threshold: float, flip_tta: bool) -> str | None:
    """One line when the config's recorded fit used another δ or flip TTA than `threshold` /
    `flip_tta`, naming both and the command that fits for these; None when they agree or the
    fit does not record them."""
    fit = config.margin_fit if isinstance(config.margin_fit, dict) else {}
    fitted_threshold, fitted_flip = fit.get("threshold"), fit.get("flip_tta")
    changed = []
    if isinstance(fitted_threshold, (int, float)) and abs(float(fitted_threshold) - float(threshold)) > 1e-9:
        changed.append(f"for δ {fitted_threshold:g} (tagging at {threshold:g})")
    if isinstance(fitted_flip, bool) and fitted_flip != bool(flip_tta):
        changed.append(f"{'with' if fitted_flip else 'without'} flip TTA (tagging {'with' if flip_tta else 'without'} it)")
    if not changed:
        return None
    options = f"--threshold {threshold:g}" + (" --flip-tta" if flip_tta else "")
    return (f"negative_margin {config.negative_margin:g} was fitted {' and '.join(changed)}: its selections "
            f"differ from what the fit measured; tag with the fit's settings, or fit for these with `ttd calibrate "
            f"... {options}`")


def unfitted_margin_notice(config, model: str | None = None, pretrained: str | None = None,
                           checkpoint: str | None = None, export_dir: str | None = None) -> str | None:
    """One line naming the command that fits the margin, or None when the config records a fit."""
    if config.margin_fit is not None:
        return None
    if checkpoint:
        command = f"ttd calibrate --checkpoint {checkpoint} --captions PAIRS.jsonl"
    elif model:
        weights = f" --pretrained {pretrained}" if pretrained else ""
        command = (f"ttd calibrate --model {model}{weights} --captions PAIRS.jsonl --out DIR, then tag with "
                   "--checkpoint DIR/model.safetensors")
    else:
        command = "ttd calibrate --checkpoint MODEL.safetensors --captions PAIRS.jsonl, then export again"
    where = f"export {export_dir}" if export_dir else config.source
    return (f"negative_margin {config.negative_margin:g} of {where} was never fitted to this model, so its "
            f"selections mean little; fit it on your image-caption pairs (no labels needed): {command}")

__all__ = ["BACKENDS", "Backend", "MarginFitMismatchWarning", "Tagger", "TagResult", "UnfittedMarginWarning", "load_tagger", "model_tagger",
           "torch_tagger", "unfitted_margin_notice"]


def model_tagger(backend: Backend, model, **options) -> Tagger:
    """A Tagger around `backend` with the config and fitted mask weight and bias of `model` (a
    TTDModel the backend's graphs come from: its own weights, or an export of them)."""
    return Tagger(backend, model.config, mask_weight=model.mask_weight.item(), mask_bias=model.mask_bias.item(),
                  **options)


def torch_tagger(model, device: str | None = None, dtype: str = "fp32", compile: bool = False,
                 **options) -> Tagger:
    """A Tagger running `model` (a TTDModel, moved to `device`) with the torch backend."""
    from ttd.runtime.torch_backend import TorchBackend

    return model_tagger(TorchBackend(model, device, dtype, compile=compile), model, **options)


def load_tagger(
    backend: str = "torch",
    *,
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    dense_mode: str | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    export_dir: str | None = None,
    url: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    flip_tta: bool = False,
    score_method: str = DEFAULT_SCORE_METHOD,
    threads: int = 0,
    compile: bool = False,
    warn_unfitted: bool = True,
) -> Tagger:
    """A Tagger on the named backend; `threads` = 0 lets the backend use every core.

    The torch backend loads `checkpoint`, `model`, the weights of an export (`export_dir`, for
    the same model the other backends run) or the embedded default; `compile` applies to it only.
    A model whose `negatives` margin was never fitted to it warns (UnfittedMarginWarning), unless
    `warn_unfitted` is False (calibration, which fits it).
    """
    tagger = _load_tagger(backend, model, pretrained, checkpoint, dense_mode, device, dtype, export_dir, url,
                          threshold, flip_tta, score_method, threads, compile)
    notice = unfitted_margin_notice(tagger.config, model, pretrained, checkpoint, export_dir)
    if warn_unfitted and score_method == "negatives" and notice:
        import warnings

        warnings.warn(notice, UnfittedMarginWarning, stacklevel=2)
    mismatch = margin_fit_mismatch(tagger.config, tagger.threshold, tagger.flip_tta)
    if warn_unfitted and score_method == "negatives" and mismatch:
        import warnings

        warnings.warn(mismatch, MarginFitMismatchWarning, stacklevel=2)
    return tagger


def _load_tagger(backend, model, pretrained, checkpoint, dense_mode, device, dtype, export_dir, url, threshold,
                 flip_tta, score_method, threads, compile) -> Tagger:
    from ttd.runtime.backends import backend_entry

    from ttd.runtime.base_install import DEFAULT_EXPORT, export_for_torch_request, torch_installed

    options = {"threshold": threshold, "flip_tta": flip_tta, "score_method": score_method}
    if backend == "torch" and not torch_installed():  # the base install: the same model's export (docs/edge.md)
        backend = "onnxruntime"
        export_dir = export_for_torch_request(model, pretrained, checkpoint, export_dir, dtype, compile)
    elif backend == "onnxruntime" and not (export_dir or model or pretrained or checkpoint):
        export_dir = str(DEFAULT_EXPORT)  # nothing named: the embedded default, as on torch
    entry = backend_entry(backend)
    if entry.name == "torch":
        return entry.build(model, pretrained, checkpoint, dense_mode, device, dtype, export_dir, threads, compile,
                           **options)
    return entry.build(export_dir=export_dir, device=device, threads=threads, url=url, **options)
