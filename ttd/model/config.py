"""ModelConfig: everything besides the weights that a TTD model, its exports and its runtimes
need. Free of torch, so that runtimes (the Triton Python backend among them) can import it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ttd.errors import InputError

SCORE_METHODS: tuple[str, ...] = ("negatives", "softmax", "minmax", "sigmoid")
DEFAULT_SCORE_METHOD = "negatives"  # won held-out F1 at precision ≥ 97 %: README "Choosing the pixel-tag score"
# Stage-2 targets: what is min-max normalised over the pixels (docs/training.md: "mask", the paper's, collapses)
TARGET_NORMS: tuple[str, ...] = ("mask", "cosine", "mixed")
DEFAULT_TARGET_NORM = "mixed"
DEFAULT_TARGET_MASK_SHARE = 0.75  # mixed: the mask's share of the blend (the rest: the cosine's); docs/training.md
OBJECTIVES: tuple[str, ...] = ("ttd", "clip")  # ttd.train.loop.OBJECTIVE_DEFAULTS holds their defaults
DEFAULT_THRESHOLD = 0.5  # δ: a tag is selected when its score ≥ δ (tagging, Stage 1 of training, evaluation, serving)
DEFAULT_MASK_THRESHOLD = 0.5  # θ: a binary mask is a sigmoid mask ≥ θ
# one precision vocabulary for `ttd tag`, `train`, `export` and `triton build`; the long torch
# names are accepted as aliases where a command used to take them
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
INT8_MODES: tuple[str, ...] = ("dynamic", "static")  # int8: weight-only dynamic, or calibrated static QDQ
DENSE_MODES: tuple[str, ...] = ("avg", "maskclip", "clearclip")
MAX_IMAGE_SIZE = 4096  # a ViT input side far beyond any CLIP; larger values only exhaust memory

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a photo of many {}.",
    "{}",
)
# the `negatives` score (ttd/model/negatives.py): generic words that match every image and no region
DEFAULT_NEGATIVE_PROMPTS = ("photo", "picture", "image", "scene", "view")
DEFAULT_NEGATIVE_MARGIN = 2.2  # logit; fitted on the world's calibration split (benchmarks/scorers.py)
# the margin is fitted per model (ttd/evaluation/calibrate.py) for the best F1 at this precision, by default
# on the world's calibration split: never trained on (training: 1, 11+) nor evaluated on (2)
DEFAULT_MIN_PRECISION = 0.97
CALIBRATION_SEED, CALIBRATION_COUNT = 7, 500
# label-free calibration (ttd/evaluation/label_free.py): the margin is where at most this share of the
# Gaussian fitted to the null's peak would be selected; chosen on labelled world pairs held out for it
# (seed LABEL_FREE_SELECTION_SEED): the best worst-model F1 among rates with precision ≥ DEFAULT_MIN_PRECISION
# for every model (docs/calibration.md)
DEFAULT_MAX_FALSE_RATE = 1e-4
LABEL_FREE_SELECTION_SEED = 5
DEFAULT_LABEL_FREE_PAIRS = 1000  # pairs a label-free fit reads at most (the margin's spread at 300: docs/calibration.md)
# sets of negative prompts label-free calibration can choose from (`ttd calibrate --choose-negatives`)
NEGATIVE_PROMPT_CANDIDATES: tuple[tuple[str, ...], ...] = (
    DEFAULT_NEGATIVE_PROMPTS,
    ("photo", "picture", "image"),
    ("photo", "picture", "image", "scene", "view", "background"),
    ("thing", "object", "stuff", "something"),
    ("photo", "thing", "object", "background"),
    ("background", "texture", "pattern", "surface"),
)


def canonical_precision(name: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """`name` (or its torch alias: float32, bfloat16, float16) as one of `allowed`; ValueError otherwise."""
    canonical = PRECISION_ALIASES.get(name, name)
    if canonical not in allowed:
        raise InputError(f"unknown precision {name!r}; choose one of {', '.join(allowed)}")
    return canonical


@dataclass
class ModelConfig:
    """Everything besides the weights that a TTD model, its exports and its runtimes need."""

    name: str
    model_cfg: dict[str, Any]
    tokenizer: dict[str, Any]
    source: str = "random-init"
    dense_mode: str = "clearclip"
    image_size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    prompt_templates: tuple[str, ...] = DEFAULT_TEMPLATES
    tau: float = 100.0
    mask_weight_init: float = 10.0
    mask_bias_init: float = -2.5
    negative_prompts: tuple[str, ...] = DEFAULT_NEGATIVE_PROMPTS
    negative_margin: float = DEFAULT_NEGATIVE_MARGIN
    # how negative_margin was fitted to these weights ({"method": "labelled" | "label-free", ...});
    # None: never fitted to them (inherited or a default), and loading it for tagging warns
    margin_fit: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def grid_size(self) -> tuple[int, int]:
        patch = self.model_cfg["vision_cfg"]["patch_size"]
        return self.image_size // patch, self.image_size // patch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown model config keys: {sorted(unknown)}")
        missing = {"name", "model_cfg", "tokenizer"} - set(data)
        if missing:
            raise InputError(f"model config lacks {', '.join(sorted(missing))}")
        data = dict(data)
        for key in ("mean", "std", "prompt_templates", "negative_prompts"):
            if key in data:
                if not isinstance(data[key], (list, tuple)):
                    raise InputError(f"model config {key} must be a list, got {data[key]!r}")
                data[key] = tuple(data[key])
        config = cls(**data)
        config.check()
        return config

    def check(self) -> None:
        """ValueError naming the first setting that cannot work (a config file edited by hand or
        damaged must fail here, not as a MemoryError or NaN scores deep inside a run)."""
        cfg = self.model_cfg
        if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("vision_cfg", "text_cfg")) \
                or not isinstance(cfg.get("embed_dim"), int):
            raise InputError("model config model_cfg must hold embed_dim, vision_cfg and text_cfg")
        vision_size = cfg["vision_cfg"].get("image_size", 224)
        sides = [("image_size", self.image_size)] + [("model_cfg.vision_cfg.image_size", v) for v in
                                                      (vision_size if isinstance(vision_size, (list, tuple)) else [vision_size])]
        for name, size in sides:
            if not isinstance(size, int) or not 8 <= size <= MAX_IMAGE_SIZE:
                raise InputError(f"model config {name} {size!r} must be an integer in 8..{MAX_IMAGE_SIZE}")
        if not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau) or self.tau <= 0:
            raise InputError(f"model config tau {self.tau!r} must be a finite number > 0")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in self.std):
            raise InputError(f"model config mean/std must be 3 numbers each, std > 0; got {self.mean}, {self.std}")
        if self.dense_mode not in DENSE_MODES:
            raise InputError(f"model config dense_mode {self.dense_mode!r} must be one of {', '.join(DENSE_MODES)}")
        if not self.negative_prompts or not all(isinstance(p, str) and p.strip() for p in self.negative_prompts):
            raise InputError(f"model config negative_prompts {self.negative_prompts!r} must be a non-empty list of words")
        if not isinstance(self.negative_margin, (int, float)) or not math.isfinite(self.negative_margin):
            raise InputError(f"model config negative_margin {self.negative_margin!r} must be a finite number")
        if self.margin_fit is not None and not (isinstance(self.margin_fit, dict) and "method" in self.margin_fit):
            raise InputError(f"model config margin_fit {self.margin_fit!r} must be null or an object with a method")
        if not self.prompt_templates:
            raise InputError("model config prompt_templates is empty")
        for template in self.prompt_templates:
            try:
                ok = isinstance(template, str) and template.format("x") != template.format("y")
            except (IndexError, KeyError, ValueError):
                ok = False
            if not ok:
                raise InputError(f"model config prompt template {template!r} must be text with one {{}} for the tag")
