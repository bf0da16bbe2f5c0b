"""`ttd`: tag images, train, evaluate, export and serve TTD models. Thin: parses options and calls
the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ttd.config import DENSE_MODES, SCORE_METHODS


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


@main.command()
@click.option("--captions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL or CSV with an image path (relative to the file) and a caption per item, "
                   "or webdataset shards ('shards/{000..099}.tar').")
@click.option("--vocabulary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Tag every image against this list of tags (one per line) instead of captions.")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON lines written here, one per item, in input order.")
@model_options
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt", "triton"]), default="torch",
              show_default=True, help="auto: the fastest gated path for this hardware (onnxruntime with --export-dir, "
                                      "torch otherwise); prints what it picked and why.")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="Export directory (onnxruntime, tensorrt, triton; with torch: run the export's own weights).")
@click.option("--url", default=None, help="Triton server URL for --backend triton (host:port).")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="δ: a tag is selected when its score ≥ δ.")
@click.option("--score", "score_method", type=click.Choice(SCORE_METHODS), default="softmax", show_default=True,
              help="Pixel-tag score: softmax over tags at the best pixel (the method), minmax of the best-pixel "
                   "cosine, or sigmoid mask peak (suits large vocabularies, where a softmax over thousands of "
                   "tags is flat).")
@click.option("--flip-tta", is_flag=True, help="Average the maps of the image and its mirror image.")
@click.option("--masks-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a PNG mask per selected tag under this folder.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Torch backend weights; bfloat16 is ~5x faster on CPUs with AMX (and slower without). "
                   "auto: float16 on a GPU, bfloat16 with AMX, else float32.")
@click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True,
              help="Refuse larger images (decompression bombs).")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True, help="Vocabulary mode: best tags listed per image.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for the torch and onnxruntime backends (0: all cores).")
@click.option("--compile", "compile_encoder", is_flag=True,
              help="Torch backend: torch.compile the image encoder (CUDA graphs on a GPU); pays a one-off "
                   "compilation per power-of-two batch size, worth it for long jobs.")
@click.option("--decode-workers", type=click.IntRange(0), default=None,
              help="Processes that decode the next batch while the model runs the current one "
                   "(0: decode in the main process). Default: cores − 1 (at most 8), or 0 below 4 cores.")
@click.option("--vocab-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of cached vocabulary tag embeddings, keyed by model/export and vocabulary "
                   "(default: $TTD_CACHE_DIR/vocab or ~/.cache/ttd/vocab).")
@click.option("--no-vocab-cache", is_flag=True, help="Encode the vocabulary afresh and cache nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--resume", is_flag=True,
              help="Continue OUTPUT.partial of an interrupted run (even one killed with SIGKILL): every item "
                   "ends up in OUTPUT exactly once. Refused if the job's inputs or settings changed.")
@click.option("--shard", type=click.IntRange(0), default=0, show_default=True,
              help="Tag only the items at positions p with p mod NUM_SHARDS = SHARD (e.g. $SLURM_ARRAY_TASK_ID).")
@click.option("--num-shards", type=click.IntRange(1), default=1, show_default=True,
              help="Number of --shard jobs; their outputs concatenate into the whole job's output "
                   "(each record has its input position in \"index\").")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process (+ decoding workers); ray: Ray Data with a pool of Tagger actors "
                   "(local Ray, or the cluster at --ray-address); the same records, --resume and --shard.")
@click.option("--ray-address", default=None, help="Ray cluster address for --engine ray (default: a local Ray).")
@click.option("--actors", type=click.IntRange(1), default=None,
              help="--engine ray: Tagger actors (default: one per GPU, else CPUs / 2).")
def tag(captions, vocabulary, images, output, model, pretrained, checkpoint, dense_mode, backend, export_dir, url,
        threshold, score_method, flip_tta, masks_dir, batch_size, device, dtype, max_pixels, top_k, threads,
        compile_encoder, decode_workers, vocab_cache, no_vocab_cache, quiet, resume=False, shard=0, num_shards=1,
        engine="local", ray_address=None, actors=None):
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
    from ttd.inputs import InputError, read_vocabulary
    import warnings

    from ttd.runtime import PortabilityNotice, load_tagger

    if (captions is None) == (vocabulary is None):
        fail("give exactly one of --captions FILE or --vocabulary FILE")
    if vocabulary is not None and not images:
        fail("--vocabulary needs image files or folders as arguments")
    if captions is not None and images:
        fail("with --captions, images come from the captions file; do not also pass image arguments")
    from ttd.item_stream import open_items

    try:
        items = open_items(captions, images)
        vocab = read_vocabulary(vocabulary) if vocabulary else None
        if engine == "ray":
            if "auto" in (backend, dtype):
                fail("--engine ray needs an explicit --backend and --dtype: auto would choose for this machine, "
                     "not for the Ray workers")
            from ttd.ray_engine import RayJob, run_ray_job
            from ttd.stream_job import tag_job_description

            summary = run_ray_job(RayJob(
                captions=None if captions is None else str(captions), images=[str(i) for i in images],
                output=output, vocabulary=vocab, batch_size=batch_size, max_pixels=max_pixels, top_k=top_k,
                tagger_options=dict(backend=backend, model=model, pretrained=pretrained, checkpoint=checkpoint,
                                    dense_mode=dense_mode, device=device, dtype=dtype, export_dir=export_dir,
                                    url=url, threshold=threshold, flip_tta=flip_tta, score_method=score_method,
                                    threads=threads),
                actors=actors, address=ray_address, shard=shard, num_shards=num_shards, progress=not quiet,
                masks_dir=None if masks_dir is None else str(masks_dir), resume=resume),
                tag_job_description(captions, images, backend, model, pretrained, checkpoint, export_dir,
                                    dense_mode, dtype, threshold, score_method, flip_tta))
            click.echo(summary.line(), err=True)
            return
        if "auto" in (backend, dtype):
            from ttd.fast_path import resolve_auto

            path = resolve_auto(backend, dtype, device, export_dir)
            click.echo(path.line(), err=True)
            backend, dtype, device = path.backend, path.dtype if path.backend == "torch" else "float32", path.device
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
    vocab_embeds = None
    if vocab and not no_vocab_cache:
        from ttd.vocab_cache import load_or_encode, model_key_for

        key = model_key_for(tagger, export_dir)
        if key:
            cached = load_or_encode(tagger, vocab, key, vocab_cache, progress=not quiet)
            vocab_embeds = cached.embeds
            click.echo(f"vocabulary cache {'hit' if cached.hit else 'miss (stored)'}: {cached.path}", err=True)
    from ttd.stream_job import tag_job_description, tag_stream

    try:
        summary = tag_stream(tagger, items, output, vocab, batch_size, masks_dir, max_pixels, top_k,
                             progress=not quiet, decode_workers=decode_workers, vocabulary_embeds=vocab_embeds,
                             resume=resume, shard=shard, num_shards=num_shards,
                             inputs=[p for p in (captions, vocabulary) if p is not None], explicit_images=images,
                             job=tag_job_description(captions, images, backend, model, pretrained, checkpoint,
                                                     export_dir, dense_mode, dtype, threshold, score_method, flip_tta))
    except (InputError, ValueError) as error:
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
@click.option("--objective", type=click.Choice(["ttd", "clip"]), default="ttd", show_default=True,
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
@click.option("--threshold", type=float, default=0.5, show_default=True, help="δ of the Stage 1 selection.")
@click.option("--score", "score_method", type=click.Choice(SCORE_METHODS), default="softmax", show_default=True)
@click.option("--lora-rank", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-targets", default="attn,mlp", show_default=True, help="Comma list of attn, mlp.")
@click.option("--frozen-teacher", is_flag=True, help="Select tags and build targets with the frozen base model.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
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
    from ttd.factory import ModelLoadError, load_model
    from ttd.lora import LoRAConfig
    from ttd.train import TrainConfig, init_distributed, training_device
    from ttd.train import train as run_training

    try:
        init_distributed(device)
        base = load_model(model, pretrained, checkpoint, dense_mode).to(training_device(device))
    except (ModelLoadError, ValueError) as error:
        fail(str(error))
    clip = objective == "clip"
    config = TrainConfig(
        objective=objective, data=data, out_dir=out_dir, steps=steps or (1500 if clip else 300),
        batch_size=batch_size or (128 if clip else 64), lr=lr or 1e-3,
        warmup_steps=warmup_steps if warmup_steps is not None else (100 if clip else 30),
        weight_decay=0.1 if clip else 0.05, lambda_tag=lambda_tag, lambda_clip=lambda_clip, threshold=threshold,
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
@click.option("--threshold", type=float, default=0.5, show_default=True)
@click.option("--mask-threshold", type=float, default=0.5, show_default=True, help="θ for the binary caption mask.")
@click.option("--flip-tta", is_flag=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics here as JSON.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt", "triton"]), default="torch",
              show_default=True, help="Evaluate through this runtime backend (an export's with --export-dir).")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="Export directory for onnxruntime / tensorrt / triton (with torch: its own weights).")
@click.option("--url", default=None, help="Triton server URL for --backend triton.")
def evaluate_command(model, pretrained, checkpoint, dense_mode, data_dir, count, seed, threshold, mask_threshold,
                     flip_tta, batch_size, json_path, device, backend, export_dir, url):
    """Tag and caption-mask metrics of a model (the embedded default when none is given), measured
    through the same runtime as `ttd tag` (so an export can be evaluated: --backend onnxruntime --export-dir)."""
    from ttd.data.annotations import read_eval_split, world_eval_samples
    from ttd.evaluate import evaluate, format_table
    from ttd.factory import ModelLoadError
    from ttd.runtime import load_tagger

    try:
        tagger = load_tagger(backend, model=model, pretrained=pretrained, checkpoint=checkpoint, dense_mode=dense_mode,
                             device=device, export_dir=export_dir, url=url, threshold=threshold, flip_tta=flip_tta)
    except (ModelLoadError, ValueError, RuntimeError, OSError) as error:
        fail(str(error))
    config = tagger.config
    if data_dir is not None:
        annotations = data_dir / "annotations.jsonl" if data_dir.is_dir() else data_dir
        if not annotations.is_file():
            fail(f"{annotations} does not exist (expected an evaluation folder with annotations.jsonl)")
        skipped: list[str] = []
        samples = read_eval_split(annotations, config.image_size, config.interpolation, skipped)
        for reason in skipped:
            click.echo(f"skipped {reason}", err=True)
        if not samples:
            fail(f"{annotations}: no usable samples")
    else:
        samples, skipped = world_eval_samples(seed, count), []
    result = evaluate(tagger, samples, threshold, mask_threshold, batch_size)
    result["skipped"] = skipped
    result["model"] = config.source
    result["backend"] = backend
    click.echo(format_table(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))


@main.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@model_options
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32", show_default=True,
              help="Encoder precision. Variants must pass a quality gate against fp32 (cosine ≥ 0.99, "
                   "selected-tag agreement ≥ 95%) or the export is refused.")
@click.option("--int8-mode", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
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
    from ttd.factory import ModelLoadError, load_model

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
    from ttd.factory import ModelLoadError, load_model

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
    f = click.option("--kind", type=click.Choice(["KIND_CPU", "KIND_GPU", "KIND_AUTO"]), default=None,
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
@click.option("--flavour", type=click.Choice(["python", "native"]), default="python", show_default=True,
              help="python: Python-backend models (any tritonserver, e.g. nvidia-pytriton's); "
                   "native: onnxruntime_onnx / tensorrt_plan platforms (NVIDIA's container).")
@click.option("--engine", type=click.Choice(["onnx", "torch", "tensorrt"]), default="onnx", show_default=True,
              help="What the graph models run. python flavour: onnx (onnxruntime, CPU) or torch (the export's "
                   "weights; GPU with --kind KIND_GPU); native flavour: onnx or tensorrt (the export's engines).")
@click.option("--torch-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Torch engine: weight precision of the encoders (the tag head stays float32).")
@_batching_options
@click.option("--threshold", type=float, default=0.5, show_default=True, help="δ used by ttd_tagger.")
@click.option("--max-tags", type=click.IntRange(1), default=1024, show_default=True, help="ttd_tagger: tags per request.")
def triton_build(export_dir, repo, flavour, engine, torch_dtype, max_batch_size, preferred_batch_sizes, queue_delay_us,
                 instances, kind, threshold, max_tags):
    """Write a Triton model repository REPO for the export EXPORT_DIR, then validate it."""
    from export.triton import BatchingOptions, RepositoryError, build_repository, validate_repository
    from ttd.runtime.export_dir import ExportError

    try:
        sizes = tuple(int(s) for s in preferred_batch_sizes.split(",") if s.strip())
        options = BatchingOptions(max_batch_size, sizes, queue_delay_us, instances, kind)
        build_repository(export_dir, repo, flavour, engine, options, threshold, max_tags, torch_dtype)
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
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=120, show_default=True, help="Seconds to wait for readiness.")
@click.option("--max-restarts", type=click.IntRange(0), default=5, show_default=True,
              help="Restart tritonserver when it dies, at most this many times in 10 minutes.")
def serve(repo, host, http_port, grpc_port, timeout_s, max_restarts):
    """Serve a model repository with the tritonserver bundled by nvidia-pytriton (Ctrl-C or
    SIGTERM stops it; a crashed tritonserver is restarted)."""
    from ttd.runtime.triton_server import ServerError, start_server, stop_on_signals, supervise

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {host} exposes the server to the network, without authentication", err=True)

    def start():
        return start_server(repo, host, http_port, grpc_port, timeout_s)

    with stop_on_signals():
        try:
            server = start()
        except ServerError as error:
            fail(str(error))
        except KeyboardInterrupt:
            sys.exit(0)
        click.echo(f"serving {repo}: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C to stop)", err=True)
        code = supervise(server, start, lambda line: click.echo(line, err=True), max_restarts)
    sys.exit(code)


if __name__ == "__main__":
    main()
