"""Training: contrastive pre-training (`clip`) and TTD fine-tuning with LoRA (`ttd`).

One code path for a single process and for `torchrun` (gradients all-reduced by hand, so the
model needs no DDP wrapper around its several entry points). The batch of a step is a pure
function of (seed, step, rank), which makes resume exact: a run killed mid-way and resumed ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

from ttd.errors import InputError, RuntimeProblem
import copy
import dataclasses
import json
import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ttd.model.config import (CALIBRATION_COUNT, CALIBRATION_SEED, DEFAULT_LABEL_FREE_PAIRS, DEFAULT_TARGET_MASK_SHARE,
                              DEFAULT_TARGET_NORM, DEFAULT_THRESHOLD, OBJECTIVES)
from ttd.data.shard_stream import ShardStreamLoader
from ttd.data.sources import open_source
from ttd.train.distill import clip_loss, ttd_losses
from ttd.train.guard import CollapseGuard
from ttd.model.factory import atomic_write, save_checkpoint, save_config
from ttd.runtime.images import ImageError, Preprocess, normalize
from ttd.data.items import is_shard_pattern
from ttd.model.lora import LoRAConfig, adapter_state_dict, inject_lora, merged_state_dict
from ttd.model.clip import TTDModel
from ttd.model.scoring import pad_tags
from ttd.errors import TTDError
from ttd.model.tags import CaptionError, bounded_tags, candidate_tags


@dataclass
class TrainConfig:
    objective: str = "ttd"  # "clip" (contrastive pre-training, all weights) or "ttd" (LoRA fine-tuning)
    data: str = "world"
    out_dir: str = "runs/ttd"
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int = 1
    precision: str = "fp32"  # or "bf16" (autocast)
    checkpoint_every: int = 100
    lambda_tag: float = 2.0  # chosen by ablation: see README "Ablations"
    lambda_clip: float = 1.0
    threshold: float = DEFAULT_THRESHOLD
    # Stage-1 selection score, by measurement (README "Single tag bias and TTD", 3 seeds on unseen
    # pairs): minmax took caption IoU 54.5 -> 60.9 ± 0.8, the paper's softmax -> 57.0 ± 1.7, the
    # runtime default `negatives` collapsed (44.1 ± 4.1: its online selection feeds back)
    score_method: str = "minmax"
    frozen_teacher: bool = False
    # Stage 1 and the targets from an exponential moving average of the trained weights (mean teacher):
    # 0 = the current model (the paper's online teacher); ignored with frozen_teacher
    teacher_momentum: float = 0.0
    # Stage-2 targets (ttd.train.distill.distill_targets): "mask" is the paper's min-max of the sigmoid mask,
    # which collapsed one run in six; "mixed" (half mask, half cosine) is the default by
    # benchmarks/seeds.py, docs/training.md
    target_norm: str = DEFAULT_TARGET_NORM
    target_mask_share: float = DEFAULT_TARGET_MASK_SHARE
    # the caption's target U from other maps than the tags' (None: the same); docs/training.md "Segmentation too"
    caption_target_norm: str | None = None
    # from this step on the targets are the paper's (`mask`), before it `target_norm` (None: never)
    mask_after_step: int | None = None
    # lift a selected tag's cosines so that their mean is not below the sigmoid's midpoint −b/w before the targets
    target_floor: bool = False
    caption_target_floor: bool | None = None  # the floor of the caption's target alone (None: target_floor)
    # per-pixel blend: `target_norm`'s target where the tag wins the pixel, the paper's elsewhere (docs/training.md)
    pixel_mix: bool = False
    # a loss on the caption mask's area falling below this share of the evidence area (None: off; docs/training.md)
    caption_area_floor: float | None = None
    # its weight: the distill BCE moves a logit by (M - U) per pixel, the area term by λ·σ'(z) ≤ λ/4,
    # so below 4 the term cannot hold a mask whose target is shrinking
    caption_area_weight: float = 4.0
    caption_area_ranked: bool = False  # the area weighted by the caption's own min-max cosine map
    # the floor as a recall where the selected tags rank high (the teacher's cosine order), not on the backdrop
    caption_area_placed: bool = False
    # the floor's area placed: the caption must cover the floor × evidence-area pixels the selected tags rank highest
    caption_area_top: bool = False
    # label-free guard against the caption-mask collapse (ttd/train/guard.py): flags it, keeps the last healthy weights
    collapse_guard: bool = True
    # on the guard's first flag, go on from its last healthy snapshot with the learning rate × this
    # (fresh AdamW moments), once, instead of only keeping the snapshot at the end (None: off; one process)
    guard_restart_lr_scale: float | None = None
    calibration_lr_scale: float = 10.0  # w and b are two scalars: AdamW at the base lr barely moves them
    # fit the negatives score's margin to the trained model: on the world's labelled calibration split
    # when training on the world, else label-free on the training pairs (ttd/evaluation/label_free.py)
    calibrate_margin: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    max_bad_steps: int = 20
    # recompute each transformer block's activations in the backward pass (open_clip's gradient
    # checkpointing): the same losses and gradients for less memory and one more forward pass
    # (docs/training.md, "Memory"). None: on for models above CHECKPOINTING_PARAMETERS (an open_clip
    # ViT-B/16: 0.22 -> 0.10 GB per sample, +20 % time), off for the world models (1.7 M parameters)
    grad_checkpointing: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_objective(cls, objective: str = "ttd", **settings) -> TrainConfig:
        """The config of `objective` with its own defaults (OBJECTIVE_DEFAULTS) under the
        settings given; a setting given as None keeps the default."""
        if objective not in OBJECTIVE_DEFAULTS:
            raise InputError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVE_DEFAULTS)}")
        given = {k: v for k, v in settings.items() if v is not None}
        return cls(objective=objective, **{**OBJECTIVE_DEFAULTS[objective], **given})


# contrastive pre-training trains every weight from scratch: longer, larger batches, more warm-up
OBJECTIVE_DEFAULTS: dict[str, dict] = {
    "ttd": {"steps": 300, "batch_size": 64, "lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.05},
    "clip": {"steps": 1500, "batch_size": 128, "lr": 1e-3, "warmup_steps": 100, "weight_decay": 0.1},
}
assert tuple(OBJECTIVE_DEFAULTS) == OBJECTIVES, "ttd.model.config.OBJECTIVES names the objectives defined here"


CHECKPOINTING_PARAMETERS = 50_000_000


def _grad_checkpointing(model: TTDModel, config: TrainConfig) -> bool:
    if config.grad_checkpointing is not None:
        return config.grad_checkpointing
    return sum(p.numel() for p in model.parameters()) > CHECKPOINTING_PARAMETERS


class TrainingDiverged(TTDError, FloatingPointError, RuntimeError):
    """Too many non-finite steps: the learning rate is too high for this model and data."""


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _global_share(count: torch.Tensor) -> torch.Tensor:
    """A local count -> the global count / world size (the local count alone in one process)."""
    rank, world = _rank_world()
    if world == 1:
        return count
    total = count.detach().clone()
    dist.all_reduce(total)
    return total / world


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather with gradient flowing to the local shard (CLIP loss over the global batch)."""
    rank, world = _rank_world()
    if world == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def _check_caption(caption: str) -> None:
    """A caption training can use, or the CaptionError that makes it a skipped sample (the run goes
    on): an unbounded one (too many tags) or one with no candidate tag (only stopwords)."""
    if not bounded_tags(caption):
        raise CaptionError(f"caption {caption[:80]!r} has no candidate tags (only stopwords or punctuation)")


