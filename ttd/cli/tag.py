"""`ttd tag`: batch tagging of images with their captions or against a vocabulary."""

from __future__ import annotations

from pathlib import Path

import click

from ttd.model.config import (
    DEFAULT_SCORE_METHOD,
    DEFAULT_THRESHOLD,
    SCORE_METHODS,
)
from ttd.runtime import BACKENDS

from ttd.cli.common import Precision, fail, given_options, long_job_options, main, check_inputs, model_options, run_on_engine, resolve_batch_size


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
@click.option("--rows-per-file", type=click.IntRange(1), default=10_000, show_default=True,
              help="Parquet: records per shard file (a killed job redoes at most this many on --resume).")
@model_options
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="torch",
              show_default=True, help="auto: the fastest gated path for this hardware (onnxruntime with --export-dir, "
                                      "torch otherwise); prints what it picked and why.")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="Export directory (onnxruntime, tensorrt, triton; with torch: run the export's own weights).")
@click.option("--url", default=None, help="Triton server URL for --backend triton (host:port).")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="δ: a tag is selected when its score ≥ δ.")
@click.option("--score", "score_method", type=click.Choice(SCORE_METHODS), default=DEFAULT_SCORE_METHOD,
              show_default=True,
              help="Pixel-tag score: negatives = each tag against the model's negative prompts at its best pixel "
                   "(tags naming the same pixels, 'orange heart', both pass); softmax over the caption's tags "
                   "(the paper's: co-located tags exclude each other), minmax of the best-pixel "
                   "cosine, or sigmoid mask peak (suits large vocabularies, where a softmax over thousands of "
                   "tags is flat).")
@click.option("--flip-tta", is_flag=True, help="Average the maps of the image and its mirror image.")
@click.option("--masks-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a PNG mask per selected tag under this folder, at the image's own width and "
                   "height (with the centre crop: the crop's mask where the crop was, background elsewhere).")
@click.option("--rle-masks", is_flag=True,
              help="Also put each selected tag's mask in its record, as COCO RLE (\"rle_masks\": tag -> "
                   "{size, counts}; pycocotools): the --masks-dir mask, at the image's own size, "
                   "thresholded at the default mask threshold. Needs pip install 'ttd-toolkit[segment]'.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=Precision(("auto", "fp32", "bf16", "fp16")), default="fp32", show_default=True,
              help="Torch backend weights; bf16 is ~5x faster on CPUs with AMX (and slower without). "
                   "auto: fp16 on a GPU, bf16 with AMX or avx512_bf16, else fp32.")
