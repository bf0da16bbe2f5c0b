"""Tokenizers that return int64 numpy ids and warn (never silently) when a text is truncated.

Two kinds: open_clip's own tokenizer for a named architecture, and a small word-level
tokenizer (vocabulary stored in the checkpoint) used by the world models, whose token
embedding would otherwise dwarf the rest of a tiny model.
"""

from __future__ import annotations

from ttd.errors import InputError, TTDWarning
import re
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

WORD_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class TruncationWarning(TTDWarning):
    """A text was longer than the model's context length and was cut."""


class Tokenizer(Protocol):
    context_length: int

    def __call__(self, texts: list[str]) -> np.ndarray: ...


def _warn_truncated(text: str, n_tokens: int, context_length: int) -> None:
    shown = text if len(text) <= 60 else text[:57] + "..."
    warnings.warn(
        f"text {shown!r} has {n_tokens} tokens, more than the {context_length - 2} that fit the "
        f"context length {context_length}; it was truncated",
        TruncationWarning,
        stacklevel=3,
    )


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
                _warn_truncated(text, len(words), self.context_length)
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
                    _warn_truncated(text, n_tokens, self.context_length)
        return np.asarray(self.inner(texts, context_length=self.context_length), dtype=np.int64)


def build_tokenizer(spec: dict[str, Any], context_length: int) -> Tokenizer:
    """Build from a checkpoint's `tokenizer` entry: {"kind": "words", "vocabulary": [...]} or {"kind": "open_clip", "name": ...}."""
    kind = spec.get("kind")
    if kind == "words":
        return WordTokenizer(list(spec["vocabulary"]), context_length)
    if kind == "open_clip":
        return OpenClipTokenizer(spec["name"], context_length)
    raise InputError(f"unknown tokenizer kind {kind!r}; expected 'words' or 'open_clip'")
