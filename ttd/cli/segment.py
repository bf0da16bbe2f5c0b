"""`ttd segment` and `ttd report`: masks in each image's own geometry, and their HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from ttd.model.config import (
    DEFAULT_SCORE_METHOD,
    SCORE_METHODS,
)

from ttd.cli.common import (check_inputs, fail, long_job_options, main, make_segment_options, model_options, read_classes,
                             resolve_batch_size, run_on_engine, whole_image_options)


@main.command()
@click.option("--captions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Caption masks: JSONL or CSV with an image path and a caption per item.")
@click.option("--classes", default=None,
              help="Semantic segmentation of the IMAGES into these classes: a comma list or a file with one "
                   "name a line.")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON lines, one per item in input order, masks as COCO RLE (view with `ttd report`).")
@click.option("--coco", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write COCO-style JSON (images, categories, RLE annotations) here.")
@click.option("--masks-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write PNG masks (and palette PNG label maps) under this folder.")
@model_options
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt", "triton"]), default="torch",
              show_default=True)
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="Export directory (onnxruntime, tensorrt, triton; with torch: run the export's own weights).")
@click.option("--url", default=None, help="Triton server URL for --backend triton (host:port).")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="δ: a tag is selected when its score ≥ δ.")
@click.option("--score", "score_method", type=click.Choice(SCORE_METHODS), default=DEFAULT_SCORE_METHOD,
              show_default=True, help="The pixel-tag score that selects a caption's tags (as in `ttd tag`).")
@whole_image_options
@long_job_options
@click.option("--device", default="auto", show_default=True)
@click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
# options of `ttd tag` that segmentation records cannot honour: not offered, refused with the reason
@click.option("--format", "output_format", type=click.Choice(["auto", "jsonl", "parquet"]), default=None, hidden=True)
@click.option("--rle-masks", is_flag=True, hidden=True)
def segment(captions, classes, images, output, coco, masks_dir, model, pretrained, checkpoint, dense_mode, backend,
            export_dir, url, threshold, score_method, crop, scales, stride, flip_tta, mask_threshold, templates_path,
            pamr, device, max_pixels, quiet, output_format, rle_masks, resume, shard, num_shards, batch_size,
            decode_workers, engine, ray_address, actors):
    """Masks in each image's own geometry: caption masks (--captions) or open-vocabulary semantic
    segmentation (--classes NAMES IMAGES...).

    \b
    ttd segment --captions captions.jsonl -o masks.jsonl --coco masks.json
    ttd segment --classes cat,dog,grass photos/ -o seg.jsonl --masks-dir seg/ --flip-tta --pamr
    ttd report masks.jsonl --html report.html
    """
    import dataclasses

    from ttd.data.inputs import InputError
    from ttd.jobs.jsonl_output import output_format_of
    from ttd.jobs.runner import JobOptions, refuse_input_as_output
    from ttd.jobs.segment_job import WholeImageStep, write_coco_of
    from ttd.jobs.stream_job import tag_job_description
    from ttd.runtime import load_tagger
    from ttd.segment.segmentation import read_templates, with_templates

    if rle_masks:
        fail("--rle-masks: ttd segment's records hold every mask as COCO RLE already (\"segments\"); leave it out")
    check_inputs(captions, images, "--classes NAMES", classes)
    if output_format == "parquet" or output_format_of(output) == "parquet":
        fail(f"{'--format parquet' if output_format == 'parquet' else output}: segmentation records hold masks as "
             "RLE segments and are written as JSON lines (Parquet output is for `ttd tag --crop center`)")
    batch_size = resolve_batch_size(batch_size, device, crop, 8)
    options = dataclasses.replace(make_segment_options(crop, scales, stride, mask_threshold, pamr), batch_size=batch_size)
    tagger_options = dict(backend=backend, model=model, pretrained=pretrained, checkpoint=checkpoint,
                          dense_mode=dense_mode, device=device, export_dir=export_dir, url=url, threshold=threshold,
                          flip_tta=flip_tta, score_method=score_method)
    try:
        templates = read_templates(templates_path.read_text(encoding="utf-8")) if templates_path else None
        names = read_classes(classes) if classes is not None else None
        inputs = [p for p in (captions,) if p is not None]
        if coco is not None:
            refuse_input_as_output(coco, [], inputs)
        job = tag_job_description(captions, images, backend, model, pretrained, checkpoint, export_dir, dense_mode,
                                  "fp32", threshold, score_method, flip_tta)
        summary = run_on_engine(
            engine, WholeImageStep(names, options, masks_dir, max_pixels), captions, images, output,
            {**job, "templates": str(templates_path)},
            JobOptions(batch_size, decode_workers, resume=resume, shard=shard, num_shards=num_shards,
                       output_format="jsonl", progress=not quiet),
            tagger_options, lambda: with_templates(load_tagger(**tagger_options), templates), ray_address, actors,
            templates, inputs=inputs, explicit_images=images)
        if coco is not None:
            write_coco_of(output, coco)
    except (InputError, ValueError, RuntimeError, OSError) as error:
        fail(error)
    click.echo(summary.line() + (f"; COCO annotations in {coco}" if coco else ""), err=True)


@main.command()
@click.argument("records", type=click.Path(exists=True, path_type=Path))
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The report's first page; further pages go beside it (NAME-2.html, ...).")
@click.option("--per-page", type=click.IntRange(1), default=50, show_default=True, help="Items per page.")
@click.option("--max-side", type=click.IntRange(64), default=480, show_default=True,
              help="Images are embedded at most this many pixels on their longer side.")
@click.option("--images-root", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder that relative image paths in RECORDS start from, and that every embedded image must "
                   "lie in [default: the folder of the captions file the job recorded (`ttd tag --captions F`), "
                   "else RECORDS' folder]. Masks may also lie in RECORDS' folder.")
@click.option("--allow-any-path", is_flag=True,
              help="Embed images and masks wherever RECORDS point (absolute paths, '..', links out of the root). "
                   "Off by default: a report is one file made to be shared, and records must not make it carry "
                   "files from elsewhere. Only for a report you keep, of records you trust.")
def report(records, html_path, per_page, max_side, images_root, allow_any_path):
    """A static, self-contained HTML report of a `ttd tag` or `ttd segment` output (RECORDS):
    each image with its coloured mask overlays and legend, the candidate tags with scores
    (selected or rejected), and the errors; paginated. A record that cannot be shown (a bad
    score, a mask larger than its image, a path outside --images-root) is an error on its item;
    the rest renders."""
    from ttd.jobs.report import write_report

    try:
        pages = write_report(records, html_path, per_page, max_side, images_root, allow_any_path)
    except (ValueError, OSError, RuntimeError) as error:  # RuntimeError: a Parquet folder without pyarrow
        fail(str(error))
    click.echo(f"wrote {len(pages)} page(s): {pages[0]}", err=True)
