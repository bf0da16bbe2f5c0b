"""CLIP's byte-pair tokenizer without torch: what an export of an open_clip model tokenises with
on the base install (docs/edge.md).

open_clip's `SimpleTokenizer` (OpenAI CLIP's BPE, 49,408 ids) imports torch; this is the same
algorithm over the same merges file (`bpe_simple_vocab_16e6.txt.gz`, copied into every export of
an open_clip model), returning numpy ids. tests/model/test_clip_bpe.py holds it equal to
open_clip's tokenizer on a corpus with Unicode, HTML entities and over-long captions: the same
ids, truncation (the last kept id becomes end-of-text) and zero padding.
"""

from __future__ import annotations

import gzip
import html
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ttd.errors import InputError
from ttd.model.truncation import warn_truncated

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # the merges CLIP's vocabulary uses (lines 1..48894 of the file)
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
CLEAN_MODES = ("lower", "whitespace", "canonicalize")


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Every byte as a printable character, so that BPE never meets whitespace or control bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def basic_clean(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def canonicalize(text: str) -> str:
    """Lower case, punctuation removed (big_vision's prompt canonicalisation, as open_clip's)."""
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    return " ".join(text.split()).strip()


def clean(text: str, mode: str) -> str:
    if mode == "lower":
        return whitespace_clean(basic_clean(text)).lower()
    if mode == "whitespace":
        return whitespace_clean(basic_clean(text))
    if mode == "canonicalize":
        return canonicalize(basic_clean(text))
    raise InputError(f"unknown tokenizer clean mode {mode!r}; choose one of {', '.join(CLEAN_MODES)}")


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


@dataclass
class ClipBpeTokenizer:
    """ids [N, context_length] int64: start, the text's BPE ids, end, zeros; a text too long is cut
    to context_length ids whose last is end-of-text (open_clip's truncation)."""

    merges_path: Path
    context_length: int = 77
    clean: str = "lower"
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS
    cache: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        import regex

        if self.clean not in CLEAN_MODES:
            raise InputError(f"unknown tokenizer clean mode {self.clean!r}; choose one of {', '.join(CLEAN_MODES)}")
        try:
            lines = gzip.open(self.merges_path).read().decode("utf-8").split("\n")
        except OSError as error:
            raise InputError(f"{self.merges_path}: not a readable BPE merges file ({error})") from None
        merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *self.special_tokens]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache.update({t: t for t in self.special_tokens})
        self.start_id, self.end_id = self.encoder[self.special_tokens[0]], self.encoder[self.special_tokens[1]]
        self.byte_encoder = bytes_to_unicode()
        self.pattern = regex.compile("|".join(self.special_tokens)
                                     + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        """The token's symbols after every merge that applies, lowest rank first, space-separated."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        """The BPE ids of a text, without start and end."""
        ids: list[int] = []
        for token in self.pattern.findall(clean(text, self.clean)):
            symbols = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(symbols).split(" "))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.start_id, *self.encode(text), self.end_id]
            if len(tokens) > self.context_length:
                warn_truncated(text, len(tokens) - 2, self.context_length)
                tokens = tokens[: self.context_length]
                tokens[-1] = self.end_id
            ids[row, : len(tokens)] = tokens
        return ids
