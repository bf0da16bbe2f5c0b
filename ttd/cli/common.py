"""What every `ttd` command shares: the `main` group, the model options, errors, and the options
of long jobs and of whole-image inference (one option name means one thing in every command)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ttd.errors import TTDError
from ttd.options import MODEL, SETTINGS, BatchSize, Precision, setting_options

__all__ = ["Precision", "TTDGroup", "echo_line", "fail", "main", "model_options"]


def model_options(f):
    """--model / --pretrained / --checkpoint / --dense-mode (ttd/options.py), for commands that load a
    model without running it on a backend (export, train)."""
    return setting_options(*MODEL)(f)


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


def echo_line(line: str) -> None:
    """A line for the user on stderr (stdout holds a command's results)."""
    click.echo(line, err=True)


class TTDGroup(click.Group):
    """The `ttd` group: an error the user can cause (a TTDError, or the system's OSError about a path
    or a device) is one line and exit status 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TTDError as error:
            fail(error)
        except ModuleNotFoundError as error:  # a command of the `torch` extra on the base install (docs/edge.md)
            from ttd.model.torch_extra import as_missing_extra

            missing = as_missing_extra(error, f"`ttd {ctx.invoked_subcommand}`")
            if missing is None:
                raise
            fail(missing)
        except OSError as error:  # the system's answer about a path or a device (disk full, permission)
            if error.filename is None and error.errno is None:
                raise
            fail(error)


@click.group(cls=TTDGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    f = SETTINGS["mask_threshold"].option(f)
    f = SETTINGS["flip_tta"].option(f)
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
