"""The torch-free CLIP BPE (ttd/model/clip_bpe.py) against open_clip's own tokenizer: the same ids,
truncation and padding on captions with Unicode, HTML entities, mojibake and over-long text."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")

from ttd.model.clip_bpe import MERGES_FILE, ClipBpeTokenizer  # noqa: E402
from ttd.model.tokenizer import OpenClipTokenizer, TruncationWarning, build_tokenizer, torch_free_spec  # noqa: E402

CORPUS = [
    "a photo of a dog",
    "A RED Car parked next to the Eiffel Tower!!!",
    "",
    "   spaces\tand\nnewlines   everywhere  ",
    "café crème brûlée, naïve façade — déjà vu",
    "東京の夜景と富士山",
    "서울의 거리 풍경",
    "Москва зимой, снег и солнце",
    "emoji 🐶🐱 and flags 🇫🇷 and a family 👨‍👩‍👧",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ and ligatures ﬁ ﬂ",
    "mojibake: cafÃ© and â€œquotesâ€\x9d",
    "html &amp; entities &lt;b&gt; &amp;amp; &#39;quoted&#39;",
    "numbers 12345 and 3.14159 and 1,000,000",
    "it's they're we've I'm you'll he'd",
    "combining e\u0301 and a\u0308 vs é ä",
    "<start_of_text> literal special tokens <end_of_text>",
    "zero\u200bwidth space and soft\u00adhyphen",
    "Ελληνικά γράμματα και العربية والعبرية עברית",
    "a " * 120 + "very long caption that cannot fit",
]


@pytest.fixture(scope="module")
def merges() -> Path:
    return Path(open_clip.__file__).parent / MERGES_FILE


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_truncation_and_padding_equal_open_clips(merges, context_length):
    reference = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)
    ours = ClipBpeTokenizer(merges, context_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        ids = ours(CORPUS)
    expected = reference(CORPUS, context_length=context_length).numpy()
    assert ids.dtype == np.int64 and ids.shape == (len(CORPUS), context_length)
    np.testing.assert_array_equal(ids, expected)
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text), text
    cut = ids[-1]  # the over-long caption: every position used, the last one end-of-text
    assert (cut != 0).all() and cut[-1] == ours.end_id == 49407 and cut[0] == ours.start_id == 49406


def test_truncation_warns_as_open_clips_wrapper_does(merges):
    ours = ClipBpeTokenizer(merges, 16)
    with pytest.warns(TruncationWarning, match="more than the 14 that fit the context length 16"):
        ours(["one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"])


def test_export_spec_rebuilds_the_same_tokenizer(merges, tmp_path):
    reference = OpenClipTokenizer("ViT-B-16", 77)
    spec = torch_free_spec(reference)
    assert spec == {"kind": "clip_bpe", "merges": MERGES_FILE, "clean": "lower",
                    "special_tokens": ["<start_of_text>", "<end_of_text>"]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    rebuilt = build_tokenizer({**spec, "path": str(merges)}, 77)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        np.testing.assert_array_equal(rebuilt(CORPUS), reference(CORPUS))


def test_an_unreadable_merges_file_is_named(tmp_path):
    bad = tmp_path / MERGES_FILE
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=f"{MERGES_FILE}: not a readable BPE merges file"):
        ClipBpeTokenizer(bad)
