"""Texts a job will need soon take the padding rows of the text encoder calls it makes now.

The Tagger encodes texts `text_rows` a call, a short call padded with copies (ttd/runtime/tagger.py
TEXT_ROWS): the 32 captions of a batch, in two or three length buckets, pad about a third of
their rows. A job reads its items a few batches ahead of its record stage; announced there, their
captions fill those padding rows, and their embeddings wait here until their batch asks for them
(docs/benchmarks.md, P9). A text's embedding depends on the text alone, so the records are the same
bytes whether or not anything was announced, or in time.
"""

from __future__ import annotations

import threading

import numpy as np

from ttd.runtime.tagger import Tagger

# announced or ready texts kept at most: a job announces a few batches ahead, so only texts that
# are never asked for (an item that fails to decode) pile up, and the oldest go first
LIMIT = 4096


class TextsAhead:
    """Embeddings of a stream of texts, each computed once, announced texts filling short calls.
    `announce` may be called from one thread while another calls `embeddings`."""

    def __init__(self, tagger: Tagger, limit: int = LIMIT) -> None:
        self.tagger, self.limit = tagger, limit
        self._lock = threading.Lock()
        self._announced: dict[str, None] = {}  # insertion-ordered set: oldest first
        self._ready: dict[str, np.ndarray] = {}

    def announce(self, text: str) -> None:
        """`text` will be asked for soon."""
        with self._lock:
            if text in self._ready or text in self._announced:
                return
            self._announced[text] = None
            _trim(self._announced, self.limit)

    def embeddings(self, texts: list[str]) -> np.ndarray:
        """[T, D], as `Tagger.encode_texts(texts)`; a text computed ahead is handed out once."""
        distinct = list(dict.fromkeys(texts))
        with self._lock:
            have = {text: self._ready.pop(text) for text in distinct if text in self._ready}
            needed = [text for text in distinct if text not in have]
            for text in needed:
                self._announced.pop(text, None)
            spare = list(self._announced)
        embeds, filled = self.tagger.encode_texts_filled(needed, spare)
        have.update(zip(needed, embeds))
        with self._lock:
            for text, embed in filled.items():
                if self._announced.pop(text, False) is None:  # not asked for meanwhile
                    self._ready[text] = embed
            _trim(self._ready, self.limit)
        if not texts:
            return np.zeros((0, self.tagger.config.embed_dim), np.float32)
        return np.stack([have[text] for text in texts])


def _trim(entries: dict, limit: int) -> None:
    while len(entries) > limit:
        entries.pop(next(iter(entries)))