@click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True,
              help="Refuse larger images (decompression bombs).")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True, help="Vocabulary mode: best tags listed per image.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for the torch and onnxruntime backends (0: all cores).")
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
@long_job_options
def tag(captions, vocabulary, images, output, model, pretrained, checkpoint, dense_mode, backend, export_dir, url,
        threshold, score_method, flip_tta, masks_dir, batch_size, device, dtype, max_pixels, top_k, threads,
        compile_encoder, decode_workers, vocab_cache, no_vocab_cache, quiet, profile=False, crop="center", resume=False, shard=0,
        num_shards=1, engine="local", ray_address=None, actors=None, output_format="auto", rows_per_file=10_000,
        rle_masks=False):
    """Tag images: with their captions (--captions) or against a vocabulary (--vocabulary IMAGES...).

    Each output line holds the candidate tags with their pixel-tag scores and the selected tags,
    or an "error" that names the problem (unreadable image, empty caption, ...); one bad item
    never stops the others.

    \b
    Inputs are streamed (no index in memory): --captions takes a JSONL/CSV file or webdataset
    shards ('shards/{000..099}.tar': caption from each sample's txt or json); IMAGES may be
    files, folders or quoted globs ('photos/**/*.jpg').
    Long jobs: --resume after any interruption; --shard/--num-shards for job arrays;
    --engine ray for a Ray cluster.
    """
    import warnings

    from ttd.data.inputs import InputError, read_vocabulary
    from ttd.jobs.jsonl_output import output_format_of
    from ttd.jobs.runner import JobOptions
    from ttd.jobs.stream_job import CentreStep, tag_job_description
    from ttd.runtime import PortabilityNotice, load_tagger

    check_inputs(captions, images, "--vocabulary FILE", vocabulary)
    try:
        parquet = output_format_of(output, output_format) == "parquet"
    except ValueError as error:
        fail(str(error))
    if vocabulary is None and given_options("top_k"):
        fail("--top-k lists a vocabulary's best tags; with --captions every candidate is in the record: leave it out")
    if not parquet and given_options("rows_per_file"):
        fail("--rows-per-file sizes Parquet shard files; this output is JSON lines (use --format parquet)")
    cache_options = given_options("vocab_cache", "no_vocab_cache")
    if cache_options and (vocabulary is None or engine == "ray"):
        fail(f"{', '.join(cache_options)} apply to --vocabulary with --engine local (Ray actors encode the "
             "vocabulary themselves); leave them out")
    if compile_encoder and backend not in ("torch", "auto"):
        fail(f"--compile compiles the torch backend's encoder; --backend {backend} runs its own graphs: leave it out")
    if crop == "whole":
        if vocabulary is not None:
            fail("--crop whole tags with --captions; for a vocabulary over whole images use "
                 "`ttd segment --classes FILE IMAGES...`")
        if rle_masks or parquet:
            fail("--crop whole writes JSON lines with the masks as RLE already (\"segments\"); "
                 "--rle-masks and Parquet output are for --crop center")
    tagger_options = dict(backend=backend, model=model, pretrained=pretrained, checkpoint=checkpoint,
                          dense_mode=dense_mode, device=device, dtype=dtype, export_dir=export_dir, url=url,
                          threshold=threshold, flip_tta=flip_tta, score_method=score_method, threads=threads,
                          **({"compile": True} if compile_encoder else {}))
    vocab = None
    batch_size = resolve_batch_size(batch_size, device, crop, 32 if crop == "center" else 8)

    def local_tagger():
        nonlocal tagger_options
        if "auto" in (backend, dtype):
            from ttd.runtime.auto_choice import resolve_auto

            path = resolve_auto(backend, dtype, device, export_dir)
            click.echo(path.line(), err=True)
            tagger_options = {**tagger_options, "backend": path.backend, "device": path.device,
                              "dtype": path.dtype if path.backend == "torch" else "fp32"}
        with warnings.catch_warnings(record=True) as notices:  # the CPU re-check's one line, shown plainly
            warnings.simplefilter("always", PortabilityNotice)
            tagger = load_tagger(**tagger_options)
        for notice in notices:
            if issubclass(notice.category, PortabilityNotice):
                click.echo(str(notice.message), err=True)
            else:
                warnings.showwarning(notice.message, notice.category, notice.filename, notice.lineno)
        return tagger

    try:
        vocab = read_vocabulary(vocabulary) if vocabulary else None
        if crop == "whole":
            from ttd.jobs.segment_job import WholeImageStep
            from ttd.segment.segmentation import SegmentOptions

            step = WholeImageStep(None, SegmentOptions(batch_size=batch_size), masks_dir, max_pixels)
        else:
            step = CentreStep(vocab, masks_dir, top_k, rle_masks, max_pixels)
        if vocab and not no_vocab_cache and engine == "local":
            loaded = local_tagger()
            step = with_cached_vocabulary(step, loaded, export_dir, vocab_cache, quiet)
            local = lambda: loaded  # noqa: E731 - the Tagger is loaded once
        else:
            local = local_tagger
        summary = run_on_engine(
            engine, step, captions, images, output,
            tag_job_description(captions, images, backend, model, pretrained, checkpoint, export_dir, dense_mode, dtype,
                                threshold, score_method, flip_tta),
            JobOptions(batch_size, decode_workers, resume=resume, shard=shard, num_shards=num_shards,
                       output_format=output_format, rows_per_file=rows_per_file, progress=not quiet),
            tagger_options, local, ray_address, actors,
            inputs=[p for p in (captions, vocabulary) if p is not None], explicit_images=images)
    except (InputError, ValueError, RuntimeError, OSError) as error:  # OSError: e.g. an unreachable --url;
        fail(error)                                                     # RuntimeError: pyarrow / pycocotools missing
    click.echo(summary.line(), err=True)
    if profile:
        click.echo(summary.profile(), err=True)


def with_cached_vocabulary(step, tagger, export_dir, vocab_cache, quiet: bool):
    """The centre step with its vocabulary's embeddings from the cache (encoded and stored on a miss)."""
    import dataclasses

    from ttd.runtime.vocab_cache import load_or_encode, model_key_for

    key = model_key_for(tagger, export_dir)
    if not key:
        return step
    cached = load_or_encode(tagger, step.vocabulary, key, vocab_cache, progress=not quiet)
    click.echo(f"vocabulary cache {'hit' if cached.hit else 'miss (stored)'}: {cached.path}", err=True)
    return dataclasses.replace(step, vocabulary_embeds=cached.embeds)
