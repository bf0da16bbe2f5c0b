"""The runtime settings, each described once: name, type, default and help.

The same description generates the click option of every command that takes the setting, gives
`ttd.load` its defaults (a test holds the two equal), and names what a job record keeps for
`--resume`. A setting means one thing everywhere, so a command never declares it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ttd.errors import InputError
from ttd.model.config import (DEFAULT_MASK_THRESHOLD, DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD, DENSE_MODES,
                              PRECISION_ALIASES, SCORE_METHODS, canonical_precision)
from ttd.runtime.backends import BACKENDS

DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

DEFAULT_BACKEND = "torch"
DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE = "fp32"
DEFAULT_THREADS = 0

F = TypeVar("F", bound=Callable[..., Any])


class Precision(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """One of `choices`; the torch names float32, bfloat16 and float16 are accepted for the short ones."""

    name = "precision"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.choices) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value in self.choices:
            return str(value)
        try:
            return canonical_precision(value, tuple(c for c in self.choices if c != "auto"))
        except ValueError:
            self.fail(f"{value!r} is not one of {', '.join(self.choices)} "
                      f"(or {', '.join(a for a, c in PRECISION_ALIASES.items() if c in self.choices)})", param, ctx)


class BatchSize(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """A number of images ≥ 1, or "auto": chosen for the device (ttd.runtime.hardware.auto_batch_size)."""

    name = "batch_size"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[N|auto]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str | None:
        if value is None or isinstance(value, int) or value == "auto":
            return value  # type: ignore[no-any-return]
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is not a number of images ≥ 1 or auto", param, ctx)


def resolved_batch_size(batch_size: int | str | None, device: str | None, crop: str, default: int) -> int:
    """--batch-size as given; "auto": by device (a GPU's batch, or the CPU default); unset: `default`."""
    if batch_size == "auto":
        from ttd.runtime.hardware import auto_batch_size

        return auto_batch_size(device, crop)
    return int(batch_size) if batch_size else default


UNIT_INTERVAL = click.FloatRange(0, 1, min_open=True, max_open=True)


@dataclass(frozen=True)
class Setting:
    """One runtime setting: its flag, the Python name `ttd.load` and the jobs know it by, its type,
    default and help."""

    flag: str
    name: str
    default: Any
    help: str
    type: Any = None
    is_flag: bool = False

    def option(self, command: F) -> F:
        """`command` with this setting's click option."""
        if self.is_flag:
            return click.option(self.flag, self.name, is_flag=True, default=False, help=self.help)(command)
        return click.option(self.flag, self.name, type=self.type, default=self.default,
                            show_default=self.default is not None, help=self.help)(command)


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("--model", "model", None,
            "open_clip architecture (e.g. ViT-B-16) or a registered config (world-tiny). Without --model, "
            "--checkpoint or --export-dir, the embedded default world model is used."),
    Setting("--pretrained", "pretrained", None,
            "open_clip pretrained tag (needs the hub) or a local open_clip weights file."),
    Setting("--checkpoint", "checkpoint", None, "A TTD checkpoint (.safetensors with its .json beside it).",
            click.Path(dir_okay=False)),
    Setting("--dense-mode", "dense_mode", None,
            "Dense patch features: avg (average-pooled towers), maskclip, clearclip (default: the checkpoint's, "
            "else clearclip for CLS-pooled towers).", click.Choice(DENSE_MODES)),
    Setting("--backend", "backend", DEFAULT_BACKEND,
            "Runtime backend. onnxruntime, tensorrt and triton run an export (--export-dir); auto: the fastest "
            "gated path for this hardware (onnxruntime with --export-dir, torch otherwise), saying what it "
            "picked and why.", click.Choice(("auto", *BACKENDS))),
    Setting("--export-dir", "export_dir", None,
            "Export directory from `ttd export` (onnxruntime, tensorrt, triton; with torch: run the export's "
            "own weights).", click.Path(file_okay=False)),
    Setting("--url", "url", None, "Triton server URL for --backend triton (host:port, default 127.0.0.1:8000)."),
    Setting("--device", "device", DEFAULT_DEVICE, "auto (cuda if available), cpu, cuda, cuda:1 ..."),
    Setting("--dtype", "dtype", DEFAULT_DTYPE,
            "Torch backend weights; bf16 is ~5x faster on CPUs with AMX (and slower without). auto: fp16 on a "
            "GPU, bf16 with AMX or avx512_bf16, else fp32.", Precision(DTYPES)),
    Setting("--threads", "threads", DEFAULT_THREADS,
            "CPU threads for the torch and onnxruntime backends (0: all cores).", click.IntRange(0)),
    Setting("--threshold", "threshold", DEFAULT_THRESHOLD,
            "δ: a tag is selected when its score ≥ δ (0 selects every candidate).", click.FloatRange(0, 1)),
    Setting("--score", "score_method", DEFAULT_SCORE_METHOD,
            "Pixel-tag score: negatives = each tag against the model's negative prompts at its best pixel (tags "
            "naming the same pixels, 'orange heart', both pass); softmax over the caption's tags (the paper's: "
            "co-located tags exclude each other), minmax of the best-pixel cosine, or sigmoid mask peak (suits "
            "large vocabularies, where a softmax over thousands of tags is flat).", click.Choice(SCORE_METHODS)),
    Setting("--flip-tta", "flip_tta", False, "Average the maps of each image (window) and its mirror image.",
            is_flag=True),
    Setting("--mask-threshold", "mask_threshold", DEFAULT_MASK_THRESHOLD,
            "θ: a pixel is in a mask when M ≥ θ; below θ for every class it is background.", UNIT_INTERVAL),
)}

# a job's setting, not the model's (so not in SETTINGS, which are ttd.load's): where `ttd tag`
# decodes JPEGs (docs/gpu.md, "GPU decoding"); ttd.Job(decode=...) takes the same values
DECODE_PLACES: tuple[str, ...] = ("host", "device")
DECODE = Setting("--decode", "decode", "host",
                 "Where ttd tag decodes JPEGs. host: PIL on the CPU cores (exact; the default). device: nvJPEG on "
                 "the GPU (torchvision), turned by EXIF, resized and centre-cropped there; kept only if the first "
                 "batch's tag decisions agree with PIL's on ≥ 99 %, else the job says so and PIL decodes. Other "
                 "files (PNG, CMYK JPEGs, ...) always go through PIL. Needs a CUDA GPU, --backend torch and "
                 "torchvision; centre crop only.", click.Choice(DECODE_PLACES))

MODEL = ("model", "pretrained", "checkpoint", "dense_mode")
# what every command that runs a model takes: which model, on what, how fast
RUNTIME = (*MODEL, "backend", "export_dir", "url", "device", "dtype", "threads")
SCORING = ("threshold", "score_method", "flip_tta")


def checked_settings(**values: Any) -> None:
    """Each value checked by its setting's own type, as the CLI checks it: `ttd.load(threshold=2)` is
    refused like `ttd tag --threshold 2`, with the same reason."""
    for name, value in values.items():
        setting = SETTINGS[name]
        if value is None or setting.type is None:
            continue
        try:
            setting.type.convert(value, None, None)
        except click.BadParameter as error:
            raise InputError(f"{name}={value!r}: {error.message}") from None


def setting_options(*names: str) -> Callable[[F], F]:
    """A decorator adding the click options of the named settings, in the order given."""
    def decorate(command: F) -> F:
        for name in reversed(names):
            command = SETTINGS[name].option(command)
        return command
    return decorate


def runtime_options(command: F) -> F:
    """The options of every command that runs a model (RUNTIME)."""
    return setting_options(*RUNTIME)(command)
