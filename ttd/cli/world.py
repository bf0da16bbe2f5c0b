"""`ttd world`: the synthetic world's splits (tagging, segmentation) and the CC3M-TagMask converter."""

from __future__ import annotations

from pathlib import Path

import click


from ttd.cli.common import (fail, main)


@main.group()
def world() -> None:
    """The synthetic world: seeded image-caption pairs with exact tag and mask ground truth."""


@world.command("generate")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(1), default=500, show_default=True, help="Samples to generate.")
@click.option("--seed", type=int, default=2, show_default=True, help="World seed (training uses 1; the held-out split 2).")
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, help="Index of the first sample.")
def world_generate(out_dir, count, seed, start):
    """Write COUNT world samples in the evaluation format (annotations.jsonl, images/, masks/)."""
    from ttd.data.annotations import write_world_split

    path = write_world_split(out_dir, seed, count, start)
    click.echo(f"wrote {count} samples to {path}", err=True)


@world.command("convert-tagmask")
@click.argument("source", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def convert_tagmask_command(source, out_dir):
    """Index a CC3M-TagMask style folder (one JSON per image: caption, tags, tag_masks,
    caption_mask, beside the image and mask PNGs) as an evaluation annotations.jsonl."""
    from ttd.data.annotations import convert_tagmask

    try:
        path = convert_tagmask(source, out_dir)
    except (KeyError, ValueError) as error:
        fail(f"{source}: {error}")
    click.echo(f"wrote {path}", err=True)




@world.command("segmentation")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(1), default=200, show_default=True, help="Samples to generate.")
@click.option("--seed", type=int, default=2, show_default=True, help="World seed (the held-out split is 2).")
@click.option("--size", type=click.IntRange(16), default=64, show_default=True, help="Image side in pixels.")
@click.option("--world-classes", "labelling", type=click.Choice(["shapes", "colours"]), default="shapes", show_default=True,
              help="Label objects by shape (8 classes) or colour (6); 0 is the background.")
def world_segmentation(out_dir, count, seed, size, labelling):
    """Write COUNT world samples as a VOC-style segmentation folder (exact masks)."""
    from ttd.data.voc import write_world_segmentation

    path = write_world_segmentation(out_dir, seed, count, size, labelling=labelling)
    click.echo(f"wrote {count} samples to {path}", err=True)
