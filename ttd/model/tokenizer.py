"""Tokenizers that return int64 numpy ids and warn (never silently) when a text is truncated.

Three kinds: open_clip's own tokenizer for a named architecture; the same CLIP BPE without torch
from an export's files (ttd/model/clip_bpe.py: the base install, docs/edge.md); and a small
word-level tokenizer (vocabulary stored in the checkpoint) used by the world models, whose token
embedding would otherwise dwarf the rest of a tiny model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ttd.errors import InputError
from ttd.model.torch_extra import INSTALL_TORCH, TorchMissing, installed
from ttd.model.truncation import TruncationWarning, warn_truncated  # noqa: F401 - part of this module's API

WORD_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class Tokenizer(Protocol):
    context_length: int

    def __call__(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class WordTokenizer:
    """Lower-cased word tokens; ids: 0 pad, 1 unknown, 2 start, words, last id = end (argmax pooling)."""

    vocabulary: list[str]
    context_length: int = 32

    def __post_init__(self) -> None:
        self.word_to_id = {word: i + 3 for i, word in enumerate(self.vocabulary)}
        self.start_id = 2
        self.end_id = len(self.vocabulary) + 3

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary) + 4

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            words = [self.word_to_id.get(w, 1) for w in WORD_PATTERN.findall(text.lower())]
            if len(words) > self.context_length - 2:
                warn_truncated(text, len(words), self.context_length)
                words = words[: self.context_length - 2]
            tokens = [self.start_id, *words, self.end_id]
            ids[row, : len(tokens)] = tokens
        return ids


class OpenClipTokenizer:
    """open_clip's tokenizer for a named model, with the truncation warning it lacks."""

    def __init__(self, model_name: str, context_length: int) -> None:
        import open_clip

        self.inner = open_clip.get_tokenizer(model_name, context_length=context_length)
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        encode = getattr(self.inner, "encode", None)
        if encode is not None:
            for text in texts:
                n_tokens = len(encode(text))
                if n_tokens > self.context_length - 2:
                    warn_truncated(text, n_tokens, self.context_length)
        return np.asarray(self.inner(texts, context_length=self.context_length), dtype=np.int64)


def build_tokenizer(spec: dict[str, Any], context_length: int) -> Tokenizer:
    """Build from a checkpoint's `tokenizer` entry: {"kind": "words", "vocabulary": [...]} or {"kind": "open_clip", "name": ...}."""
    kind = spec.get("kind")
    if kind == "words":
        return WordTokenizer(list(spec["vocabulary"]), context_length)
    if kind == "clip_bpe":  # an export's own BPE files (ttd.runtime.export_dir): no torch needed
        from ttd.model.clip_bpe import SPECIAL_TOKENS, ClipBpeTokenizer

        return ClipBpeTokenizer(Path(spec["path"]), context_length, spec.get("clean", "lower"),
                                tuple(spec.get("special_tokens", SPECIAL_TOKENS)))
    if kind == "open_clip":
        if not installed("open_clip"):
            raise TorchMissing(f"the tokenizer of {spec.get('name')!r} is open_clip's, which this install leaves out: "
                               f"{INSTALL_TORCH}, or tokenise with an export made by `ttd export` (it carries a "
                               "torch-free tokenizer)")
        return OpenClipTokenizer(spec["name"], context_length)
    raise InputError(f"unknown tokenizer kind {kind!r}; expected 'words', 'open_clip' or 'clip_bpe'")


def torch_free_spec(tokenizer: Tokenizer) -> dict[str, Any] | None:
    """What an export writes (tokenizer.json, beside the BPE merges file) so that a runtime without
    torch tokenises as `tokenizer` does: {"kind": "clip_bpe", "merges": file name, "clean": mode,
    "special_tokens": [...]} for open_clip's CLIP BPE; None for a tokenizer that needs no files
    (words) or that only its own library reproduces (open_clip's Hugging Face tokenizers)."""
    inner = getattr(tokenizer, "inner", None)
    if inner is None or type(inner).__name__ != "SimpleTokenizer" or getattr(inner, "reduction_fn", None):
        return None
    from ttd.model.clip_bpe import CLEAN_MODES, MERGES_FILE

    modes = {f"_clean_{mode}": mode for mode in CLEAN_MODES}
    mode = modes.get(getattr(inner.clean_fn, "__name__", ""))
    if mode is None:
        return None
    specials = [inner.decoder[i] for i in inner.all_special_ids]
    return {"kind": "clip_bpe", "merges": MERGES_FILE, "clean": mode, "special_tokens": specials}
