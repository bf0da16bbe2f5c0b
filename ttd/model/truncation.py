"""The warning every tokenizer gives when a text is longer than the model's context length
(architecture.md §3.2: captions are truncated with a warning that says so, never silently)."""

from __future__ import annotations

import warnings

from ttd.errors import TTDWarning


class TruncationWarning(TTDWarning):
    """A text was longer than the model's context length and was cut."""


def warn_truncated(text: str, n_tokens: int, context_length: int) -> None:
    shown = text if len(text) <= 60 else text[:57] + "..."
    warnings.warn(
        f"text {shown!r} has {n_tokens} tokens, more than the {context_length - 2} that fit the "
        f"context length {context_length}; it was truncated",
        TruncationWarning,
        stacklevel=3,
    )
