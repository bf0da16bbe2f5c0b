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
from ttd.cli.common import echo_line, main, make_segment_options, whole_image_options
from ttd.options import RUNTIME, BatchSize, resolved_batch_size, setting_options


@main.command("eval")
@setting_options(*RUNTIME, "threshold", "flip_tta", "mask_threshold")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="An evaluation folder (annotations.jsonl). Default: the held-out world split in memory.")
@click.option("--count", type=click.IntRange(1), default=500, show_default=True, help="World samples when --data is not given.")
@click.option("--seed", type=int, default=2, show_default=True, help="World seed when --data is not given.")
@click.option("--batch-size", type=BatchSize(), default=64, show_default=True,
              help="Images per encoder call (auto: by device).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics here as JSON.")
def evaluate_command(data_dir, count, seed, batch_size, json_path, **settings):
    """Tag and caption-mask metrics of a model (the embedded default when none is given), measured
    through the same runtime as `ttd tag` (so an export can be evaluated: --backend onnxruntime --export-dir)."""
    from ttd.evaluation.evaluate import evaluate_model, format_table

    batch_size = resolved_batch_size(batch_size, settings["device"], "center", 64)
    result = evaluate_model(settings, data_dir, count, seed, batch_size, log=echo_line)
    click.echo(format_table(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))


@main.command()
@setting_options(*RUNTIME, "threshold", "flip_tta")
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
@click.option("--batch-size", type=BatchSize(), default=32, show_default=True,
              help="Images per encoder call (auto: by device).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a calibrated checkpoint DIR/model.safetensors (+ .json) instead of into --checkpoint: "
                   "how a plain open_clip model (--model NAME --pretrained FILE) gets its margin.")
@click.option("--dry-run", is_flag=True, help="Report the fitted margin without writing it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the fit here as JSON.")
def calibrate(captions, data_dir, max_false_rate, max_pairs, choose_negatives, count, seed, min_precision, batch_size,
              out_dir, dry_run, json_path, **settings):
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
    from ttd.evaluation.calibration import calibrate_model

    batch_size = resolved_batch_size(batch_size, settings["device"], "center", 32)
    result = calibrate_model(settings, captions, data_dir, max_false_rate=max_false_rate, max_pairs=max_pairs,
                             choose_negatives=choose_negatives, count=count, seed=seed, min_precision=min_precision,
                             batch_size=batch_size, out_dir=out_dir, dry_run=dry_run, json_path=json_path)
    for reason in result.skipped[:20]:
        echo_line(f"skipped {reason}")
    if len(result.skipped) > 20:
        echo_line(f"skipped {len(result.skipped) - 20} more")
    click.echo(result.fit.line())
    if result.written:
        echo_line(result.written)


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
@setting_options(*RUNTIME)
@whole_image_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the per-class metrics here as JSON.")
def eval_segmentation(data_dir, split, classes_file, count, seed, size, world_classes, crop, scales, stride,
                      templates_path, pamr, json_path, **settings):
    """mIoU / mFPR / mFNR per class of open-vocabulary segmentation on a VOC-style folder
    (JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/SPLIT.txt, classes.txt;
    label 0 is the background, 255 ignored) or, without DATA_DIR, on the world segmentation split
    (exact ground truth)."""
    from ttd.data.voc import read_voc, world_segmentation_samples
    from ttd.evaluation.segmentation import evaluate_model_segmentation, format_segmentation_table

    options = make_segment_options(crop, scales, stride, settings["mask_threshold"], pamr)
    dataset = (read_voc(data_dir, split, classes_file) if data_dir
               else world_segmentation_samples(seed, count, size, labelling=world_classes))
    result = evaluate_model_segmentation(settings, dataset, options, templates_path)
    click.echo(format_segmentation_table(result))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
