"""Caption -> candidate tags (docs/architecture.md §3.2): lower-case words without punctuation or stopwords,
de-duplicated in order, with multi-word vocabulary names matched first, longest first.

Words are Unicode words: the caption is normalised to NFC and case-folded (`str.casefold`, so
"Straße" gives the one tag "strasse", "CAFÉ" and "café" the same tag "café"); a word is a run of
letters, digits and combining marks of any script ("jalapeño", "pokémon", "кошка"), with at
most one apostrophe inside ("dog's"; a typographic ’ counts as '). Scripts written without
spaces between words (Chinese, Japanese kana and kanji) have no word boundaries this module could
find without a dictionary: as a documented fallback each run of such (CJK) characters is one
tag ("一只猫在沙发上" is one tag), split from any letters or digits of other scripts around it.
Only the stopwords below (English) are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from ttd.errors import InputError

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

# Scripts written without spaces between words: each run of these characters is one tag.
_NO_SPACE_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3134F),  # CJK unified ideographs extensions B-G, compatibility supplement
)


def _is_word_char(c: str) -> bool:
    return c.isalnum() or unicodedata.category(c).startswith("M")


def _no_space_script(c: str) -> bool:
    code = ord(c)
    return any(lo <= code <= hi for lo, hi in _NO_SPACE_RANGES)


def normalize(text: str) -> str:
    """NFC, case-folded, typographic apostrophes as '."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold()).replace("\u2019", "'")


# An ASCII text's words by the same rules (a word character is [a-z0-9] once case-folded, no
# CJK): one regular expression instead of a Python loop per character, for the common caption.
_ASCII_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)?")


def words(text: str) -> list[str]:
    """The Unicode words of `text`, normalised (see the module doc), in order."""
    if text.isascii():
        return _ASCII_WORD.findall(text.lower())
    text = normalize(text)
    found: list[str] = []
    current: list[str] = []
    current_cjk = False
    apostrophe = False
    for i, c in enumerate(text):
        if _is_word_char(c):
            cjk = _no_space_script(c)
            if current and cjk != current_cjk:
                found.append("".join(current))
                current, apostrophe = [], False
            current.append(c)
            current_cjk = cjk
        elif (c == "'" and current and not current_cjk and not apostrophe and i + 1 < len(text)
              and _is_word_char(text[i + 1]) and not _no_space_script(text[i + 1])):
            current.append(c)
            apostrophe = True
        elif current:
            found.append("".join(current))
            current, apostrophe = [], False
    if current:
        found.append("".join(current))
    return found


def candidate_tags(
    caption: str,
    phrases: Iterable[str] = (),
    stopwords: frozenset[str] = STOPWORDS,
) -> list[str]:
    """The candidate tags of a caption, in order of first appearance.

    `phrases` are multi-word names ("traffic light"); where one matches consecutive words it
    becomes a single tag, longer phrases winning over shorter ones.
    """
    caption_words = words(caption)
    phrase_words = sorted({tuple(w) for w in map(words, phrases) if len(w) > 1}, key=len, reverse=True)
    tags: list[str] = []
    i = 0
    while i < len(caption_words):
        for phrase in phrase_words:
            if tuple(caption_words[i : i + len(phrase)]) == phrase:
                tags.append(" ".join(phrase))
                i += len(phrase)
                break
        else:
            if caption_words[i] not in stopwords:
                tags.append(caption_words[i])
            i += 1
    return list(dict.fromkeys(tags))


# a caption's candidate tags are bounded in every command that reads captions (tag, segment, train,
# calibrate), as `ttd triton build --max-tags`: a 20,000-word caption grew `ttd train` to 23 GB and
# kept `ttd calibrate` busy for minutes; the item is reported, the run goes on (docs/reliability.md)
MAX_CAPTION_TAGS = 1024


class CaptionError(InputError):
    """A caption no command can use: too many candidate tags, or none."""


def bounded_tags(caption: str, phrases: Iterable[str] = ()) -> list[str]:
    """The caption's candidate tags, or CaptionError when it has more than MAX_CAPTION_TAGS."""
    tags = candidate_tags(caption, phrases)
    if len(tags) > MAX_CAPTION_TAGS:
        raise CaptionError(f"caption has {len(tags)} candidate tags, more than the limit of {MAX_CAPTION_TAGS} "
                           "(the served tagger's cap); split it into shorter captions")
    return tags


def tags_of_caption(caption: str | None) -> list[str]:
    """A caption's candidate tags, or the CaptionError that names what is wrong with it (every mode
    that tags a caption checks it here)."""
    if caption is None or not caption.strip():
        raise CaptionError("empty caption")
    tags = bounded_tags(caption)
    if not tags:
        raise CaptionError(f"caption {caption!r} has no candidate tags (only stopwords or punctuation)")
    return tags


