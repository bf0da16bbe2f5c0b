"""The runtime's Tagger (behind `ttd tag`, exports and Triton) scores exactly as the evaluation does,
for every score method, with and without flip TTA; and the CLI flags reach it."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.annotations import world_eval_samples
from ttd.data.world import make_sample
from ttd.evaluation.evaluate import evaluate
from ttd.model.factory import load_model
from ttd.runtime.images import normalize
from ttd.runtime import load_tagger
from ttd.model.scoring import pad_tags, score_row, tag_head
from ttd.model.tags import candidate_tags


@pytest.fixture(scope="module")
def world_batch():
    samples = [make_sample(2, i) for i in range(6)]
    return np.stack([s.image for s in samples]), [candidate_tags(s.caption) for s in samples]


def evaluation_scores(model, images, tag_lists, method, flip):
    """The scores of the torch model and ttd.model.scoring directly (not through any backend graph)."""
    pixels = torch.from_numpy(normalize(images, model.config.mean, model.config.std))
    with torch.no_grad():
        patch = model.encode_image(pixels)[1]
        views = torch.stack([patch, model.encode_image(pixels.flip(-1))[1].flip(-1)], 1) if flip else patch[:, None]
        unique, index, valid = pad_tags(tag_lists)
        tag_embeds = model.encode_tags(unique)[index]
        negatives = model.encode_tags(list(model.config.negative_prompts))[None]
        scores, _ = tag_head(views, tag_embeds, valid, negatives, torch.tensor([model.config.negative_margin]),
                             model.config.tau, model.mask_weight, model.mask_bias)
        return score_row(scores, method).numpy()


@pytest.mark.parametrize("method", ["negatives", "softmax", "minmax", "sigmoid"])
def test_tagger_scores_equal_the_evaluations_with_and_without_flip_tta(world_batch, method):
    images, tag_lists = world_batch
    model = load_model()  # the embedded world-base: trained, so the scores are far from flat
    by_flip = {}
    for flip in (False, True):
        tagger = load_tagger("torch", score_method=method, flip_tta=flip)
        results = tagger.tag(images, tag_lists)
        expected = evaluation_scores(model, images, tag_lists, method, flip)
        assert [r.tags for r in results] == tag_lists
        for row, result in enumerate(results):
            np.testing.assert_allclose(result.scores, expected[row, : len(tag_lists[row])], atol=2e-4,
                                       err_msg=f"{method} flip={flip} row {row}")
            assert result.selected == [t for t, s in zip(result.tags, result.scores) if s >= 0.5]
        by_flip[flip] = np.concatenate([r.scores for r in results])
    # flip TTA really changes the scores (the world's images are not mirror-symmetric)
    assert np.abs(by_flip[True] - by_flip[False]).max() > 1e-2


def test_ttd_tag_flip_tta_reaches_the_tagger(tmp_path, world_batch):
    images, tag_lists = world_batch
    rows = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": make_sample(2, i).caption})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = {}
    for flag in ([], ["--flip-tta"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        result = CliRunner().invoke(main, ["tag", "--captions", str(tmp_path / "c.jsonl"), "-o", str(out), "--quiet",
                                           *flag])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == len(images) and all("error" not in r for r in records)
        scores[bool(flag)] = [[c["score"] for c in r["candidates"]] for r in records]
    expected = evaluation_scores(load_model(), images, tag_lists, "negatives", True)  # the default score
    for row, row_scores in enumerate(scores[True]):
        np.testing.assert_allclose(row_scores, expected[row, : len(tag_lists[row])], atol=2e-4)
    assert max(abs(a - b) for r1, r2 in zip(scores[True], scores[False]) for a, b in zip(r1, r2)) > 1e-2


def test_ttd_eval_flip_tta_reaches_the_evaluation(tmp_path):
    metrics = {}
    for flag in ([], ["--flip-tta"]):
        out = tmp_path / f"m{len(flag)}.json"
        result = CliRunner().invoke(main, ["eval", "--count", "24", "--json", str(out), *flag])
        assert result.exit_code == 0, result.output
        metrics[bool(flag)] = json.loads(out.read_text())
    model, samples = load_model(), world_eval_samples(2, 24)
    for flip in (True, False):
        expected = evaluate(model, samples, flip_tta=flip, progress=False)
        for scorer in ("pixel-tag", "pixel-tag-minmax", "pixel-tag-sigmoid", "pixel-tag-negatives"):
            assert metrics[flip]["tags"][scorer] == pytest.approx(expected["tags"][scorer], abs=1e-9), (flip, scorer)
    assert metrics[True]["tags"] != metrics[False]["tags"]  # the flag made a difference
