"""`ttd tag`: batch tagging of images with their captions or against a vocabulary."""

from __future__ import annotations

from pathlib import Path

import click

from ttd.cli.common import echo_line, long_job_options, main
from ttd.options import DECODE, RUNTIME, SCORING, setting_options


@main.command()
@click.option("--captions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL or CSV with an image path (relative to the file) and a caption per item, "
                   "or webdataset shards ('shards/{000..099}.tar').")
@click.option("--vocabulary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Tag every image against this list of tags (one per line) instead of captions.")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="JSON lines written here, one per item, in input order (Parquet: a folder of shard files).")
@click.option("--format", "output_format", type=click.Choice(["auto", "jsonl", "parquet"]), default="auto",
              show_default=True,
              help="auto: Parquet when OUTPUT ends in .parquet, else JSON lines. parquet: OUTPUT is a folder of "
                   "part-NNNNN.parquet files (typed nested columns; pandas, duckdb and Spark read the folder) "
                   "and _SUCCESS when complete; needs pyarrow (pip install 'ttd-toolkit[parquet]').")
@click.option("--rows-per-file", type=click.IntRange(1), default=None,
              help="Parquet: records per shard file (a killed job redoes at most this many on --resume) "
                   "[default: 10000].")
@setting_options(*RUNTIME, *SCORING)
@click.option("--masks-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a PNG mask per selected tag under this folder, at the image's own width and "
                   "height (with the centre crop: the crop's mask where the crop was, background elsewhere).")
@click.option("--rle-masks", is_flag=True,
              help="Also put each selected tag's mask in its record, as COCO RLE (\"rle_masks\": tag -> "
                   "{size, counts}; pycocotools): the --masks-dir mask, at the image's own size, "
                   "thresholded at the default mask threshold. Needs pip install 'ttd-toolkit[segment]'.")
@click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True,
              help="Refuse larger images (decompression bombs).")
@click.option("--top-k", type=click.IntRange(1), default=None, help="Vocabulary mode: best tags listed per image [default: 10].")
@click.option("--compile", "compile_encoder", is_flag=True,
              help="Torch backend: torch.compile the image encoder (CUDA graphs on a GPU); pays a one-off "
                   "compilation per power-of-two batch size, worth it for long jobs.")
@click.option("--vocab-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of cached vocabulary tag embeddings, keyed by model/export and vocabulary "
                   "(default: $TTD_CACHE_DIR/vocab or ~/.cache/ttd/vocab).")
@click.option("--no-vocab-cache", is_flag=True, help="Encode the vocabulary afresh and cache nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--profile", is_flag=True,
              help="At the end, print where the job's time went: seconds per stage (decode, upload, encode, "
                   "head, host work, write; CUDA events on a GPU).")
@click.option("--crop", type=click.Choice(["center", "whole"]), default="center", show_default=True,
              help="center: the model sees the centre crop (fast). whole: sliding windows cover the whole image, "
                   "so tags outside the crop are found too, and each line also holds the caption's and the "
                   "selected tags' masks in the image's own geometry (as `ttd segment --captions`).")
@DECODE.option
@long_job_options
def tag(captions, vocabulary, images, output, output_format, rows_per_file, masks_dir, rle_masks, max_pixels, top_k,
        compile_encoder, vocab_cache, no_vocab_cache, quiet, profile, crop, decode, resume, shard, num_shards,
        batch_size, decode_workers, engine, ray_address, actors, **settings):
    """Tag images: with their captions (--captions) or against a vocabulary (--vocabulary IMAGES...).

    Each output line holds the candidate tags with their pixel-tag scores and the selected tags,
    or an "error" that names the problem (unreadable image, empty caption, ...); one bad item
    never stops the others.

    \b
    Inputs are streamed (no index in memory): --captions takes a JSONL/CSV file or webdataset
    shards ('shards/{000..099}.tar': caption from each sample's txt or json); IMAGES may be
    files, folders or quoted globs ('photos/**/*.jpg').
    Long jobs: --resume after any interruption; --shard/--num-shards for job arrays;
    --engine ray for a Ray cluster. From Python: ttd.run(ttd.Job(...)) (docs/api.md).
    """
    from ttd.jobs.job import Job, run

    summary = run(Job(output, captions, images, vocabulary, crop=crop, masks_dir=masks_dir, rle_masks=rle_masks,
                      top_k=top_k, max_pixels=max_pixels, decode=decode, batch_size=batch_size,
                      decode_workers=decode_workers,
                      resume=resume, shard=shard, num_shards=num_shards, output_format=output_format,
                      rows_per_file=rows_per_file, engine=engine, ray_address=ray_address, actors=actors,
                      vocab_cache=vocab_cache, use_vocab_cache=not no_vocab_cache, progress=not quiet,
                      settings={**settings, **({"compile": True} if compile_encoder else {})}), log=echo_line)
    echo_line(summary.line())
    if profile:
        echo_line(summary.profile())
