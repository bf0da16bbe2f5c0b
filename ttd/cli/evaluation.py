"""`ttd eval`, `ttd calibrate` and `ttd eval-segmentation`: measuring a model and fitting its margin."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ttd.model.config import (
    CALIBRATION_COUNT,
    CALIBRATION_SEED,
    DEFAULT_LABEL_FREE_PAIRS,
    DEFAULT_MAX_FALSE_RATE,
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_MIN_PRECISION,
    DEFAULT_THRESHOLD,
)
from ttd.runtime import BACKENDS

from ttd.cli.common import (fail, main, make_segment_options, model_options, whole_image_options)


@main.command("eval")
@model_options
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="An evaluation folder (annotations.jsonl). Default: the held-out world split in memory.")
@click.option("--count", type=click.IntRange(1), default=500, show_default=True, help="World samples when --data is not given.")
@click.option("--seed", type=int, default=2, show_default=True, help="World seed when --data is not given.")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True)
@click.option("--mask-threshold", type=float, default=DEFAULT_MASK_THRESHOLD, show_default=True,
              help="θ for the binary caption mask.")
@click.option("--flip-tta", is_flag=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics here as JSON.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch",
              show_default=True, help="Evaluate through this runtime backend (an export's with --export-dir).")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="Export directory for onnxruntime / tensorrt / triton (with torch: its own weights).")
@click.option("--url", default=None, help="Triton server URL for --backend triton.")
def evaluate_command(model, pretrained, checkpoint, dense_mode, data_dir, count, seed, threshold, mask_threshold,
                     flip_tta, batch_size, json_path, device, backend, export_dir, url):
    """Tag and caption-mask metrics of a model (the embedded default when none is given), measured
    through the same runtime as `ttd tag` (so an export can be evaluated: --backend onnxruntime --export-dir)."""
    from ttd.data.annotations import labelled_samples
    from ttd.evaluation.evaluate import evaluate, format_table
    from ttd.model.factory import ModelLoadError
    from ttd.runtime import load_tagger

    try:
        tagger = load_tagger(backend, model=model, pretrained=pretrained, checkpoint=checkpoint, dense_mode=dense_mode,
                             device=device, export_dir=export_dir, url=url, threshold=threshold, flip_tta=flip_tta)
    except (ModelLoadError, ValueError, RuntimeError, OSError) as error:
        fail(str(error))
    config = tagger.config
    skipped: list[str] = []
    try:
        samples = labelled_samples(data_dir, tagger.preprocess, seed, count, skipped)
    except ValueError as error:
        fail(str(error))
    for reason in skipped:
        click.echo(f"skipped {reason}", err=True)
    result = evaluate(tagger, samples, threshold, mask_threshold, batch_size)
    result["skipped"] = skipped
    result["model"] = config.source
    result["backend"] = backend
    click.echo(format_table(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))


@main.command()
@model_options
@click.option("--captions", type=click.Path(path_type=Path), default=None,
              help="Image-caption pairs WITHOUT labels (any input of `ttd tag --captions`: JSONL/CSV, webdataset "
                   "shards): the label-free fit.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="A labelled evaluation folder (annotations.jsonl with relevant_tags). Default without --captions: "
                   "the world's calibration split (seed 7: never trained or evaluated on).")
@click.option("--max-false-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DEFAULT_MAX_FALSE_RATE, show_default=True,
              help="--captions: the margin lets at most this share of the null (a Gaussian fitted to the peak of "
                   "shuffled pairs) through; the default gives precision >= 97 % on labelled world pairs.")
@click.option("--max-pairs", type=click.IntRange(2), default=DEFAULT_LABEL_FREE_PAIRS, show_default=True,
              help="--captions: fit on the first this many usable pairs.")
@click.option("--choose-negatives", is_flag=True,
              help="--captions: also choose the negative prompts, from ttd.model.config.NEGATIVE_PROMPT_CANDIDATES, "
                   "that best separate the captions' tags from shuffled ones (label-free; off by default: it lowered "
                   "F1 on the world, docs/calibration.md).")
@click.option("--count", type=click.IntRange(1), default=CALIBRATION_COUNT, show_default=True,
              help="World samples when neither --data nor --captions is given.")
@click.option("--seed", type=int, default=CALIBRATION_SEED, show_default=True, help="World seed when --data is not given.")
@click.option("--min-precision", type=click.FloatRange(0, 1), default=DEFAULT_MIN_PRECISION, show_default=True,
              help="Labelled fit: the margin of best F1 among those with at least this precision.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=DEFAULT_THRESHOLD,
              show_default=True, help="δ the margin is fitted for (the one you tag with).")
@click.option("--flip-tta", is_flag=True, help="Fit for tagging with flip TTA.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a calibrated checkpoint DIR/model.safetensors (+ .json) instead of into --checkpoint: "
                   "how a plain open_clip model (--model NAME --pretrained FILE) gets its margin.")
@click.option("--dry-run", is_flag=True, help="Report the fitted margin without writing it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the fit here as JSON.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
def calibrate(model, pretrained, checkpoint, dense_mode, captions, data_dir, max_false_rate, max_pairs, choose_negatives,
              count, seed, min_precision, threshold, flip_tta, batch_size, out_dir, dry_run, json_path, device):
    """Fit the default score's margin (negative_margin) to a model and write it, with how it was
    fitted, into the model's config.

    \b
    The `negatives` score selects a tag when it beats the negative prompts by the margin; the
    margin belongs to the model (a TTD fine-tuned model needs a larger one than its base, or it
    selects absent tags). A model tagging with a margin never fitted to it says so.
    \b
    Your own pairs, no labels (the margin from shuffled pairs: docs/calibration.md):
        ttd calibrate --checkpoint runs/ttd/model.safetensors --captions pairs.jsonl
    A plain open_clip model (weights copied untouched, config with the margin):
        ttd calibrate --model ViT-B-16 --pretrained open_clip_model.safetensors --captions pairs.jsonl --out calibrated/
        ttd tag --checkpoint calibrated/model.safetensors --captions pairs.jsonl -o tags.jsonl
    Labelled pairs (best F1 at --min-precision):
        ttd calibrate --checkpoint runs/ttd/model.safetensors --data labelled/
    Export again after calibrating an exported checkpoint.
    """
    from ttd.data.annotations import labelled_samples
    from ttd.data.inputs import InputError
    from ttd.evaluation.calibrate import (calibrate_checkpoint, check_calibration_outputs, fit_negative_margin,
                                          fitted_config, labelled_record)
    from ttd.model.factory import ModelLoadError, load_model, save_checkpoint
    from ttd.runtime import torch_tagger

    if captions is not None and data_dir is not None:
        fail("give --captions (pairs without labels) or --data (a labelled folder), not both")
    if checkpoint is None and out_dir is None and not dry_run:
        fail("calibration writes into a checkpoint's config: pass --checkpoint FILE, or --out DIR to write a "
             "calibrated checkpoint (e.g. of --model NAME --pretrained FILE), or --dry-run to only report")
    try:
        check_calibration_outputs(checkpoint, out_dir, json_path,
                                  [captions, data_dir and data_dir / "annotations.jsonl", pretrained], dry_run)
        loaded = load_model(model, pretrained, checkpoint, dense_mode)
        tagger = torch_tagger(loaded, device, threshold=threshold, flip_tta=flip_tta, score_method="negatives")
        skipped: list[str] = []
        if captions is not None:
            from ttd.data.items import read_pairs
            from ttd.evaluation.label_free import fit_label_free

            images, texts = read_pairs(captions, max_pairs, skipped)
            fit = fit_label_free(tagger, images, texts, max_false_rate, choose_prompts=choose_negatives,
                                 batch_size=batch_size, skipped=skipped)
            record, prompts = fit.record(str(captions), threshold, flip_tta), fit.negative_prompts
        else:
            samples = labelled_samples(data_dir, tagger.preprocess, seed, count, skipped)
            fit = fit_negative_margin(tagger, samples, min_precision, batch_size)
            where = str(data_dir) if data_dir else f"world seed {seed} ({count} pairs)"
            record, prompts = labelled_record(fit, where, threshold, flip_tta), None
        for reason in skipped[:20]:
            click.echo(f"skipped {reason}", err=True)
        if len(skipped) > 20:
            click.echo(f"skipped {len(skipped) - 20} more", err=True)
        click.echo(fit.line())
        if json_path:
            json_path.write_text(json.dumps({**fit.as_dict(), "margin_fit": record}, indent=1))
        if dry_run:
            return
        if out_dir is not None:
            path = save_checkpoint(loaded, out_dir / "model.safetensors",
                                   config=fitted_config(loaded.config, fit.margin, record, prompts))
            click.echo(f"wrote {path} (+ {path.with_suffix('.json').name}) with negative_margin {fit.margin:.4g}; "
                       f"tag with --checkpoint {path}", err=True)
        else:
            old = calibrate_checkpoint(Path(checkpoint), fit.margin, record, prompts)
            click.echo(f"wrote negative_margin {old:g} -> {fit.margin:.4g} into {Path(checkpoint).with_suffix('.json')}; "
                       "export again if this checkpoint was exported", err=True)
    except (ModelLoadError, InputError, ValueError, OSError) as error:
        fail(str(error))


@main.command("eval-segmentation")
@click.argument("data_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=False)
@click.option("--split", default="val", show_default=True, help="ImageSets/Segmentation/SPLIT.txt of a VOC-style folder.")
@click.option("--classes-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Class names, one a line, line i = label i (default: DATA_DIR/classes.txt, else PASCAL VOC's 21).")
@click.option("--count", type=click.IntRange(1), default=200, show_default=True, help="World samples without DATA_DIR.")
@click.option("--seed", type=int, default=2, show_default=True, help="World seed without DATA_DIR.")
@click.option("--size", type=click.IntRange(16), default=64, show_default=True, help="World image side without DATA_DIR.")
@click.option("--world-classes", type=click.Choice(["shapes", "colours"]), default="shapes", show_default=True,
              help="Without DATA_DIR: label the world's objects by shape (8 classes) or colour (6).")
@model_options
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt", "triton"]), default="torch",
              show_default=True)
@click.option("--export-dir", type=click.Path(file_okay=False), default=None)
@click.option("--url", default=None, help="Triton server URL for --backend triton.")
@whole_image_options
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the per-class metrics here as JSON.")
def eval_segmentation(data_dir, split, classes_file, count, seed, size, world_classes, model, pretrained, checkpoint,
                      dense_mode, backend, export_dir, url, crop, scales, stride, flip_tta, mask_threshold,
                      templates_path, pamr, device, json_path):
    """mIoU / mFPR / mFNR per class of open-vocabulary segmentation on a VOC-style folder
    (JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/SPLIT.txt, classes.txt;
    label 0 is the background, 255 ignored) or, without DATA_DIR, on the world segmentation split
    (exact ground truth)."""
    from ttd.data.voc import VOCError, read_voc, world_segmentation_samples
    from ttd.runtime import load_tagger
    from ttd.evaluation.segmentation import evaluate_segmentation, format_segmentation_table
    from ttd.segment.segmentation import read_templates, with_templates

    options = make_segment_options(crop, scales, stride, mask_threshold, pamr)
    try:
        tagger = load_tagger(backend, model=model, pretrained=pretrained, checkpoint=checkpoint, dense_mode=dense_mode,
                             device=device, export_dir=export_dir, url=url, flip_tta=flip_tta)
        if templates_path is not None:
            tagger = with_templates(tagger, read_templates(templates_path.read_text(encoding="utf-8")))
        dataset = (read_voc(data_dir, split, classes_file) if data_dir
                   else world_segmentation_samples(seed, count, size, labelling=world_classes))
        result = evaluate_segmentation(tagger, dataset, options)
    except (VOCError, ValueError, RuntimeError, OSError) as error:
        fail(str(error))
    result["model"] = tagger.config.source
    click.echo(format_segmentation_table(result))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
