"""The export contract of docs/architecture.md §4, named once: the three graphs, their input and output names,
the Triton models that serve them, and the named results every backend returns.

The exporter, the backends, the Triton templates and the validator import these names; none of
them retypes a name, so a renamed or added output changes here and everywhere follows. Free of
torch, so that the Triton Python-backend stubs can import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, TypeVar

from ttd.errors import InputError
from ttd.model.config import SCORE_METHODS

if TYPE_CHECKING:  # numpy only names the field types: the Triton stubs and the CLI import this cheaply
    import numpy as np


class ImageEmbeddings(NamedTuple):
    """What the image encoder returns (unit vectors)."""

    image_embeds: np.ndarray  # [B, D]
    patch_embeds: np.ndarray  # [B, D, h, w]


# The version of the contract an export was written with (manifest "contract"): 2 made the tag head
# the scoring function itself (ttd.model.scoring.tag_head). A runtime refuses any other version.
CONTRACT_VERSION = 2

# The rows of `tag_scores`: every pixel-tag score (ttd/model/scoring.py), then the raw best-pixel cosine.
SCORE_ROWS: tuple[str, ...] = (*SCORE_METHODS, "peak_cosine")

ScoreArray = TypeVar("ScoreArray")  # a numpy array or a torch tensor: the row is cut the same way


def score_row(tag_scores: ScoreArray, score: str) -> ScoreArray:
    """One score [..., K] out of the tag head's [..., len(SCORE_ROWS), K] (numpy or torch): the one
    place a score's row is looked up, for training, the runtime Tagger and whole-image maps."""
    if score not in SCORE_ROWS:
        raise InputError(f"unknown score {score!r}; choose one of {', '.join(SCORE_ROWS)}")
    return tag_scores[..., SCORE_ROWS.index(score), :]  # type: ignore[index]


class TagHeadOutputs(NamedTuple):
    """What the tag head returns for B images with K tags each (docs/architecture.md §3.3)."""

    tag_scores: np.ndarray  # [B, len(SCORE_ROWS), K]: every score; padded tags 0
    tag_cosines: np.ndarray | None  # [B, K, h, w]: view-averaged cosine maps (masks: sigmoid(w·cos + b)); None unless asked for


class Graph(NamedTuple):
    """One exported graph: its file stem, its input and output names, and its Triton model."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    served_as: str


IMAGE_ENCODER = Graph("image_encoder", ("pixel_values",), ImageEmbeddings._fields, "ttd_image_encoder")
TEXT_ENCODER = Graph("text_encoder", ("input_ids",), ("text_embeds",), "ttd_text_encoder")
# patch_views [B, V, D, h, w]; tag_embeds [B, K, D]; tag_valid [B, K] bool; negative_embeds [B, N, D];
# negative_margin [B, 1] (the tag inputs may have a leading 1 instead of B outside Triton: one vocabulary)
TAG_HEAD = Graph("tag_head", ("patch_views", "tag_embeds", "tag_valid", "negative_embeds", "negative_margin"),
                 TagHeadOutputs._fields, "ttd_tag_head")
GRAPHS: dict[str, Graph] = {g.name: g for g in (IMAGE_ENCODER, TEXT_ENCODER, TAG_HEAD)}
GRAPH_NAMES: tuple[str, ...] = tuple(GRAPHS)
SERVED_GRAPHS: dict[str, str] = {g.served_as: g.name for g in GRAPHS.values()}  # Triton model -> graph

TAGGER_MODEL = "ttd_tagger"  # the BLS model: encoded image and caption (or tags) in, tags out
TAGGER_INPUTS: tuple[str, ...] = ("image", "caption", "tags", "return_masks")  # the image first: the one required
TAGGER_OUTPUTS: tuple[str, ...] = ("tags", "scores", "selected", "masks")
EMBEDDING_NAMES: tuple[str, ...] = (*ImageEmbeddings._fields, *TEXT_ENCODER.outputs)  # what gates compare

# Triton model repositories: flavour -> the engines its graph models can run, and instance kinds
# (fused: one Python-backend tagger holding the runtime backend of that engine, docs/serving.md)
TRITON_ENGINES: dict[str, tuple[str, ...]] = {"python": ("onnx", "torch"), "native": ("onnx", "tensorrt"),
                                              "fused": ("onnx", "torch", "tensorrt")}
FUSED_IMAGE_INPUT = "image_rgb"  # the fused tagger's other image input: uint8 RGB at the model's size
INSTANCE_KINDS: tuple[str, ...] = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")