class BatchLoader:
    """Batch `step` of rank `rank`: indices drawn from a seeded permutation of the source."""

    def __init__(self, source, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.source, self.batch_size, self.seed, self.rank, self.world = source, batch_size, seed, rank, world
        self.skipped: list[str] = []

    def indices(self, step: int) -> list[int]:
        n = len(self.source)
        start = (step * self.world + self.rank) * self.batch_size
        if n >= 2**32:  # endless source: every index is new
            return list(range(start, start + self.batch_size))
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, n)
            out.append(int(np.random.default_rng([self.seed, epoch]).permutation(n)[offset]))
        return out

    def batch(self, step: int) -> tuple[np.ndarray, list[str]]:
        images, captions = [], []
        for index in self.indices(step):
            try:
                image, caption = self.source.get(index)
                _check_caption(caption)
            except (ImageError, OSError, KeyError, ValueError) as error:
                self.skipped.append(f"{index}: {error}")
                continue
            images.append(image)
            captions.append(caption)
        if len(images) < 2:
            raise RuntimeProblem(f"step {step}: fewer than 2 readable samples in the batch; last error: {self.skipped[-1:]}")
        return np.stack(images), captions


def _trainable(model: TTDModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    if config.objective == "clip":
        for p in model.parameters():
            p.requires_grad_(True)
        model.mask_weight.requires_grad_(False)
        model.mask_bias.requires_grad_(False)
        return [p for p in model.parameters() if p.requires_grad]
    if config.objective == "ttd":
        return inject_lora(model, config.lora)
    raise InputError(f"unknown objective {config.objective!r}; choose 'clip' or 'ttd'")


def _step_losses(model: TTDModel, teacher: TTDModel | None, pixels: torch.Tensor, captions: list[str],
                 config: TrainConfig, step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    image_embeds, patch_embeds = model.encode_image(pixels)
    text_embeds = model.encode_texts(captions)
    contrastive = clip_loss(_gather(image_embeds.float()), _gather(text_embeds.float()), model.clip.logit_scale)
    if config.objective == "clip":
        return contrastive, {"loss": contrastive.item()}
    tag_lists = [candidate_tags(c) for c in captions]
    if config.score_method == "negatives":
        # the negative prompts are the score's fixed anchors: taught as (absent) caption tags, their
        # cosines fall everywhere and every tag then clears the margin (measured: absent tags
        # selected 0.3 % -> 27 % after 40 steps), so they take no part in the tag loss
        anchors = set(model.config.negative_prompts)
        tag_lists = [[t for t in tags if t not in anchors] for tags in tag_lists]
    unique, index, valid = pad_tags(tag_lists)
    index, valid = index.to(model.device), valid.to(model.device)
    tag_embeds = model.encode_tags(unique)[index]
    teacher_out = None
    if teacher is not None:
        with torch.no_grad():
            teacher_out = (teacher.encode_image(pixels)[1], teacher.encode_tags(unique)[index])
    negative_embeds = None
    if config.score_method == "negatives":
        with torch.no_grad():
            negative_embeds = (teacher if teacher is not None else model).encode_tags(list(model.config.negative_prompts)).float()
    losses = ttd_losses(patch_embeds.float(), text_embeds.float(), tag_embeds.float(), valid, model.mask_weight,
                        model.mask_bias, contrastive, model.config.tau, config.threshold, config.lambda_tag,
                        config.lambda_clip, config.score_method, teacher_out, _global_share,
                        negative_embeds, model.config.negative_margin, _target_norm(config, step),
                        config.target_mask_share, config.caption_target_norm, config.target_floor,
                        config.caption_target_floor, config.pixel_mix, config.caption_area_floor,
                        config.caption_area_weight, config.caption_area_ranked, config.caption_area_placed,
                        config.caption_area_top)
    return losses.total, {**losses.as_floats(), **losses.diagnostics}


def _target_norm(config: TrainConfig, step: int) -> str:
    """The Stage-2 target normalisation of `step`: `target_norm`, the paper's `mask` from `mask_after_step` on."""
    if config.mask_after_step is not None and step >= config.mask_after_step:
        return "mask"
    return config.target_norm


def _ema_teacher(config: TrainConfig) -> bool:
    return config.objective == "ttd" and not config.frozen_teacher and 0.0 < config.teacher_momentum < 1.0


def _update_teacher(teacher: TTDModel, model: TTDModel, momentum: float) -> None:
    """teacher ← momentum·teacher + (1 − momentum)·model, for the trained weights (the rest are equal)."""
    with torch.no_grad():
        for kept, trained in zip(teacher.parameters(), model.parameters()):
            if trained.requires_grad:
                kept.lerp_(trained.detach(), 1.0 - momentum)


def _save_state(path: Path, model, optimizer, scheduler, step: int, config: TrainConfig,
                teacher: TTDModel | None = None, guard: CollapseGuard | None = None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "step": step, "config": json.dumps(config.to_dict())}
    if teacher is not None and _ema_teacher(config):
        state["teacher"] = teacher.state_dict()
    if guard is not None:  # a resumed run keeps the guard's averages and kept weights
        state["guard"] = guard.state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# settings a resumed run may change (the margin fit happens after the last step: a run whose fit
# failed is resumed with --no-calibrate to write its model without one)
RESUMABLE_CHANGES = ("out_dir", "checkpoint_every", "max_bad_steps", "calibrate_margin", "grad_checkpointing")


def _load_state(path: Path) -> dict:
    """last.pt, loaded with weights_only=True; anything else is a clear error, never a hint to
    load untrusted pickles."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise InputError(f"{path} is not a training state written by `ttd train` ({reason}); "
                         "delete it or pass --no-resume to start over") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "torch_rng", "step"} <= state.keys():
        raise InputError(f"{path} is not a training state written by `ttd train`; delete it or pass --no-resume")
    return state


def _refuse_changed_settings(path: Path, state: dict, config: TrainConfig) -> None:
    """A resumed run must continue the run it resumes: its optimizer, learning-rate schedule and
    batches were made with the saved settings, and mixing them silently records a run that
    never happened."""
    saved = json.loads(state.get("config", "{}"))
    current = json.loads(json.dumps(config.to_dict()))  # tuples as lists, like the saved copy
    changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current
               if k in saved and k not in RESUMABLE_CHANGES and saved[k] != current[k]]
    if changed:
        raise InputError(f"{path} was written with other settings ({'; '.join(changed)}); resume with the saved "
                         "settings, or pass --no-resume (or another --out) to start a new run")


@dataclass
class TrainingRun:
    """What a run holds between steps: built by `setup`, advanced by `train_step`, closed by `finish`."""

    model: TTDModel
    teacher: TTDModel | None
    config: TrainConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: BatchLoader
    state_path: Path
    start: int
    rank: int
    world: int
    bad_steps: int = 0
    guard: CollapseGuard | None = None  # rank 0 of a TTD run; its state travels in last.pt


def setup(model: TTDModel, config: TrainConfig, resume: bool = True) -> TrainingRun:
    """Seeds, optimiser (w and b at their own learning rate), schedule, data, and the state of
    `out_dir/last.pt` when resuming (refused if it was trained with other settings)."""
    rank, world = _rank_world()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if config.frozen_teacher else None
    params = _trainable(model, config)
    if _ema_teacher(config):  # a copy with the adapters, so that it can follow them
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    calibration = [p for p in (model.mask_weight, model.mask_bias) if p.requires_grad]
    others = [p for p in params if all(p is not c for c in calibration)]
    groups = [{"params": others}] + ([{"params": calibration, "lr": config.lr * config.calibration_lr_scale,
                                       "weight_decay": 0.0}] if calibration else [])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.warmup_steps, config.steps))
    start, state = 0, None
    state_path = Path(config.out_dir) / "last.pt"
    if resume and state_path.is_file():
        state = _load_state(state_path)
        _refuse_changed_settings(state_path, state, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        if teacher is not None and "teacher" in state:
            teacher.load_state_dict(state["teacher"])
    if is_shard_pattern(config.data):  # streamed: no index of CC3M-scale shards in memory
        loader = ShardStreamLoader(config.data, Preprocess.for_model(model.config), config.batch_size,
                                   config.data_seed, rank, world)
    else:
        source = open_source(config.data, Preprocess.for_model(model.config), config.data_seed)
        loader = BatchLoader(source, config.batch_size, config.data_seed, rank, world)
    model.train()
    model.clip.set_grad_checkpointing(_grad_checkpointing(model, config))
    guard = CollapseGuard() if config.collapse_guard and config.objective == "ttd" and rank == 0 else None
    if config.guard_restart_lr_scale is not None and world > 1:
        raise InputError("guard_restart_lr_scale needs one process: the guard runs on rank 0 only")
    if guard is not None and state is not None and "guard" in state:
        guard.load_state_dict(state["guard"])
    if guard is not None:  # a run that collapses within the guard's warm-up ends with these (docs/training.md)
        guard.keep_initial(params, start)
    return TrainingRun(model, teacher, config, params, optimizer, scheduler, loader, state_path, start, rank, world,
                       guard=guard)


def train_step(run: TrainingRun, step: int, images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """One optimisation step (gradients averaged across processes; a non-finite step is skipped,
    too many of them stop the run); saves `last.pt` on schedule. Returns the step's logged losses."""
    model, config = run.model, run.config
    pixels = torch.from_numpy(normalize(images, model.config.mean, model.config.std)).to(model.device)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
        loss, logs = _step_losses(model, run.teacher, pixels, captions, config, step)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.world > 1:
        for p in run.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= run.world
    grads_finite = all(torch.isfinite(p.grad).all() for p in run.params if p.grad is not None)
    if not (math.isfinite(loss.item()) and grads_finite):
        run.bad_steps += 1
        if run.bad_steps > config.max_bad_steps:
            raise TrainingDiverged(f"training diverged: {run.bad_steps} non-finite steps (the last at step {step}) at "
                                   f"lr {config.lr:g}: lower --lr (the last checkpoint, {run.state_path}, is from "
                                   "before; pass --no-resume to start over with the new rate)")
        tqdm.write(f"step {step}: non-finite loss or gradient, update skipped")
        run.optimizer.zero_grad(set_to_none=True)
    else:
        torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip)
        run.optimizer.step()
        if run.teacher is not None and _ema_teacher(config):
            _update_teacher(run.teacher, model, config.teacher_momentum)
    with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
        warnings.filterwarnings("ignore", message="Detected call of")
        run.scheduler.step()
    if config.objective == "clip":
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))
    if run.guard is not None and (line := run.guard.observe(step, logs, run.params)):
        tqdm.write(line)  # observed before the checkpoint, so that a resumed run decides as this one
        if config.guard_restart_lr_scale is not None and run.guard.report.restarted_step is None:
            tqdm.write(_restart(run, step, config.guard_restart_lr_scale))
    done = step + 1
    if run.rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
        _save_state(run.state_path, model, run.optimizer, run.scheduler, done, config, run.teacher, run.guard)
    return logs


