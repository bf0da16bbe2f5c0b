"""Recall by kind of tag (colour, shape, texture, background) and the selection rate of absent tags.

A single number hides which tags a scorer throws away: the paper's per-pixel softmax keeps the
colour of "orange heart" and drops the shape. The kind of a tag is looked up in a small lexicon
(the world's words plus common English ones); "absent" is every candidate that names nothing in
the image, whatever its word, and its figure is the fraction selected (lower is better).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

KINDS = ("colour", "shape", "texture", "background", "absent")
KIND_WORDS: dict[str, frozenset[str]] = {
    "colour": frozenset("red green blue yellow purple orange pink brown black white grey gray gold silver violet "
                        "beige cyan magenta".split()),
    "shape": frozenset("circle square triangle star cross ring diamond heart rectangle oval hexagon sphere cube "
                       "line arrow".split()),
    "texture": frozenset("striped stripes dotted dots spotted plain checked checkered wooden metal metallic furry "
                         "shiny rough smooth woven".split()),
    "background": frozenset("grass sand water stone snow sky sea beach field road wall floor forest street "
                            "ground".split()),
}


def tag_kind(tag: str) -> str | None:
    """The kind of a tag word, or None when the lexicon does not know it."""
    for kind, words in KIND_WORDS.items():
        if tag in words:
            return kind
    return None


@dataclass
class KindCounts:
    """Accumulates one scorer's decisions per kind of tag."""

    selected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def add(self, tags: Iterable[str], selected: Iterable[bool], relevant: Iterable[bool]) -> None:
        for tag, chosen, present in zip(tags, selected, relevant):
            kind = tag_kind(tag) if present else "absent"
            if kind is None:
                continue
            self.total[kind] += 1
            self.selected[kind] += int(bool(chosen))

    def summary(self) -> dict[str, dict[str, float]]:
        """{kind: {"recall": share of the present tags of that kind selected, "count": n}} and
        {"absent": {"selected": share of absent candidates selected, "count": n}}; a kind with
        no tag in the data gets None (the world has no texture words)."""
        out: dict[str, dict[str, float]] = {}
        for kind in KINDS:
            share = self.selected[kind] / self.total[kind] if self.total[kind] else None
            out[kind] = {"selected" if kind == "absent" else "recall": share, "count": self.total[kind]}
        return out
