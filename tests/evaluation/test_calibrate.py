"""Calibration of the `negatives` margin (ttd/evaluation/calibrate.py, `ttd calibrate`, the end of `ttd train`):
the critical margins are where the Tagger's selection really flips, the fit is the exact best
cut, and tagging with the fitted margin gives the fit's precision and recall."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ttd.evaluation.calibrate import best_margin, critical_margins, fit_negative_margin, sample_critical_margins
from ttd.cli import main
from ttd.data.annotations import world_eval_samples
from ttd.evaluation.evaluate import evaluate
from ttd.model.factory import DEFAULT_CHECKPOINT
from ttd.runtime.tagger import sigmoid
from ttd.runtime import load_tagger
from ttd.runtime.tagger import Tagger
from ttd.model.tags import candidate_tags


def test_the_best_cut_is_exact_and_halfway_between_its_neighbours():
    critical = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    relevant = np.array([True, True, False, True, False])
    fit = best_margin(critical, relevant, min_precision=0.97)  # top 2: P 1, R 2/3 (top 4 has P 0.75)
    assert (fit.margin, fit.precision, fit.recall) == (3.5, 1.0, pytest.approx(2 / 3))
    assert fit.met_min_precision and fit.candidates == 5 and fit.relevant == 3
    fit = best_margin(critical, relevant, min_precision=0.7)  # top 4: P 0.75, R 1, F1 6/7
    assert (fit.margin, fit.precision, fit.recall, fit.f1) == (1.5, 0.75, 1.0, pytest.approx(6 / 7))
    # ties cannot be split: two tags at the same critical margin are selected together
    tied = best_margin(np.array([3.0, 3.0, 1.0]), np.array([True, False, True]), min_precision=0.97)
    assert not tied.met_min_precision and tied.margin == 1.0 and tied.recall == 1.0
    with pytest.raises(ValueError, match="at least one relevant"):
        best_margin(critical, np.zeros(5, bool))


@pytest.mark.parametrize("views", [1, 2])
def test_critical_margins_are_where_the_selection_flips(views):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(views, 3, 5, 4, 4))
    critical = critical_margins(logits, threshold=0.6)

    def scores(margin):
        return sigmoid(logits - margin[..., None, None]).mean(axis=0).max(axis=(-2, -1))

    assert (scores(critical - 1e-6) >= 0.6).all() and (scores(critical + 1e-6) < 0.6).all()
    if views == 1:
        np.testing.assert_allclose(critical, logits[0].max(axis=(-2, -1)) - np.log(0.6 / 0.4))


@pytest.mark.parametrize("flip", [False, True])
def test_tagging_with_the_fitted_margin_gives_the_fits_precision_and_recall(flip):
    samples = world_eval_samples(7, 48)
    fit = fit_negative_margin(load_tagger("torch", flip_tta=flip), samples, progress=False)
    base = load_tagger("torch", flip_tta=flip)
    tagger = Tagger(base.backend, dataclasses.replace(base.config, negative_margin=fit.margin), flip_tta=flip)
    measured = evaluate(tagger, samples, progress=False)["tags"]["pixel-tag-negatives"]
    assert (measured["precision"], measured["recall"]) == (pytest.approx(fit.precision), pytest.approx(fit.recall))
    assert fit.precision >= 0.97 and fit.recall > 0.9


@pytest.mark.parametrize("flip", [False, True])
def test_each_tags_critical_margin_is_where_the_taggers_selection_flips(flip):
    samples = world_eval_samples(7, 4)
    base = load_tagger("torch", flip_tta=flip)
    critical, relevant = sample_critical_margins(base, samples, progress=False)
    tag_lists = [candidate_tags(s.caption) for s in samples]
    assert len(critical) == len(relevant) == sum(map(len, tag_lists))
    position = 0
    for sample, tags in zip(samples, tag_lists):
        for k, tag in enumerate(tags):
            for shift, selected in ((-1e-3, True), (1e-3, False)):
                margin = float(critical[position]) + shift
                tagger = Tagger(base.backend, dataclasses.replace(base.config, negative_margin=margin), flip_tta=flip)
                assert (tag in tagger.tag(sample.image[None], [tags])[0].selected) is selected, (tag, margin)
            assert relevant[position] == (tag in sample.relevant_tags)
            position += 1


def test_ttd_calibrate_writes_the_margin_into_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(DEFAULT_CHECKPOINT, checkpoint)
    config = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    config["negative_margin"] = 9.0  # as a fine-tuned model would inherit a wrong margin
    checkpoint.with_suffix(".json").write_text(json.dumps(config))
    runner = CliRunner()
    refused = runner.invoke(main, ["calibrate", "--count", "40"])
    assert refused.exit_code == 2 and "pass --checkpoint FILE, or --out DIR" in refused.output
    result = runner.invoke(main, ["calibrate", "--checkpoint", str(checkpoint), "--count", "40",
                                  "--json", str(tmp_path / "fit.json")])
    assert result.exit_code == 0, result.output
    fit = json.loads((tmp_path / "fit.json").read_text())
    written = json.loads(checkpoint.with_suffix(".json").read_text())["negative_margin"]
    assert written == round(fit["margin"], 4) and 1.0 < written < 4.0  # the base model's margin, not 9
    assert "wrote negative_margin 9 ->" in result.output
    missing = runner.invoke(main, ["calibrate", "--dry-run", "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere does not exist (expected an evaluation folder" in missing.output