def _restart(run: TrainingRun, step: int, lr_scale: float) -> str:
    """The guard's snapshot back in the weights, AdamW's moments cleared (they carry the steps
    being undone), and the rest of the schedule at `lr_scale` of its rate (the scheduler's base
    rates, which last.pt saves, so a resumed run keeps the lower rate)."""
    line = run.guard.restart(step, run.params)
    run.optimizer.state.clear()
    run.scheduler.base_lrs = [rate * lr_scale for rate in run.scheduler.base_lrs]
    for group in run.optimizer.param_groups:  # the scheduler already set the next step's rate
        group["lr"] *= lr_scale
    return f"{line}, learning rate × {lr_scale:g} from step {step + 1}"


METRICS_FILE = "metrics.jsonl"
BAR_KEYS = ("loss", "distill", "tag", "clip", "selected", "caption_area")


class MetricsLog:
    """One JSON line per step (losses and the mask diagnostics of ttd.train.distill) beside the
    checkpoint; a resumed run drops the lines of steps it will redo, so the file stays one line per step."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n") if path.is_file() and start > 0 else []
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row.get("step", 0) if isinstance(row, dict) else None
            except ValueError:
                step = None
            if step is None:
                if number >= len(lines) - 1:  # the last line, torn by a kill: cut, as a torn record is
                    continue
                raise InputError(f"{path}:{number} is not a metrics line written by `ttd train`; delete the file "
                                 "(or pass --no-resume) to go on")
            if step < start:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, logs: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in logs.items()}}) + "\n")


def finish(run: TrainingRun) -> TTDModel:
    """The trained model in eval mode; rank 0 writes model.safetensors (+ adapter, train_config.json)."""
    run.model.eval()
    run.model.clip.set_grad_checkpointing(False)
    if run.rank == 0:
        if run.loader.skipped:
            tqdm.write(f"skipped {len(run.loader.skipped)} unreadable samples; first: {run.loader.skipped[0]}")
        guard = None
        if run.guard is not None:  # before the margin is fitted: it is fitted to the weights that are kept
            guard = run.guard.restore(run.params).as_dict()
            if guard["kept_step"] is not None:
                kept = (f"ratio {guard['kept_ratio']:.2f}" if guard["kept_ratio"] is not None
                        else "the weights it started from: no step was seen healthy")
                tqdm.write(f"collapse guard: kept the weights of step {guard['kept_step']} ({kept}), "
                           f"not the last (ratio {guard['final_ratio']:.2f})")
        out = Path(run.config.out_dir)
        # the weights first, with an unfitted margin: a fit that fails (too few pairs, a degenerate
        # null) or is interrupted never costs the trained model (docs/reliability.md, "Training")
        run.model.config = dataclasses.replace(run.model.config, margin_fit=None)
        _write_outputs(run.model, run.config, out, run.loader.skipped, None, guard)
        try:
            fitted, calibration = _calibrated_config(run.model, run.config)
        except ValueError as error:  # TTDError's fit refusals are ValueErrors too
            tqdm.write(f"warning: the negatives margin was not fitted ({error}); the model keeps "
                       f"negative_margin {run.model.config.negative_margin:g}: fit it with `ttd calibrate --checkpoint "
                       f"{out / 'model.safetensors'} --captions PAIRS.jsonl` (or --data LABELLED_DIR)")
            calibration = {"error": str(error)}
        else:
            run.model.config = fitted
            if calibration is not None:
                save_config(out / "model.safetensors", _checkpoint_config(run.model, run.config))
        _write_train_config(run.config, out, run.loader.skipped, calibration, guard)
        _plot_metrics(out)
    return run.model


def _plot_metrics(out: Path) -> None:
    """metrics.png beside metrics.jsonl (a run resumed past its last step has no lines: no plot)."""
    from ttd.train.plot import plot_metrics

    if (out / METRICS_FILE).is_file() and (out / METRICS_FILE).stat().st_size:
        plot_metrics(out / METRICS_FILE, out / "metrics.png", title=out.name)


def train(model: TTDModel, config: TrainConfig, resume: bool = True, progress: bool = True,
          stop_after: int | None = None) -> TTDModel:
    """Train in place and return the model; writes `out_dir/last.pt` (resumable state) and, at the
    end, `out_dir/model.safetensors` (LoRA merged) plus `adapter.safetensors` for TTD.

    `stop_after` ends the run early after that many steps (to test kill-and-resume)."""
    run = setup(model, config, resume)
    bar = tqdm(range(run.start, config.steps), initial=run.start, total=config.steps,
               disable=not progress or run.rank != 0, desc=f"train {config.objective}")
    metrics = MetricsLog(Path(config.out_dir) / METRICS_FILE, run.start) if run.rank == 0 else None
    with ThreadPoolExecutor(max_workers=1) as prefetch:  # build batch step+1 while step trains
        pending = prefetch.submit(run.loader.batch, run.start)
        for step in bar:
            images, captions = pending.result()
            if step + 1 < config.steps:
                pending = prefetch.submit(run.loader.batch, step + 1)
            logs = train_step(run, step, images, captions)
            if metrics is not None:
                metrics.write(step, logs)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in BAR_KEYS})
            if stop_after is not None and step + 1 - run.start >= stop_after:
                pending.cancel()
                return model.eval()
    return finish(run)


def _write_outputs(model: TTDModel, config: TrainConfig, out: Path, skipped: list[str], calibration: dict | None,
                   guard: dict | None = None) -> None:
    from safetensors.torch import save_file

    if config.objective == "ttd":
        adapter = adapter_state_dict(model)
        save_file(adapter, str(out / "adapter.safetensors"),
                  metadata={"lora": json.dumps(config.lora.to_dict()), "base": model.config.source})
        save_checkpoint(model, out / "model.safetensors", merged_state_dict(model), _checkpoint_config(model, config))
    else:
        save_checkpoint(model, out / "model.safetensors")
    _write_train_config(config, out, skipped, calibration, guard)


def _checkpoint_config(model: TTDModel, config: TrainConfig):
    """The config written beside the trained weights (a TTD model names its base as its source)."""
    if config.objective == "ttd":
        return dataclasses.replace(model.config, source=f"ttd:{model.config.source}")
    return model.config


def _write_train_config(config: TrainConfig, out: Path, skipped: list[str], calibration: dict | None,
                        guard: dict | None) -> None:
    (out / "train_config.json").write_text(json.dumps({**config.to_dict(), "skipped_samples": len(skipped),
                                                       "margin_calibration": calibration, "collapse_guard": guard},
                                                      indent=1))


def _calibrated_config(model: TTDModel, config: TrainConfig) -> tuple:
    """(the model's config with its negatives margin fitted and how, the fit): with labels on the
    world's calibration split when training on the world, else label-free on the training pairs
    themselves (ttd/evaluation/label_free.py: no labels, so no leak). The returned model carries
    it too, so it tags as its checkpoint will (rank 0 under DDP). Unfitted: margin_fit None."""
    unfitted = dataclasses.replace(model.config, margin_fit=None)  # the base's fit does not hold for new weights
    if not config.calibrate_margin:
        tqdm.write(f"negative_margin stays {model.config.negative_margin:g} (the base model's): fit it to the trained model "
                   f"with `ttd calibrate --checkpoint {Path(config.out_dir) / 'model.safetensors'} --captions PAIRS.jsonl`")
        return unfitted, None
    from ttd.evaluation.calibrate import fit_negative_margin, fitted_config, labelled_record
    from ttd.runtime import torch_tagger

    tagger = torch_tagger(model, device=str(next(model.parameters()).device), score_method="negatives")  # tagging's δ
    if config.data == "world":
        from ttd.data.annotations import world_eval_samples

        fit = fit_negative_margin(tagger, world_eval_samples(CALIBRATION_SEED, CALIBRATION_COUNT), progress=False)
        tqdm.write(f"calibrated on the world (seed {CALIBRATION_SEED}): {fit.line()}")
        record = labelled_record(fit, f"world seed {CALIBRATION_SEED} ({CALIBRATION_COUNT} pairs)", tagger.threshold, False)
        return fitted_config(unfitted, fit.margin, record), {**fit.as_dict(), "method": "labelled"}
    from ttd.data.items import read_pairs
    from ttd.evaluation.label_free import fit_label_free

    skipped: list[str] = []
    images, captions = read_pairs(config.data, DEFAULT_LABEL_FREE_PAIRS, skipped)
    fit = fit_label_free(tagger, images, captions, progress=False, skipped=skipped)
    tqdm.write(f"calibrated label-free on the training pairs: {fit.line()}")
    record = fit.record(f"{config.data} (training pairs)", tagger.threshold, False)
    return fitted_config(unfitted, fit.margin, record), {**fit.as_dict(), "method": "label-free"}


def training_device(device: str | None = "auto") -> torch.device:
    """auto: cuda if available (under torchrun, the process's own GPU cuda:LOCAL_RANK), else cpu."""
    from ttd.runtime.torch_backend import pick_device

    chosen = pick_device(device)
    if chosen.type == "cuda" and chosen.index is None and "LOCAL_RANK" in os.environ:
        chosen = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return chosen


def init_distributed(device: str | None = "auto") -> None:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        chosen = training_device(device)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
