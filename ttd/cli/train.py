"""`ttd train`: contrastive pre-training and TTD fine-tuning."""

from __future__ import annotations

from pathlib import Path

import click

from ttd.model.config import (
    DEFAULT_TARGET_MASK_SHARE,
    DEFAULT_TARGET_NORM,
    TARGET_NORMS,
    DEFAULT_THRESHOLD,
    OBJECTIVES,
    PRECISIONS,
    SCORE_METHODS,
)

from ttd.cli.common import Precision, fail, main, model_options
from ttd.options import UNIT_INTERVAL, BatchSize


@main.command()
@model_options
@click.option("--objective", type=click.Choice(OBJECTIVES), default="ttd", show_default=True,
              help="ttd: LoRA fine-tuning with text-tag self-distillation; clip: contrastive pre-training of all weights.")
@click.option("--captions", type=click.Path(path_type=Path), default=None,
              help="Image-caption pairs: a captions .jsonl/.csv (image + caption per line) or webdataset shards "
                   "('shards/{000..009}.tar') [default: the synthetic world's training pairs].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="runs/ttd", show_default=True,
              help="Run folder: model.safetensors (+ .json), last.pt for resuming, metrics.jsonl and metrics.png.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Default: 300 (ttd) or 1500 (clip).")
@click.option("--batch-size", type=BatchSize(), default=None,
              help="Pairs per step and process, at least 2. Default (or auto): 64 (ttd) or 128 (clip).")
@click.option("--lr", type=float, default=None, help="Peak learning rate. Default: 1e-3.")
@click.option("--warmup", "warmup_steps", type=click.IntRange(0), default=None,
              help="Linear warm-up steps of the learning rate. Default: the objective's.")
@click.option("--lambda-tag", type=float, default=2.0, show_default=True, help="Weight of L_tag (2 won the ablation).")
@click.option("--lambda-clip", type=float, default=1.0, show_default=True,
              help="Weight of the CLIP contrastive loss that keeps global alignment.")
@click.option("--threshold", type=UNIT_INTERVAL, default=DEFAULT_THRESHOLD, show_default=True,
              help="δ of the Stage 1 selection.")
@click.option("--stage1-score", "score_method", type=click.Choice(SCORE_METHODS), default="minmax",
              show_default=True, help="Stage-1 selection score: minmax (measured best for caption masks, "
                                      "docs/training.md), softmax (the paper's: +2.5) or negatives "
                                      "(the tagging default; unstable as an online selector). See docs/architecture.md §3.4.")
@click.option("--target-norm", type=click.Choice(TARGET_NORMS), default=DEFAULT_TARGET_NORM, show_default=True,
              help="Stage-2 targets: what is min-max normalised over the pixels. mask: the sigmoid mask (the paper's; "
                   "collapses on some seeds, docs/training.md); cosine: the cosine; mixed: a blend of both.")
@click.option("--target-mask-share", type=click.FloatRange(0, 1), default=DEFAULT_TARGET_MASK_SHARE, show_default=True,
              help="--target-norm mixed: the mask's share of the blend (the rest: the cosine's).")
@click.option("--teacher-momentum", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="> 0: Stage 1 and the targets come from an EMA of the student (an extra forward pass).")
@click.option("--no-collapse-guard", is_flag=True,
              help="Do not watch the caption masks against the image evidence (docs/training.md); keep the last weights.")
@click.option("--lora-rank", type=click.IntRange(1), default=8, show_default=True, help="Rank of the LoRA adapters.")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True,
              help="LoRA scaling numerator (the update is scaled by alpha / rank).")
@click.option("--lora-targets", default="attn,mlp", show_default=True, help="Comma list of attn, mlp.")
@click.option("--frozen-teacher", is_flag=True, help="Select tags and build targets with the frozen base model.")
@click.option("--precision", type=Precision(PRECISIONS), default="fp32", show_default=True,
              help="fp32, or bf16: autocast of the forward passes (weights and optimiser stay fp32); fp16 and "
                   "int8 are export precisions and are refused here.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed (LoRA initialisation, batch order).")
@click.option("--data-seed", type=int, default=1, show_default=True,
              help="World seed of the synthetic training pairs (without --captions).")
@click.option("--checkpoint-every", type=click.IntRange(1), default=100, show_default=True,
              help="Steps between resumable checkpoints (OUT/last.pt).")
@click.option("--no-resume", is_flag=True, help="Start over even if OUT/last.pt exists.")
@click.option("--no-calibrate", is_flag=True,
              help="Do not fit the negatives margin after training (fit it later with `ttd calibrate`).")
@click.option("--device", default="auto", show_default=True,
              help="auto (cuda if available; under torchrun cuda:LOCAL_RANK), cpu, cuda, cuda:1 ...")
def train(model, pretrained, checkpoint, dense_mode, objective, captions, out_dir, steps, batch_size, lr, warmup_steps,
          lambda_tag, lambda_clip, threshold, score_method, lora_rank, lora_alpha, lora_targets, frozen_teacher,
          target_norm, target_mask_share, teacher_momentum, no_collapse_guard, precision, seed, data_seed,
          checkpoint_every, no_resume, no_calibrate, device):
    """Pre-train (clip) or TTD-fine-tune (ttd) a model; resumes from OUT/last.pt when present.

    Writes OUT/model.safetensors (+ .json; LoRA merged) and, for ttd, OUT/adapter.safetensors.
    Under torchrun every process trains on its own shard of each step's batch (gloo on CPU).
    """
    from ttd.model.factory import ModelLoadError, load_model
    from ttd.model.lora import LoRAConfig
    from ttd.train.loop import TrainConfig, init_distributed, training_device
    from ttd.train.loop import train as run_training

    batch_size = None if batch_size == "auto" else batch_size
    if batch_size is not None and batch_size < 2:
        fail(f"--batch-size {batch_size}: a contrastive step needs at least 2 pairs")
    if precision not in ("fp32", "bf16"):
        fail(f"--precision {precision}: training runs in fp32 or with bf16 autocast; {precision} is an export precision")
    init_distributed(device)
    base = load_model(model, pretrained, checkpoint, dense_mode).to(training_device(device))
    config = TrainConfig.for_objective(
        objective, data=str(captions) if captions is not None else "world", out_dir=str(out_dir), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        lambda_tag=lambda_tag, lambda_clip=lambda_clip, threshold=threshold,
        score_method=score_method, frozen_teacher=frozen_teacher, precision=precision, seed=seed, data_seed=data_seed,
        checkpoint_every=checkpoint_every, target_norm=target_norm, target_mask_share=target_mask_share,
        teacher_momentum=teacher_momentum, collapse_guard=not no_collapse_guard, calibrate_margin=not no_calibrate,
        lora=LoRAConfig(rank=lora_rank, alpha=lora_alpha, targets=tuple(t for t in lora_targets.split(",") if t)),
    )
    run_training(base, config, resume=not no_resume)
    click.echo(f"wrote {Path(out_dir) / 'model.safetensors'}", err=True)
