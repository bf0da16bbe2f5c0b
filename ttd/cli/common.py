"""What every `ttd` command shares: the `main` group, the model options, errors, and the options
of long jobs and of whole-image inference (one option name means one thing in every command)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ttd.model.config import (
    DENSE_MODES,
    PRECISION_ALIASES,
    canonical_precision,
)


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


class BatchSize(click.ParamType):
    """A number of images ≥ 1, or "auto": chosen for the device (ttd.runtime.hardware.auto_batch_size)."""

    name = "batch_size"

    def get_metavar(self, param, ctx=None) -> str:
        return "[N|auto]"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == "auto":
            return value
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is not a number of images ≥ 1 or auto", param, ctx)


def resolve_batch_size(batch_size, device: str | None, crop: str, default: int) -> int:
    """--batch-size as given; auto: by device; unset: `default`."""
    if batch_size == "auto":
        from ttd.runtime.hardware import auto_batch_size

        return auto_batch_size(device, crop)
    return batch_size or default


def given_options(*names: str) -> list[str]:
    """The options among `names` (parameter names) that the user gave on the command line, as typed
    (--batch-size), so a mode that cannot honour them refuses them instead of ignoring them."""
    from click.core import ParameterSource

    context = click.get_current_context()
    params = {p.name: p for p in context.command.params}
    return [params[n].opts[0] for n in names if context.get_parameter_source(n) == ParameterSource.COMMANDLINE]


def fail(message: str | BaseException) -> None:
    """Exit with status 2 after one line: the message, or an exception as a user reads it (an
    OSError as "PATH: cause", without its errno)."""
    if isinstance(message, OSError) and message.strerror:
        message = f"{message.filename}: {message.strerror}" if message.filename else message.strerror
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def show_warning(message, category, filename, lineno, file=None, line=None, *, _default=None) -> None:
    """ttd's own notices (an unfitted margin) as one `warning:` line; any other warning as Python shows it."""
    from ttd.runtime import UnfittedMarginWarning

    if issubclass(category, UnfittedMarginWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default(message, category, filename, lineno, file, line)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ttd-toolkit")
def main() -> None:
    """TTD: find and fix the single tag bias of CLIP (Text-Tag Self-Distillation, ECCV 2024).

    \b
    Tag images with their captions:   ttd tag --captions captions.jsonl -o tags.jsonl
    Fine-tune a model with TTD:       ttd train --objective ttd --out runs/ttd
    Evaluate (tags and masks):        ttd eval --checkpoint runs/ttd/model.safetensors
    Export to ONNX (+ TensorRT):      ttd export --checkpoint ... out/export
    Fit the score to your model:      ttd calibrate --checkpoint ... --captions pairs.jsonl
    """
    import functools
    import warnings

    # for this invocation only: catch_warnings restores Python's showwarning when the command ends
    click.get_current_context().with_resource(warnings.catch_warnings())
    warnings.showwarning = functools.partial(show_warning, _default=warnings.showwarning)


def long_job_options(command):
    """--resume, --shard, --num-shards, --batch-size, --decode-workers and the engine: the same
    meaning in every mode of `ttd tag` and `ttd segment` (the one job runner, ttd/jobs/runner.py)."""
    for option in reversed([
        click.option("--resume", is_flag=True,
                     help="Continue OUTPUT.partial of an interrupted run (even one killed with SIGKILL): every item "
                          "ends up in OUTPUT exactly once. Refused if the job's inputs or settings changed."),
        click.option("--shard", type=click.IntRange(0), default=0, show_default=True,
                     help="Tag only the items at positions p with p mod NUM_SHARDS = SHARD (e.g. $SLURM_ARRAY_TASK_ID)."),
        click.option("--num-shards", type=click.IntRange(1), default=1, show_default=True,
                     help="Number of --shard jobs; their outputs concatenate into the whole job's output "
                          "(each record has its input position in \"index\")."),
        click.option("--batch-size", type=BatchSize(), default=None,
                     help="Images per batch, decoded together ahead of the model: the centre crop's encoder call "
                          "(default 32); whole images: also the windows per encoder call, whichever images they "
                          "come from (default 8: full-size images are held in memory). auto: by device (a GPU: "
                          "256, whole images 64; a CPU: the defaults)."),
        click.option("--decode-workers", type=click.IntRange(0), default=None,
                     help="Processes that decode the next batches while the model runs the current one "
                          "(0: one decoding thread in this process); they import no torch and hand images back "
                          "through shared memory. Default: cores − 2, or 0 below 4 cores."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this process (+ decoding workers); ray: Ray Data with a pool of Tagger actors "
                          "(local Ray, or the cluster at --ray-address); the same records, --resume and --shard."),
        click.option("--ray-address", default=None, help="Ray cluster address for --engine ray (default: a local Ray)."),
        click.option("--actors", type=click.IntRange(1), default=None,
                     help="--engine ray: Tagger actors (default: one per GPU, else CPUs / 2)."),
    ]):
        command = option(command)
    return command


def check_inputs(captions, images, other: str, other_value) -> None:
    """A job's items: a captions file, or IMAGES with `other` (e.g. "--vocabulary FILE") naming what
    they are tagged against; exactly one of the two."""
    if (captions is None) == (other_value is None):
        fail(f"give exactly one of --captions FILE or {other}")
    if other_value is not None and not images:
        fail(f"{other.split()[0]} needs image files or folders as arguments")
    if captions is not None and images:
        fail("with --captions, images come from the captions file; do not also pass image arguments")


def run_on_engine(engine: str, step, captions: Path | None, images: tuple[Path, ...], output: Path, job: dict,
                  options, tagger_options: dict, local_tagger, ray_address: str | None = None,
                  actors: int | None = None, templates: tuple[str, ...] | None = None, inputs=(), explicit_images=()):
    """Run a job's step with the chosen executor: here (`local_tagger()` loads the Tagger) or on Ray
    (every actor loads it from `tagger_options`)."""
    if engine == "ray":
        if "auto" in (tagger_options.get("backend"), tagger_options.get("dtype")):
            fail("--engine ray needs an explicit --backend and --dtype: auto would choose for this machine, "
                 "not for the Ray workers")
        if given_options("decode_workers"):
            fail("--decode-workers applies to --engine local (Ray actors decode their own batches); leave it out")
        from ttd.jobs.ray_executor import RayJob, run_ray_job

        return run_ray_job(RayJob(None if captions is None else str(captions), [str(i) for i in images], output,
                                  tagger_options, actors, ray_address, templates=templates), step, job, options)
    if given_options("ray_address", "actors"):
        fail(f"{', '.join(given_options('ray_address', 'actors'))} apply to --engine ray; leave them out")
    from ttd.data.items import open_items
    from ttd.jobs.runner import run_job

    return run_job(local_tagger(), step, open_items(captions, images), output, job, options, inputs, explicit_images)


def comma_floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        fail(f"{name} {text!r}: give positive numbers separated by commas, e.g. 1,1.5")
    return values


def whole_image_options(f):
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


def make_segment_options(crop, scales, stride, mask_threshold, pamr):
    from ttd.segment.segmentation import SegmentOptions

    return SegmentOptions(crop=crop, scales=comma_floats(scales, "--scales"), stride=stride, mask_threshold=mask_threshold,
                          pamr=pamr)


def read_classes(classes: str) -> list[str]:
    """--classes: a file (one name a line) or a comma list."""
    from ttd.data.inputs import read_vocabulary

    path = Path(classes)
    names = read_vocabulary(path) if path.is_file() else [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        fail(f"--classes {classes!r}: no class names (give a comma list or a file with one name a line)")
    return names
