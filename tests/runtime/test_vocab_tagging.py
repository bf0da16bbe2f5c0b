"""Vocabulary mode (one shared row of tag embeddings broadcast over the batch) gives Tagger.tag's
numbers, for every score method, with and without flip TTA; and the on-disk vocabulary cache
hits, misses and invalidates as keyed."""

import json

import numpy as np
import pytest

from ttd.data.world import make_sample
from ttd.runtime.tagger import Tagger
from ttd.runtime.torch_backend import TorchBackend
from ttd.runtime.vocab_cache import export_key, load_or_encode, torch_model_key, vocabulary_hash

VOCAB = ["red", "green", "blue", "circle", "square", "triangle", "star", "stripes", "dots", "yellow", "cat"]


@pytest.fixture(scope="module")
def images(tiny_model):
    return np.stack([make_sample(2, i).image for i in range(5)])[:, :64, :64]


class CountingBackend:
    """A torch backend that counts text-encoder calls (a cache hit must make none)."""

    def __init__(self, inner):
        self.inner, self.name, self.text_calls = inner, "torch", 0

    def encode_images(self, pixels):
        return self.inner.encode_images(pixels)

    def encode_texts(self, ids):
        self.text_calls += 1
        return self.inner.encode_texts(ids)

    def score_tags(self, views, request):
        return self.inner.score_tags(views, request)

    def tag_images(self, images, preprocessing, request):
        return self.inner.tag_images(images, preprocessing, request)


@pytest.mark.parametrize("method", ["negatives", "softmax", "sigmoid", "minmax"])
@pytest.mark.parametrize("flip", [False, True])
def test_batched_vocabulary_head_matches_tagger(tiny_model, images, method, flip):
    from PIL import Image

    from ttd.runtime.images import resize_center_crop

    size = tiny_model.config.image_size
    batch = np.stack([resize_center_crop(Image.fromarray(make_sample(2, i).image), size, "bicubic") for i in range(5)])
    tagger = Tagger(TorchBackend(tiny_model, "cpu"), tiny_model.config, threshold=0.3, flip_tta=flip,
                    score_method=method)
    reference = tagger.tag(batch, [VOCAB] * len(batch), with_masks=True)
    fast = tagger.tag_vocabulary(batch, VOCAB, tagger.encode_tags(VOCAB), with_masks=True)
    assert sum(len(r.selected) for r in reference) > 0  # the comparison covers selected tags
    for r, f in zip(reference, fast):
        np.testing.assert_allclose(f.scores, r.scores, atol=2e-5)
        assert f.selected == r.selected
        np.testing.assert_allclose(f.masks, r.masks, atol=1e-5)
    assert tagger.tag_vocabulary(batch, VOCAB)[0].masks is None  # no maps leave the backend unless asked for


def test_vocabulary_cache_hit_miss_and_invalidation(tiny_model, tmp_path):
    backend = CountingBackend(TorchBackend(tiny_model, "cpu"))
    key = torch_model_key(tiny_model, "float32")

    def fresh_tagger():
        backend.text_calls = 0
        return Tagger(backend, tiny_model.config)

    miss = load_or_encode(fresh_tagger(), VOCAB, key, tmp_path)
    assert not miss.hit and backend.text_calls > 0 and miss.path.is_file()
    hit = load_or_encode(fresh_tagger(), VOCAB, key, tmp_path)
    assert hit.hit and backend.text_calls == 0 and hit.path == miss.path
    np.testing.assert_array_equal(hit.embeds, miss.embeds)
    np.testing.assert_allclose(hit.embeds, Tagger(TorchBackend(tiny_model, "cpu"), tiny_model.config).encode_tags(VOCAB),
                               atol=1e-6)

    changed_vocab = load_or_encode(fresh_tagger(), VOCAB[:-1] + ["dog"], key, tmp_path)
    assert not changed_vocab.hit and backend.text_calls > 0 and changed_vocab.path != miss.path
    reordered = load_or_encode(fresh_tagger(), VOCAB[::-1], key, tmp_path)
    assert not reordered.hit

    other_model = load_or_encode(fresh_tagger(), VOCAB, "f" * 64, tmp_path)  # another model or export
    assert not other_model.hit and other_model.path != miss.path

    miss.path.write_bytes(miss.path.read_bytes()[:100])  # a truncated entry is a miss, then rewritten
    rewritten = load_or_encode(fresh_tagger(), VOCAB, key, tmp_path)
    assert not rewritten.hit and load_or_encode(fresh_tagger(), VOCAB, key, tmp_path).hit


def test_cache_keys_follow_the_weights_the_export_and_the_templates(tiny_model, fresh_tiny_model):
    import torch

    key = torch_model_key(tiny_model, "float32")
    assert key == torch_model_key(fresh_tiny_model, "float32")  # same seed, same weights
    assert key != torch_model_key(tiny_model, "bfloat16")
    with torch.no_grad():
        next(fresh_tiny_model.parameters()).add_(1e-3)
    assert key != torch_model_key(fresh_tiny_model, "float32")
    manifest = {"precision": "int8", "files": {"text_encoder.onnx": "a" * 64, "model.json": "b" * 64}}
    changed = json.loads(json.dumps(manifest))
    changed["files"]["text_encoder.onnx"] = "c" * 64
    assert export_key(manifest) != export_key(changed)
    assert vocabulary_hash(VOCAB, ["a photo of a {}."]) != vocabulary_hash(VOCAB, ["a {}."])


def test_ttd_tag_vocabulary_uses_the_cache(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from ttd.cli import main

    for i in range(3):
        Image.fromarray(make_sample(2, i).image).save(tmp_path / f"{i}.png")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}.jsonl"
        result = CliRunner().invoke(main, ["tag", "--model", "world-tiny", "--vocabulary", str(tmp_path / "vocab.txt"),
                                           *(str(tmp_path / f"{i}.png") for i in range(3)), "-o", str(out), "--quiet",
                                           "--vocab-cache", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_text())
        assert ("vocabulary cache hit" if run else "vocabulary cache miss (stored)") in result.output
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 3
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
