"""`ttd`: tag images, train, evaluate, export and serve TTD models. Thin: parses options and calls
the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ttd.model.config import (
    CALIBRATION_COUNT,
    CALIBRATION_SEED,
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_MIN_PRECISION,
    DEFAULT_SCORE_METHOD,
    DEFAULT_THRESHOLD,
    DENSE_MODES,
    INT8_MODES,
    OBJECTIVES,
    PRECISION_ALIASES,
    PRECISIONS,
    SCORE_METHODS,
    canonical_precision,
)
from ttd.model.contract import INSTANCE_KINDS, TRITON_ENGINES
from ttd.runtime import BACKENDS


def model_options(f):
    """--model / --pretrained / --checkpoint / --dense-mode, shared by every command that loads a model."""
    f = click.option("--dense-mode", type=click.Choice(DENSE_MODES), default=None,
                     help="Dense patch features: avg (average-pooled towers), maskclip, clearclip "
                          "(default: the checkpoint's, else clearclip for CLS-pooled towers).")(f)
    f = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="A TTD checkpoint (.safetensors with its .json beside it).")(f)
    f = click.option("--pretrained", default=None,
                     help="open_clip pretrained tag (needs the hub) or a local open_clip weights file.")(f)
    f = click.option("--model", default=None,
                     help="open_clip architecture (e.g. ViT-B-16) or a registered config (world-tiny). "
                          "Without --model or --checkpoint, the embedded default world model is used.")(f)
    return f


class Precision(click.ParamType):
    """One of `choices` (ttd.model.config.PRECISIONS names, plus "auto" where offered); the torch names
    float32, bfloat16 and float16 are accepted for the short ones."""

    name = "precision"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.choices) + "]"

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        try:
            return canonical_precision(value, tuple(c for c in self.choices if c != "auto"))
        except ValueError:
            self.fail(f"{value!r} is not one of {', '.join(self.choices)} "
                      f"(or {', '.join(a for a, c in PRECISION_ALIASES.items() if c in self.choices)})", param, ctx)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ttd-toolkit")
def main() -> None:
    """TTD: find and fix the single tag bias of CLIP (Text-Tag Self-Distillation, ECCV 2024).

    \b
    Tag images with their captions:   ttd tag --captions captions.jsonl -o tags.jsonl
    Fine-tune a model with TTD:       ttd train --objective ttd --out runs/ttd
    Evaluate (tags and masks):        ttd eval --checkpoint runs/ttd/model.safetensors
    Export to ONNX (+ TensorRT):      ttd export --checkpoint ... out/export
    """


def _long_job_options(command):
    """--resume, --shard and --num-shards: the same meaning in `ttd tag` and `ttd segment`."""
    for option in reversed([
        click.option("--resume", is_flag=True,
                     help="Continue OUTPUT.partial of an interrupted run (even one killed with SIGKILL): every item "
                          "ends up in OUTPUT exactly once. Refused if the job's inputs or settings changed."),
        click.option("--shard", type=click.IntRange(0), default=0, show_default=True,
                     help="Tag only the items at positions p with p mod NUM_SHARDS = SHARD (e.g. $SLURM_ARRAY_TASK_ID)."),
        click.option("--num-shards", type=click.IntRange(1), default=1, show_default=True,
                     help="Number of --shard jobs; their outputs concatenate into the whole job's output "
                          "(each record has its input position in \"index\")."),
    ]):
        command = option(command)
    return command


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
              help="Also write a PNG mask per selected tag under this folder.")
@click.option("--rle-masks", is_flag=True,
              help="Also put each selected tag's mask in its record, as COCO RLE (\"rle_masks\": tag -> "
                   "{size, counts}; pycocotools): the --masks-dir PNG (the centre crop at the model's input size) "
                   "thresholded at the default mask threshold. Needs pip install 'ttd-toolkit[segment]'.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
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
@click.option("--decode-workers", type=click.IntRange(0), default=None,
              help="Processes that decode the next batches while the model runs the current one "
                   "(0: one decoding thread in this process). Default: cores − 1 (at most 8), or 0 below 4 cores.")
@click.option("--vocab-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of cached vocabulary tag embeddings, keyed by model/export and vocabulary "
                   "(default: $TTD_CACHE_DIR/vocab or ~/.cache/ttd/vocab).")
@click.option("--no-vocab-cache", is_flag=True, help="Encode the vocabulary afresh and cache nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--crop", type=click.Choice(["center", "whole"]), default="center", show_default=True,
              help="center: the model sees the centre crop (fast). whole: sliding windows cover the whole image, "
                   "so tags outside the crop are found too, and each line also holds the caption's and the "
                   "selected tags' masks in the image's own geometry (as `ttd segment --captions`).")
@_long_job_options
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process (+ decoding workers); ray: Ray Data with a pool of Tagger actors "
                   "(local Ray, or the cluster at --ray-address); the same records, --resume and --shard.")
@click.option("--ray-address", default=None, help="Ray cluster address for --engine ray (default: a local Ray).")
@click.option("--actors", type=click.IntRange(1), default=None,
              help="--engine ray: Tagger actors (default: one per GPU, else CPUs / 2).")
def tag(captions, vocabulary, images, output, model, pretrained, checkpoint, dense_mode, backend, export_dir, url,
        threshold, score_method, flip_tta, masks_dir, batch_size, device, dtype, max_pixels, top_k, threads,
        compile_encoder, decode_workers, vocab_cache, no_vocab_cache, quiet, crop="center", resume=False, shard=0,
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
    from ttd.runtime import PortabilityNotice, load_tagger

    if (captions is None) == (vocabulary is None):
        fail("give exactly one of --captions FILE or --vocabulary FILE")
    if vocabulary is not None and not images:
        fail("--vocabulary needs image files or folders as arguments")
    if captions is not None and images:
        fail("with --captions, images come from the captions file; do not also pass image arguments")
    from ttd.data.items import open_items
    from ttd.jobs.jsonl_output import output_format_of

    try:
        items = open_items(captions, images)
        vocab = read_vocabulary(vocabulary) if vocabulary else None
        if engine == "ray":
            if crop == "whole":
                fail("--engine ray runs the centre crop only; run --crop whole with --engine local "
                     "(--shard/--num-shards split it over machines)")
            if "auto" in (backend, dtype):
                fail("--engine ray needs an explicit --backend and --dtype: auto would choose for this machine, "
                     "not for the Ray workers")
            from ttd.jobs.ray_executor import RayJob, run_ray_job
            from ttd.jobs.stream_job import tag_job_description

            summary = run_ray_job(RayJob(
                captions=None if captions is None else str(captions), images=[str(i) for i in images],
                output=output, vocabulary=vocab, batch_size=batch_size, max_pixels=max_pixels, top_k=top_k,
                tagger_options=dict(backend=backend, model=model, pretrained=pretrained, checkpoint=checkpoint,
                                    dense_mode=dense_mode, device=device, dtype=dtype, export_dir=export_dir,
                                    url=url, threshold=threshold, flip_tta=flip_tta, score_method=score_method,
                                    threads=threads),
                actors=actors, address=ray_address, shard=shard, num_shards=num_shards, progress=not quiet,
                masks_dir=None if masks_dir is None else str(masks_dir), resume=resume, rle_masks=rle_masks,
                output_format=output_format, rows_per_file=rows_per_file),
                tag_job_description(captions, images, backend, model, pretrained, checkpoint, export_dir,
                                    dense_mode, dtype, threshold, score_method, flip_tta))
            click.echo(summary.line(), err=True)
            return
        if "auto" in (backend, dtype):
            from ttd.runtime.auto_choice import resolve_auto

            path = resolve_auto(backend, dtype, device, export_dir)
            click.echo(path.line(), err=True)
            backend, dtype, device = path.backend, path.dtype if path.backend == "torch" else "fp32", path.device
        with warnings.catch_warnings(record=True) as notices:  # the CPU re-check's one line, shown plainly
            warnings.simplefilter("always", PortabilityNotice)
            tagger = load_tagger(backend, model=model, pretrained=pretrained, checkpoint=checkpoint,
                                 dense_mode=dense_mode, device=device, dtype=dtype, export_dir=export_dir, url=url,
                                 threshold=threshold, flip_tta=flip_tta, score_method=score_method, threads=threads,
                                 compile=compile_encoder)
        for notice in notices:
            if issubclass(notice.category, PortabilityNotice):
                click.echo(str(notice.message), err=True)
            else:
                warnings.showwarning(notice.message, notice.category, notice.filename, notice.lineno)
    except (InputError, ValueError, RuntimeError, OSError) as error:  # OSError: e.g. an unreachable --url
        fail(str(error))
    if crop == "whole":  # whole-image caption tagging is `ttd segment --captions` (ttd/jobs/segment_job.py)
        if vocab is not None:
            fail("--crop whole tags with --captions; for a vocabulary over whole images use "
                 "`ttd segment --classes FILE IMAGES...`")
        if rle_masks or output_format_of(output, output_format) == "parquet":
            fail("--crop whole writes JSON lines with the masks as RLE already (\"segments\"); "
                 "--rle-masks and Parquet output are for --crop center")
        from ttd.segment.segmentation import SegmentOptions
        from ttd.jobs.segment_job import segment_items

        from ttd.jobs.stream_job import tag_job_description

        try:
            summary = segment_items(tagger, items, output, None, SegmentOptions(), None, masks_dir, max_pixels,
                                    progress=not quiet, inputs=[captions], resume=resume, shard=shard,
                                    num_shards=num_shards,
                                    job=tag_job_description(captions, images, backend, model, pretrained, checkpoint,
                                                            export_dir, dense_mode, dtype, threshold, score_method,
                                                            flip_tta))
        except (ValueError, RuntimeError, OSError) as error:
            fail(str(error))
        click.echo(summary.line(), err=True)
        return
    vocab_embeds = None
    if vocab and not no_vocab_cache:
        from ttd.runtime.vocab_cache import load_or_encode, model_key_for

        key = model_key_for(tagger, export_dir)
        if key:
            cached = load_or_encode(tagger, vocab, key, vocab_cache, progress=not quiet)
            vocab_embeds = cached.embeds
            click.echo(f"vocabulary cache {'hit' if cached.hit else 'miss (stored)'}: {cached.path}", err=True)
    from ttd.jobs.stream_job import tag_job_description, tag_stream

    try:
        summary = tag_stream(tagger, items, output, vocab, batch_size, masks_dir, max_pixels, top_k,
                             progress=not quiet, decode_workers=decode_workers, vocabulary_embeds=vocab_embeds,
                             resume=resume, shard=shard, num_shards=num_shards,
                             inputs=[p for p in (captions, vocabulary) if p is not None], explicit_images=images,
                             rle_masks=rle_masks, output_format=output_format, rows_per_file=rows_per_file,
                             job=tag_job_description(captions, images, backend, model, pretrained, checkpoint,
                                                     export_dir, dense_mode, dtype, threshold, score_method, flip_tta))
    except (InputError, ValueError, RuntimeError) as error:  # RuntimeError: pyarrow / pycocotools missing
        fail(str(error))
    click.echo(summary.line(), err=True)


@main.group()
def world() -> None:
    """The synthetic world: seeded image-caption pairs with exact tag and mask ground truth."""


@world.command("generate")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(1), default=500, show_default=True)
@click.option("--seed", type=int, default=2, show_default=True, help="World seed (training uses 1; the held-out split 2).")
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, help="Index of the first sample.")
def world_generate(out_dir, count, seed, start):
    """Write COUNT world samples in the evaluation format (annotations.jsonl, images/, masks/)."""
    from ttd.data.annotations import write_world_split

    try:
        path = write_world_split(out_dir, seed, count, start)
    except ValueError as error:
        fail(str(error))
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


@main.command()
@model_options
@click.option("--objective", type=click.Choice(OBJECTIVES), default="ttd", show_default=True,
              help="ttd: LoRA fine-tuning with text-tag self-distillation; clip: contrastive pre-training of all weights.")
@click.option("--data", default="world", show_default=True,
              help="'world', a captions .jsonl (image + caption per line), or webdataset shards ('shards/{000..009}.tar').")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/ttd", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="Default: 300 (ttd) or 1500 (clip).")
@click.option("--batch-size", type=click.IntRange(2), default=None, help="Per process. Default: 64 (ttd) or 128 (clip).")
@click.option("--lr", type=float, default=None, help="Peak learning rate. Default: 1e-3.")
@click.option("--warmup", "warmup_steps", type=click.IntRange(0), default=None)
@click.option("--lambda-tag", type=float, default=2.0, show_default=True, help="Weight of L_tag (2 won the ablation).")
@click.option("--lambda-clip", type=float, default=1.0, show_default=True)
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True, help="δ of the Stage 1 selection.")
@click.option("--stage1-score", "score_method", type=click.Choice(SCORE_METHODS), default="minmax",
              show_default=True, help="Stage-1 selection score: minmax (measured best for caption masks: IoU "
                                      "+6.4 over the base, 3 seeds), softmax (the paper's: +2.5) or negatives "
                                      "(the tagging default; unstable as an online selector). See README.")
@click.option("--lora-rank", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-targets", default="attn,mlp", show_default=True, help="Comma list of attn, mlp.")
@click.option("--frozen-teacher", is_flag=True, help="Select tags and build targets with the frozen base model.")
@click.option("--precision", type=Precision(("fp32", "bf16")), default="fp32", show_default=True,
              help="bf16: autocast of the forward passes (weights and optimiser stay fp32).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-seed", type=int, default=1, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=100, show_default=True)
@click.option("--no-resume", is_flag=True, help="Start over even if OUT/last.pt exists.")
@click.option("--device", default="auto", show_default=True,
              help="auto (cuda if available; under torchrun cuda:LOCAL_RANK), cpu, cuda, cuda:1 ...")
def train(model, pretrained, checkpoint, dense_mode, objective, data, out_dir, steps, batch_size, lr, warmup_steps,
          lambda_tag, lambda_clip, threshold, score_method, lora_rank, lora_alpha, lora_targets, frozen_teacher,
          precision, seed, data_seed, checkpoint_every, no_resume, device):
    """Pre-train (clip) or TTD-fine-tune (ttd) a model; resumes from OUT/last.pt when present.

    Writes OUT/model.safetensors (+ .json; LoRA merged) and, for ttd, OUT/adapter.safetensors.
    Under torchrun every process trains on its own shard of each step's batch (gloo on CPU).
    """
    from ttd.model.factory import ModelLoadError, load_model
    from ttd.model.lora import LoRAConfig
    from ttd.train.loop import TrainConfig, init_distributed, training_device
    from ttd.train.loop import train as run_training

    try:
        init_distributed(device)
        base = load_model(model, pretrained, checkpoint, dense_mode).to(training_device(device))
    except (ModelLoadError, ValueError) as error:
        fail(str(error))
    config = TrainConfig.for_objective(
        objective, data=data, out_dir=out_dir, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        lambda_tag=lambda_tag, lambda_clip=lambda_clip, threshold=threshold,
        score_method=score_method, frozen_teacher=frozen_teacher, precision=precision, seed=seed, data_seed=data_seed,
        checkpoint_every=checkpoint_every,
        lora=LoRAConfig(rank=lora_rank, alpha=lora_alpha, targets=tuple(t for t in lora_targets.split(",") if t)),
    )
    try:
        run_training(base, config, resume=not no_resume)
    except (ValueError, RuntimeError) as error:
        fail(str(error))
    click.echo(f"wrote {Path(out_dir) / 'model.safetensors'}", err=True)


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
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="A labelled evaluation folder (annotations.jsonl with relevant_tags). Default: the world's "
                   "calibration split (seed 7: never trained or evaluated on).")
@click.option("--count", type=click.IntRange(1), default=CALIBRATION_COUNT, show_default=True,
              help="World samples when --data is not given.")
@click.option("--seed", type=int, default=CALIBRATION_SEED, show_default=True, help="World seed when --data is not given.")
@click.option("--min-precision", type=click.FloatRange(0, 1), default=DEFAULT_MIN_PRECISION, show_default=True,
              help="The margin of best F1 among those with at least this precision.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=DEFAULT_THRESHOLD,
              show_default=True, help="δ the margin is fitted for (the one you tag with).")
@click.option("--flip-tta", is_flag=True, help="Fit for tagging with flip TTA.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--dry-run", is_flag=True, help="Report the fitted margin without writing it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the fit here as JSON.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
def calibrate(model, pretrained, checkpoint, dense_mode, data_dir, count, seed, min_precision, threshold, flip_tta,
              batch_size, dry_run, json_path, device):
    """Fit the default score's margin (negative_margin) to a model on labelled pairs, and write it
    into the checkpoint's config.

    \b
    The `negatives` score selects a tag when it beats the negative prompts by the margin; the
    margin belongs to the model: a TTD fine-tuned model needs a larger one than its base, or it
    selects absent tags. `ttd train` calibrates on the world by itself; after training on your
    own data, calibrate on a labelled folder and export again:
        ttd calibrate --checkpoint runs/ttd/model.safetensors --data labelled/
    """
    from ttd.evaluation.calibrate import calibrate_checkpoint, fit_negative_margin
    from ttd.data.annotations import labelled_samples
    from ttd.model.factory import ModelLoadError
    from ttd.runtime import load_tagger

    if checkpoint is None and not dry_run:
        fail("calibration writes into a checkpoint's config: pass --checkpoint FILE (or --dry-run to only report)")
    try:
        tagger = load_tagger("torch", model=model, pretrained=pretrained, checkpoint=checkpoint, dense_mode=dense_mode,
                             device=device, threshold=threshold, flip_tta=flip_tta, score_method="negatives")
        skipped: list[str] = []
        samples = labelled_samples(data_dir, tagger.preprocess, seed, count, skipped)
        for reason in skipped:
            click.echo(f"skipped {reason}", err=True)
        fit = fit_negative_margin(tagger, samples, min_precision, batch_size)
        click.echo(fit.line())
        if json_path:
            json_path.write_text(json.dumps(fit.as_dict(), indent=1))
        if not dry_run:
            old = calibrate_checkpoint(Path(checkpoint), fit)
            click.echo(f"wrote negative_margin {old:g} -> {fit.margin:.4g} into {Path(checkpoint).with_suffix('.json')}; "
                       "export again if this checkpoint was exported", err=True)
    except (ModelLoadError, ValueError, OSError) as error:
        fail(str(error))


@main.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@model_options
@click.option("--precision", type=Precision(PRECISIONS), default="fp32", show_default=True,
              help="Encoder precision. Variants must pass a quality gate against fp32 (cosine ≥ 0.99, "
                   "selected-tag agreement ≥ 95%) or the export is refused.")
@click.option("--int8-mode", type=click.Choice(INT8_MODES), default="dynamic", show_default=True,
              help="int8: dynamic weight quantisation, or static QDQ calibrated on world images and captions.")
@click.option("--opset", type=click.IntRange(17), default=18, show_default=True)
@click.option("--tensorrt", is_flag=True,
              help="Also build TensorRT engines (needs an NVIDIA GPU and TensorRT 10 or newer; fp32, fp16 or bf16 — "
                   "TensorRT cannot parse the int8 graphs).")
@click.option("--opt-batch", type=click.IntRange(1), default=8, show_default=True, help="TensorRT profile: preferred batch.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True, help="TensorRT profile: max batch.")
@click.option("--max-tags", type=click.IntRange(1), default=1024, show_default=True,
              help="TensorRT profile: most tags in one tag-head call (the Triton tagger's --max-tags must not exceed "
                   "it; `ttd tag` runs larger vocabularies' tag head in torch).")
@click.option("--torch-weights/--no-torch-weights", default=True, show_default=True,
              help="Also write the fp32 weights (model.safetensors) for `--backend torch --export-dir` and the "
                   "Triton torch engine (GPU serving without TensorRT).")
def export_command(out_dir, model, pretrained, checkpoint, dense_mode, precision, int8_mode, opset, tensorrt,
                   opt_batch, max_batch, max_tags, torch_weights):
    """Export ONNX graphs (image encoder, text encoder, tag head) + manifest to OUT_DIR.

    Every export is checked against PyTorch in onnxruntime at batch sizes 1, 3 and 7 and on
    world image-caption pairs; the figures go into manifest.json, and an export that misses its
    gate fails with the figures.
    """
    from export.checks import GateError
    from export.pipeline import run_export
    from export.tensorrt import BatchLimits, TensorRTUnavailable
    from ttd.model.factory import ModelLoadError, load_model

    try:
        ttd_model = load_model(model, pretrained, checkpoint, dense_mode)
        manifest = run_export(ttd_model, out_dir, precision, int8_mode, opset, tensorrt=tensorrt,
                              tensorrt_limits=BatchLimits(opt_batch=opt_batch, max_batch=max_batch, max_tags=max_tags),
                              torch_weights=torch_weights)
    except (ModelLoadError, GateError, TensorRTUnavailable, ValueError) as error:
        fail(str(error))
    figures = manifest.get("quality", manifest["parity"])
    click.echo(f"exported {precision} graphs to {out_dir}: min cosine "
               f"{min(figures['min_cosine'][k] for k in ('image_embeds', 'patch_embeds', 'text_embeds')):.6f}, "
               f"selected-tag agreement {figures['tag_agreement']:.1%}", err=True)


@main.command("bench")
@model_options
@click.option("--batch-sizes", default="1,8", show_default=True, help="Image batch sizes, comma separated.")
@click.option("--text-batch", type=click.IntRange(1), default=64, show_default=True)
@click.option("--tags", type=click.IntRange(1), default=1000, show_default=True,
              help="K for the tag-head and vocabulary-tagging timings.")
@click.option("--min-seconds", type=float, default=1.0, show_default=True, help="Per timing: repeat calls this long.")
@click.option("--check-count", type=click.IntRange(4), default=32, show_default=True,
              help="World image-caption pairs of each quality gate.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="CPU threads (0: all cores).")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust on a shared machine).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the rows, CPU, versions and settings as JSON here.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as Markdown here.")
def bench_command(model, pretrained, checkpoint, dense_mode, batch_sizes, text_batch, tags, min_seconds, check_count,
                  threads, clock, json_path, markdown_path):
    """Measure every backend x precision x batch size this machine can run: images/s, texts/s,
    tag-head cost, vocabulary tagging cost, each with its quality against torch fp32.

    Exports are made on the spot in a temporary folder, each through its quality gate (a refused
    one is listed with why). Takes minutes for the world model, longer for ViT-B/16.
    """
    from export.bench import BenchSettings, run_bench, to_markdown
    from ttd.model.factory import ModelLoadError, load_model

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        fail(f"--batch-sizes {batch_sizes!r}: give positive integers separated by commas, e.g. 1,8")
    settings = BenchSettings(sizes, text_batch, tags, min_seconds, check_count, threads, clock=clock)
    try:
        load_model(model, pretrained, checkpoint, dense_mode)
    except (ModelLoadError, ValueError) as error:
        fail(str(error))
    result = run_bench(lambda: load_model(model, pretrained, checkpoint, dense_mode), settings,
                       progress=lambda line: click.echo(line, err=True))
    table = to_markdown(result)
    click.echo(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(table)


@main.group()
def triton() -> None:
    """Triton model repositories: build one from an export, validate it."""


def _batching_options(f):
    f = click.option("--kind", type=click.Choice(INSTANCE_KINDS), default=None,
                     help="instance_group kind of the graph models [default: KIND_GPU for TensorRT engines, "
                          "which run only on GPUs; KIND_CPU otherwise].")(f)
    f = click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="instance_group count.")(f)
    f = click.option("--queue-delay-us", type=click.IntRange(0), default=2000, show_default=True,
                     help="Dynamic batching: max queue delay.")(f)
    f = click.option("--preferred-batch-sizes", default="8,16", show_default=True, help="Comma list.")(f)
    f = click.option("--max-batch-size", type=click.IntRange(1), default=32, show_default=True,
                     help="max_batch_size of every model (kept consistent across them).")(f)
    return f


@triton.command("build")
@click.argument("export_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--flavour", type=click.Choice(tuple(TRITON_ENGINES)), default="python", show_default=True,
              help="python: Python-backend models (any tritonserver, e.g. nvidia-pytriton's); "
                   "native: onnxruntime_onnx / tensorrt_plan platforms (NVIDIA's container).")
@click.option("--engine", type=click.Choice(sorted({e for engines in TRITON_ENGINES.values() for e in engines})),
              default="onnx", show_default=True,
              help="What the graph models run. python flavour: onnx (onnxruntime, CPU) or torch (the export's "
                   "weights; GPU with --kind KIND_GPU); native flavour: onnx or tensorrt (the export's engines).")
@click.option("--torch-dtype", type=Precision(("fp32", "bf16", "fp16")), default="fp32",
              show_default=True, help="Torch engine: weight precision of the encoders (the tag head stays float32).")
@_batching_options
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True, help="δ used by ttd_tagger.")
@click.option("--max-tags", type=click.IntRange(1), default=1024, show_default=True, help="ttd_tagger: tags per request.")
@click.option("--score", "score_method", type=click.Choice(SCORE_METHODS), default=DEFAULT_SCORE_METHOD,
              show_default=True, help="Pixel-tag score served by ttd_tagger (see `ttd tag --help`).")
def triton_build(export_dir, repo, flavour, engine, torch_dtype, max_batch_size, preferred_batch_sizes, queue_delay_us,
                 instances, kind, threshold, max_tags, score_method):
    """Write a Triton model repository REPO for the export EXPORT_DIR, then validate it."""
    from export.triton import BatchingOptions, RepositoryError, build_repository, validate_repository
    from ttd.runtime.export_dir import ExportError

    try:
        sizes = tuple(int(s) for s in preferred_batch_sizes.split(",") if s.strip())
        options = BatchingOptions(max_batch_size, sizes, queue_delay_us, instances, kind)
        build_repository(export_dir, repo, flavour, engine, options, threshold, max_tags, torch_dtype,
                         score_method=score_method)
        summary = validate_repository(repo)
    except (ValueError, ExportError, RepositoryError) as error:
        fail(str(error))
    click.echo("\n".join(summary))
    click.echo(f"wrote {repo}; serve it with `ttd serve {repo}`", err=True)


@triton.command("validate")
@click.argument("repo", type=click.Path(file_okay=False, exists=True, path_type=Path))
def triton_validate(repo):
    """Parse every config.pbtxt with tritonclient's model_config_pb2 and check it against its files and graphs."""
    from export.triton import RepositoryError, validate_repository

    try:
        summary = validate_repository(repo)
    except RepositoryError as error:
        fail(str(error))
    click.echo("\n".join(summary))
    click.echo(f"{repo}: valid", err=True)


