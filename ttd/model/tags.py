"""Caption -> candidate tags (DESIGN §3.2): lower-case words without punctuation or stopwords,
de-duplicated in order, with multi-word vocabulary names matched first, longest first."""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

# A fixed English stopword list (function words, pronouns, auxiliaries, frequent caption fillers
# that never name a visible thing are *not* here: they stay candidates, as in the paper).
STOPWORDS = frozenset(
    """
    a an the and or but nor so yet for of in on at to from by with without within into onto upon
    over under above below between among through during before after about against along across
    around behind beside besides beneath near off out up down than then there here this that these
    those it its it's itself i me my mine we us our ours you your yours he him his she her hers they
    them their theirs what which who whom whose when where why how is am are was were be been being
    have has had having do does did doing will would shall should can could may might must not no
    very too also just only all any both each few more most other some such same own s t as if
    while because until again further once next
    """.split()
)


def candidate_tags(
    caption: str,
    phrases: Iterable[str] = (),
    stopwords: frozenset[str] = STOPWORDS,
) -> list[str]:
    """The candidate tags of a caption, in order of first appearance.

    `phrases` are multi-word names ("traffic light"); where one matches consecutive words it
    becomes a single tag, longer phrases winning over shorter ones.
    """
    words = WORD.findall(caption.lower())
    phrase_words = sorted(
        {tuple(WORD.findall(p.lower())) for p in phrases if len(WORD.findall(p.lower())) > 1},
        key=len,
        reverse=True,
    )
    tags: list[str] = []
    i = 0
    while i < len(words):
        for phrase in phrase_words:
            if tuple(words[i : i + len(phrase)]) == phrase:
                tags.append(" ".join(phrase))
                i += len(phrase)
                break
        else:
            if words[i] not in stopwords:
                tags.append(words[i])
            i += 1
    return list(dict.fromkeys(tags))
