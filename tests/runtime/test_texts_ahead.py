"""Texts announced ahead fill the padding rows of the text encoder's short calls: fewer calls,
the same bytes (ttd/runtime/texts_ahead.py)."""

from __future__ import annotations

import json

import numpy as np

from ttd.data.world import make_sample
from ttd.runtime import load_tagger
from ttd.runtime.texts_ahead import TextsAhead


def _counting(tagger) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    encode = tagger.backend.encode_texts
    tagger.backend.encode_texts = lambda ids: calls.append(ids.shape) or encode(ids)
    return calls


def test_announced_texts_fill_short_calls_and_come_back_byte_identical():
    tagger = load_tagger("torch", device="cpu")
    captions = [make_sample(5, i).caption for i in range(40)]
    first, second = captions[:20], captions[20:]
    expected = tagger.encode_texts(captions)
    calls = _counting(tagger)
    alone = [tagger.encode_texts(first), tagger.encode_texts(second)]
    plain = list(calls)
    calls.clear()
    ahead = TextsAhead(tagger)
    for caption in captions:
        ahead.announce(caption)
    filled = [ahead.embeddings(first), ahead.embeddings(second)]
    for got, want in zip(filled + alone, [expected[:20], expected[20:]] * 2):
        assert np.array_equal(got, want)  # the same bits, whichever texts shared a call
    rows = tagger.text_rows
    assert all(shape[0] == rows for shape in calls + plain)
    # each length bucket of all 40 captions in full calls but its last, against the two batches'
    # short calls apart: the second batch was computed in the first one's padding rows
    ids = tagger.tokenizer(captions)
    lengths = -(-((ids != 0).sum(axis=1)) // 8) * 8
    assert len(calls) == sum(-(-int((lengths == n).sum()) // rows) for n in np.unique(lengths)) < len(plain)
    assert ahead.embeddings(first[:3]).shape == (3, tagger.config.embed_dim)  # handed out once: computed again


def test_texts_ahead_keeps_at_most_its_limit():
    tagger = load_tagger("torch", device="cpu")
    ahead = TextsAhead(tagger, limit=5)
    for i in range(12):
        ahead.announce(f"a red circle number {i}")
    ahead.embeddings(["a blue square"])
    assert len(ahead._announced) + len(ahead._ready) <= 10
    assert ahead.embeddings([]).shape == (0, tagger.config.embed_dim)


def test_a_caption_job_text_encodes_the_next_batches_captions_in_its_padding(tmp_path):
    """Through the job runner: the items read ahead are announced, the records are the bytes of a
    job that announces nothing, with fewer text-encoder rows."""
    from PIL import Image

    from ttd.data.items import open_items
    from ttd.jobs.runner import JobOptions, run_job
    from ttd.jobs.segment_job import WholeImageStep
    from ttd.segment.segmentation import SegmentOptions

    rows = []
    for i in range(24):
        sample = make_sample(6, i)
        Image.fromarray(sample.image).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": sample.caption}))
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    tagger = load_tagger("torch", device="cpu")
    calls = _counting(tagger)

    class Silent(WholeImageStep):
        ahead = None  # a step that announces nothing: the job's text calls as before

    used = {}
    for name, step in (("warm", Silent(None, SegmentOptions(batch_size=8))),  # tag prompts encoded (cached)
                       ("plain", Silent(None, SegmentOptions(batch_size=8))),
                       ("ahead", WholeImageStep(None, SegmentOptions(batch_size=8)))):
        calls.clear()
        run_job(tagger, step, open_items(tmp_path / "c.jsonl"), tmp_path / f"{name}.jsonl", {},
                JobOptions(batch_size=8, decode_workers=0, progress=False))
        used[name] = sum(n * length for n, length in calls)
    assert (tmp_path / "plain.jsonl").read_bytes() == (tmp_path / "ahead.jsonl").read_bytes()
    assert used["ahead"] < 0.9 * used["plain"], used
