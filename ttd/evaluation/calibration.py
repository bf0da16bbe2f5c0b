"""Calibrating a model end to end, as `ttd calibrate` does: load it, fit the `negatives` margin
label-free (ttd/evaluation/label_free.py) or on labels (ttd/evaluation/calibrate.py), and write it
into the checkpoint's config or a calibrated copy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttd.errors import InputError
from ttd.evaluation.calibrate import (calibrate_checkpoint, check_calibration_outputs, fit_negative_margin,
                                      fitted_config, labelled_record)
from ttd.model.config import (CALIBRATION_COUNT, CALIBRATION_SEED, DEFAULT_LABEL_FREE_PAIRS, DEFAULT_MAX_FALSE_RATE,
                              DEFAULT_MIN_PRECISION, DEFAULT_THRESHOLD)


@dataclass
class Calibration:
    """What `calibrate_model` did: the fit, how it is recorded in the config, the items it skipped,
    and one line saying what it wrote (None for a dry run)."""

    fit: Any
    record: dict
    skipped: list[str]
    written: str | None = None


def calibrate_model(settings: dict, captions: Path | None = None, data_dir: Path | None = None, *,
                    max_false_rate: float = DEFAULT_MAX_FALSE_RATE, max_pairs: int = DEFAULT_LABEL_FREE_PAIRS,
                    choose_negatives: bool = False, count: int = CALIBRATION_COUNT, seed: int = CALIBRATION_SEED,
                    min_precision: float = DEFAULT_MIN_PRECISION, batch_size: int = 32, out_dir: Path | None = None,
                    dry_run: bool = False, json_path: Path | None = None) -> Calibration:
    """Fit the `negatives` margin of the model `settings` name (`ttd.load`'s keyword arguments) and
    write it: into the checkpoint's config, or a calibrated copy in `out_dir`; `dry_run` writes
    nothing but `json_path`. Label-free on image-caption pairs (`captions`), or on a labelled folder
    (`data_dir`, default: the world's calibration split). What `ttd calibrate` runs."""
    from ttd.api import load
    from ttd.data.annotations import labelled_samples
    from ttd.model.torch_extra import torch_installed
    from ttd.runtime import torch_tagger

    checkpoint, backend = settings.get("checkpoint"), settings.get("backend", "torch")
    if backend == "torch" and not torch_installed():  # the base install calibrates an export (docs/edge.md)
        backend = "onnxruntime"
    threshold, flip_tta = settings.get("threshold", DEFAULT_THRESHOLD), settings.get("flip_tta", False)
    if not 0 < threshold < 1:
        raise InputError(f"--threshold {threshold:g}: a margin is fitted for a δ strictly between 0 and 1")
    if captions is not None and data_dir is not None:
        raise InputError("give --captions (pairs without labels) or --data (a labelled folder), not both")
    if checkpoint is None and out_dir is None and not dry_run:
        raise InputError("calibration writes into a checkpoint's config: pass --checkpoint FILE, or --out DIR to write "
                         "a calibrated checkpoint (e.g. of --model NAME --pretrained FILE), or --dry-run to only report")
    if backend != "torch" and not dry_run:
        raise InputError(f"--backend {backend}: calibrating an export writes nothing into it (its files are hashed); "
                         "use --dry-run (and --json), or calibrate the source checkpoint and export again")
    check_calibration_outputs(checkpoint, out_dir, json_path,
                              [captions, data_dir and data_dir / "annotations.jsonl", settings.get("pretrained")],
                              dry_run)
    loaded = None
    if backend == "torch":
        from ttd.model.factory import load_model

        loaded = load_model(settings.get("model"), settings.get("pretrained"), checkpoint, settings.get("dense_mode"))
        tagger = torch_tagger(loaded, settings.get("device"), settings.get("dtype", "fp32"), threshold=threshold,
                              flip_tta=flip_tta, score_method="negatives")
    else:
        tagger = load(**{**settings, "score_method": "negatives", "warn_unfitted": False}).runtime
    skipped: list[str] = []
    if captions is not None:
        from ttd.data.items import read_pairs
        from ttd.evaluation.label_free import fit_label_free

        images, texts = read_pairs(captions, max_pairs, skipped)
        fit: Any = fit_label_free(tagger, images, texts, max_false_rate, choose_prompts=choose_negatives,
                                  batch_size=batch_size, skipped=skipped)
        record, prompts = fit.record(str(captions), threshold, flip_tta), fit.negative_prompts
    else:
        samples = labelled_samples(data_dir, tagger.preprocess, seed, count, skipped)
        fit = fit_negative_margin(tagger, samples, min_precision, batch_size)
        where = str(data_dir) if data_dir else f"world seed {seed} ({count} pairs)"
        record, prompts = labelled_record(fit, where, threshold, flip_tta), None
    if json_path:
        Path(json_path).write_text(json.dumps({**fit.as_dict(), "margin_fit": record}, indent=1))
    result = Calibration(fit, record, skipped)
    if dry_run:
        return result
    if out_dir is not None:
        from ttd.model.factory import save_checkpoint

        path = save_checkpoint(loaded.float(), Path(out_dir) / "model.safetensors",
                               config=fitted_config(loaded.config, fit.margin, record, prompts))
        result.written = (f"wrote {path} (+ {path.with_suffix('.json').name}) with negative_margin {fit.margin:.4g}; "
                          f"tag with --checkpoint {path}")
    else:
        old = calibrate_checkpoint(Path(checkpoint), fit.margin, record, prompts)
        result.written = (f"wrote negative_margin {old:g} -> {fit.margin:.4g} into "
                          f"{Path(checkpoint).with_suffix('.json')}; export again if this checkpoint was exported")
    return result
