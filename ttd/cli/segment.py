"""`ttd segment` and `ttd report`: masks in each image's own geometry, and their HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from ttd.cli.common import (comma_floats, echo_line, fail, long_job_options, main, read_classes,
                             whole_image_options)
from ttd.options import RUNTIME, setting_options


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
@setting_options(*RUNTIME, "threshold", "score_method")
@whole_image_options
@long_job_options
@click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True,
              help="Refuse larger images (decompression bombs).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
# options of `ttd tag` that segmentation records cannot honour: not offered, refused with the reason
@click.option("--format", "output_format", type=click.Choice(["auto", "jsonl", "parquet"]), default="auto", hidden=True)
@click.option("--rle-masks", is_flag=True, hidden=True)
def segment(captions, classes, images, output, coco, masks_dir, crop, scales, stride, templates_path, pamr, max_pixels,
            quiet, output_format, rle_masks, resume, shard, num_shards, batch_size, decode_workers, engine,
            ray_address, actors, **settings):
    """Masks in each image's own geometry: caption masks (--captions) or open-vocabulary semantic
    segmentation (--classes NAMES IMAGES...).

    \b
    ttd segment --captions captions.jsonl -o masks.jsonl --coco masks.json
    ttd segment --classes cat,dog,grass photos/ -o seg.jsonl --masks-dir seg/ --flip-tta --pamr
    ttd report masks.jsonl --html report.html
    """
    from ttd.jobs.job import Job, run

    summary = run(Job(output, captions, images, classes=None if classes is None else read_classes(classes),
                      segment=True, crop=crop, settings=settings, masks_dir=masks_dir, rle_masks=rle_masks,
                      coco=coco, templates=templates_path, scales=comma_floats(scales, "--scales"), stride=stride,
                      pamr=pamr, max_pixels=max_pixels, batch_size=batch_size, decode_workers=decode_workers,
                      resume=resume, shard=shard, num_shards=num_shards, output_format=output_format,
                      engine=engine, ray_address=ray_address, actors=actors, progress=not quiet), log=echo_line)
    echo_line(summary.line() + (f"; COCO annotations in {coco}" if coco else ""))


@main.command()
@click.argument("records", type=click.Path(exists=True, path_type=Path))
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The report's first page; further pages go beside it (NAME-2.html, ...).")
@click.option("--per-page", type=click.IntRange(1), default=50, show_default=True, help="Items per page.")
@click.option("--max-side", type=click.IntRange(64), default=480, show_default=True,
              help="Images are embedded at most this many pixels on their longer side.")
@click.option("--images-root", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder that relative image paths in RECORDS start from, and that every embedded image must "
                   "lie in [default: RECORDS' folder; never a folder named by data in the records, such as the "
                   "captions folder the job recorded]. Masks may also lie in RECORDS' folder.")
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

    pages = write_report(records, html_path, per_page, max_side, images_root, allow_any_path)
    click.echo(f"wrote {len(pages)} page(s): {pages[0]}", err=True)