@main.command()
@click.argument("repo", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None,
              help="Also serve gRPC on this port, on 127.0.0.1 only (gRPC has no front). Off by default.")
@click.option("--timeout", "timeout_s", type=float, default=120, show_default=True, help="Seconds to wait for readiness.")
@click.option("--max-restarts", type=click.IntRange(0), default=5, show_default=True,
              help="Restart tritonserver when it dies, at most this many times in 10 minutes.")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=64, show_default=True,
              help="Largest HTTP request body the front accepts (MiB); larger ones get 413 before they are read.")
def serve(repo, host, http_port, grpc_port, timeout_s, max_restarts, max_body_mb):
    """Serve a model repository with the tritonserver bundled by nvidia-pytriton, behind an HTTP
    front on --host:--http-port that refuses malformed requests (4xx with a JSON reason) and
    retries a request once when tritonserver dies under it; tritonserver itself listens on a
    loopback port. Ctrl-C or SIGTERM stops it; a crashed tritonserver is restarted."""
    from ttd.serve.http_front import FrontError, FrontLimits
    from ttd.serve.service import serve_repository
    from ttd.serve.triton_server import ServerError

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {host} exposes the server to the network, without authentication", err=True)
    try:
        code = serve_repository(repo, host, http_port, grpc_port, timeout_s, max_restarts,
                                FrontLimits(max_body_bytes=int(max_body_mb * (1 << 20))),
                                lambda line: click.echo(line, err=True))
    except (ServerError, FrontError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        fail(f"{name} {text!r}: give positive numbers separated by commas, e.g. 1,1.5")
    return values


def _segment_options(f):
    """Options of whole-image inference and masks, shared by `ttd segment` and `ttd eval-segmentation`."""
    f = click.option("--pamr", is_flag=True, help="Refine class maps with PAMR (pixel-adaptive mask refinement).")(f)
    f = click.option("--templates", "templates_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     default=None, help="Prompt templates for the tags/classes, one a line with {} for the name "
                                        "(their embeddings are averaged); default: the model's.")(f)
    f = click.option("--mask-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
                     show_default=True, help="θ: a pixel is in a mask when M ≥ θ; below θ for every class it "
                                             "is background.")(f)
    f = click.option("--flip-tta", is_flag=True, help="Average every window's maps with its mirror image's.")(f)
    f = click.option("--stride", type=click.IntRange(1), default=None,
                     help="Sliding-window stride in pixels of the resized image [default: 2/3 of the model's input].")(f)
    f = click.option("--scales", default="1", show_default=True,
                     help="Comma list: the image is resized to shorter side scale × the model's input and "
                          "windows slide over it; the scales' maps are averaged (e.g. 1,1.5,2 for large images).")(f)
    f = click.option("--crop", type=click.Choice(["whole", "center"]), default="whole", show_default=True,
                     help="whole: sliding windows cover the whole image; center: one centre crop (fast, "
                          "as `ttd tag`; pixels outside it are background).")(f)
    return f


def _make_segment_options(crop, scales, stride, mask_threshold, pamr):
    from ttd.segment.segmentation import SegmentOptions

    return SegmentOptions(crop=crop, scales=_floats(scales, "--scales"), stride=stride, mask_threshold=mask_threshold,
                          pamr=pamr)


def _read_classes(classes: str) -> list[str]:
    """--classes: a file (one name a line) or a comma list."""
    from ttd.data.inputs import read_vocabulary

    path = Path(classes)
    names = read_vocabulary(path) if path.is_file() else [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        fail(f"--classes {classes!r}: no class names (give a comma list or a file with one name a line)")
    return names


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
@_segment_options
@_long_job_options
@click.option("--device", default="auto", show_default=True)
@click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def segment(captions, classes, images, output, coco, masks_dir, model, pretrained, checkpoint, dense_mode, backend,
            export_dir, url, threshold, score_method, crop, scales, stride, flip_tta, mask_threshold, templates_path,
            pamr, device, max_pixels, quiet, resume, shard, num_shards):
    """Masks in each image's own geometry: caption masks (--captions) or open-vocabulary semantic
    segmentation (--classes NAMES IMAGES...).

    \b
    ttd segment --captions captions.jsonl -o masks.jsonl --coco masks.json
    ttd segment --classes cat,dog,grass photos/ -o seg.jsonl --masks-dir seg/ --flip-tta --pamr
    ttd report masks.jsonl --html report.html
    """
    from ttd.data.inputs import InputError
    from ttd.data.items import open_items
    from ttd.runtime import load_tagger
    from ttd.segment.segmentation import read_templates, with_templates
    from ttd.jobs.segment_job import segment_items
    from ttd.jobs.stream_job import tag_job_description

    if (captions is None) == (classes is None):
        fail("give exactly one of --captions FILE or --classes NAMES")
    if classes is not None and not images:
        fail("--classes needs image files or folders as arguments")
    if captions is not None and images:
        fail("with --captions, images come from the captions file; do not also pass image arguments")
    options = _make_segment_options(crop, scales, stride, mask_threshold, pamr)
    try:
        items = open_items(captions, images)
        names = _read_classes(classes) if classes is not None else None
        tagger = load_tagger(backend, model=model, pretrained=pretrained, checkpoint=checkpoint, dense_mode=dense_mode,
                             device=device, export_dir=export_dir, url=url, threshold=threshold, flip_tta=flip_tta,
                             score_method=score_method)
        if templates_path is not None:
            tagger = with_templates(tagger, read_templates(templates_path.read_text(encoding="utf-8")))
        job = tag_job_description(captions, images, backend, model, pretrained, checkpoint, export_dir, dense_mode,
                                  "fp32", threshold, score_method, flip_tta)
        summary = segment_items(tagger, items, output, names, options, coco, masks_dir, max_pixels,
                                progress=not quiet, inputs=[p for p in (captions,) if p is not None], resume=resume,
                                shard=shard, num_shards=num_shards, job={**job, "templates": str(templates_path)})
    except (InputError, ValueError, RuntimeError, OSError) as error:
        fail(str(error))
    click.echo(summary.line() + (f"; COCO annotations in {coco}" if coco else ""), err=True)


@main.command()
@click.argument("records", type=click.Path(exists=True, path_type=Path))
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The report's first page; further pages go beside it (NAME-2.html, ...).")
@click.option("--per-page", type=click.IntRange(1), default=50, show_default=True, help="Items per page.")
@click.option("--max-side", type=click.IntRange(64), default=480, show_default=True,
              help="Images are embedded at most this many pixels on their longer side.")
@click.option("--images-root", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder that relative image paths in RECORDS start from (default: RECORDS' folder; "
                   "for `ttd tag --captions F` outputs, F's folder).")
def report(records, html_path, per_page, max_side, images_root):
    """A static, self-contained HTML report of a `ttd tag` or `ttd segment` output (RECORDS):
    each image with its coloured mask overlays and legend, the candidate tags with scores
    (selected or rejected), and the errors; paginated."""
    from ttd.jobs.report import write_report

    try:
        pages = write_report(records, html_path, per_page, max_side, images_root)
    except (ValueError, OSError, RuntimeError) as error:  # RuntimeError: a Parquet folder without pyarrow
        fail(str(error))
    click.echo(f"wrote {len(pages)} page(s): {pages[0]}", err=True)


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
@_segment_options
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

    options = _make_segment_options(crop, scales, stride, mask_threshold, pamr)
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


@world.command("segmentation")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(1), default=200, show_default=True)
@click.option("--seed", type=int, default=2, show_default=True)
@click.option("--size", type=click.IntRange(16), default=64, show_default=True, help="Image side in pixels.")
@click.option("--classes", "labelling", type=click.Choice(["shapes", "colours"]), default="shapes", show_default=True,
              help="Label objects by shape (8 classes) or colour (6); 0 is the background.")
def world_segmentation(out_dir, count, seed, size, labelling):
    """Write COUNT world samples as a VOC-style segmentation folder (exact masks)."""
    from ttd.data.voc import write_world_segmentation

    try:
        path = write_world_segmentation(out_dir, seed, count, size, labelling=labelling)
    except ValueError as error:
        fail(str(error))
    click.echo(f"wrote {count} samples to {path}", err=True)


if __name__ == "__main__":
    main()
