import warnings

import numpy as np
import pytest

from ttd.model.tags import candidate_tags
from ttd.model.tokenizer import OpenClipTokenizer, TruncationWarning, WordTokenizer


def test_stopwords_punctuation_and_duplicates_are_removed():
    assert candidate_tags("A Red circle, and the red CIRCLE on grass!") == ["red", "circle", "grass"]


def test_only_stopwords_gives_no_candidates():
    assert candidate_tags("and the of it is") == []
    assert candidate_tags("") == []


def test_multi_word_phrases_match_longest_first():
    phrases = ["traffic light", "light", "hot dog", "hot dog stand"]
    tags = candidate_tags("A hot dog stand near the traffic light and a hot dog", phrases)
    assert tags == ["hot dog stand", "traffic light", "hot dog"]


def test_word_tokenizer_ids_and_truncation_warning():
    tokenizer = WordTokenizer(["red", "circle"], context_length=5)
    ids = tokenizer(["red circle", "red blue"])
    assert ids.tolist() == [[2, 3, 4, 5, 0], [2, 3, 1, 5, 0]]
    with pytest.warns(TruncationWarning, match="has 4 tokens, more than the 3"):
        long = tokenizer(["red red red circle"])
    assert long.tolist() == [[2, 3, 3, 3, 5]]


def test_open_clip_tokenizer_warns_on_long_captions():
    tokenizer = OpenClipTokenizer("ViT-B-16", 77)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = tokenizer(["a photo of a dog"])
    assert short.shape == (1, 77) and short.dtype == np.int64
    with pytest.warns(TruncationWarning, match="more than the 75 that fit the context length 77"):
        tokenizer([" ".join(["dog"] * 100)])


def test_words_fast_path_agrees_with_the_loop():
    """The ASCII fast path of `words` (a regular expression) splits exactly as the per-character loop."""
    from ttd.model import tags

    rng = np.random.default_rng(1)
    alphabet = list("abcXYZ09'_- .,!?\"\t")
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 30)))) for _ in range(3000)]
    texts += ["dog's'x", "rock'n'roll", "'abc", "abc'", "it's A DOG_house", "a--b''c", ""]
    fast = [tags.words(text) for text in texts]

    class NotAscii(str):
        def isascii(self) -> bool:
            return False

    loop = [tags.words(NotAscii(text)) for text in texts]
    assert fast == loop
