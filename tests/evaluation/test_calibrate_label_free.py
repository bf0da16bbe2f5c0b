"""Label-free calibration (ttd/evaluation/label_free.py, `ttd calibrate --captions`): the null is
built from other captions only, present-but-unmentioned tags in it do not move the margin, the fit
lands near the labelled one on the world, and a model whose margin was never fitted says so."""

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.evaluation.label_free import (empirical_null, fit_label_free, null_margin, separation,
                                       shuffled_null_tags)
from ttd.model.factory import create_model
from ttd.runtime import UnfittedMarginWarning, load_tagger


def test_the_null_never_pairs_an_image_with_its_own_caption_tags():
    lists = [["red", "square", "sand"], ["blue", "square"], ["red", "circle", "tree"], ["green", "star"],
             ["sand", "tree", "photo"], ["blue", "heart", "square"]]
    for seed in range(4):
        nulls = shuffled_null_tags(lists, draws=2, seed=seed)
        assert nulls == shuffled_null_tags(lists, draws=2, seed=seed)  # deterministic
        for i, (own, null) in enumerate(zip(lists, nulls)):
            others = {t for j, tags in enumerate(lists) if j != i for t in tags}
            assert null and not set(null) & set(own) and set(null) <= others
        # every image draws from exactly 2 other captions: 2 × 6 draws over 6 captions, each used twice
        used = [sum(set(lists[j]) - set(own) <= set(null) for j in range(6) if j != i) for i, (own, null)
                in enumerate(zip(lists, nulls))]
        assert min(used) >= 2
    with pytest.raises(ValueError, match="at least 2 image"):
        shuffled_null_tags([["red"]])


def test_unmentioned_present_tags_in_the_null_do_not_move_the_margin():
    rng = np.random.default_rng(0)
    absent = rng.normal(0.0, 1.0, 3000)
    unmentioned_present = rng.normal(20.0, 3.0, 600)  # a fifth of the shuffled tags are in the image after all
    own = np.r_[rng.normal(0.0, 1.0, 500), rng.normal(25.0, 4.0, 1500)]
    centre, scale = empirical_null(np.r_[own, absent, unmentioned_present])
    assert centre == pytest.approx(0.0, abs=0.25) and scale == pytest.approx(1.0, abs=0.15)
    margin = null_margin(centre, scale, 1e-4)
    assert margin == pytest.approx(3.72, abs=0.6)  # Φ⁻¹(1 − 1e-4) = 3.72 widths above the peak
    # what ignoring them would do: the plain 1e-4 quantile of the null sits among present tags
    assert np.quantile(np.r_[absent, unmentioned_present], 1 - 1e-4) > 20
    assert np.mean(own[500:] >= margin) == 1.0 and np.mean(absent >= margin) < 0.002
    assert separation(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)


def test_label_free_fit_on_world_pairs_is_near_the_labelled_fit():
    samples = [make_sample(7, i) for i in range(120)]
    tagger = load_tagger("torch", device="cpu")
    fit = fit_label_free(tagger, [s.image for s in samples], [s.caption for s in samples], progress=False)
    # the labelled fit of this model is 2.2; own-caption tags only as the null would give ≈ 0
    assert 1.5 < fit.margin < 4.5, fit.line()
    assert fit.pairs == 120 and fit.null_tags > fit.caption_tags
    assert 0.55 < fit.selected_share < 0.7  # ≈ the share of the captions' tags that are present (64 %)
    # the fit does not depend on the margin the model had (a wrong one is recovered from)
    import dataclasses

    from ttd.runtime import Tagger

    wrong = Tagger(tagger.backend, dataclasses.replace(tagger.config, negative_margin=9.0))
    again = fit_label_free(wrong, [s.image for s in samples], [s.caption for s in samples], progress=False)
    assert again.margin == pytest.approx(fit.margin, abs=1e-9)


def write_pairs(folder, count=24):
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(count):
        sample = make_sample(7, i)
        Image.fromarray(sample.image).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": sample.caption}))
    lines.append(json.dumps({"image": "images/missing.png", "caption": "a red square"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def test_unfitted_model_warns_and_calibrate_out_writes_a_fitted_checkpoint(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_tagger("torch", model="world-tiny", device="cpu")
        load_tagger("torch", device="cpu")  # the embedded model's margin was fitted (labelled)
    unfitted = [w for w in caught if issubclass(w.category, UnfittedMarginWarning)]
    assert len(unfitted) == 1
    assert "never fitted" in str(unfitted[0].message)
    assert "ttd calibrate --model world-tiny --captions PAIRS.jsonl --out DIR" in str(unfitted[0].message)

    pairs = write_pairs(tmp_path)
    runner = CliRunner()
    command = ["calibrate", "--model", "world-tiny", "--captions", str(pairs), "--out", str(tmp_path / "fitted"),
               "--device", "cpu"]
    # a random-init model barely tells its captions' tags from shuffled ones: at the default false
    # rate its margin would select 1.4 % of them, which is refused with nothing written
    refused = runner.invoke(main, command)
    assert refused.exit_code == 2 and "selects 1.4 % of the captions' own tags (below 5 %)" in refused.output
    assert not (tmp_path / "fitted").exists()
    result = runner.invoke(main, command + ["--max-false-rate", "0.05"])  # selects 11.6 %
    assert result.exit_code == 0, result.output
    assert "label-free" in result.output and "skipped" in result.output and "missing.png" in result.output
    config = json.loads((tmp_path / "fitted" / "model.json").read_text())
    assert config["margin_fit"]["method"] == "label-free" and config["margin_fit"]["pairs"] == 24
    assert config["negative_margin"] != 2.2
    weights = load_file(str(tmp_path / "fitted" / "model.safetensors"))
    reference = create_model("world-tiny").state_dict()
    assert all(np.array_equal(weights[k].numpy(), v.numpy()) for k, v in reference.items())  # weights untouched

    tag = ["tag", "--captions", str(pairs), "--device", "cpu", "--backend", "torch", "--dtype", "fp32"]
    plain = runner.invoke(main, tag + ["--model", "world-tiny", "-o", str(tmp_path / "a.jsonl")])
    lines = [line for line in plain.output.splitlines() if line.startswith("warning: negative_margin")]
    assert plain.exit_code == 0 and len(lines) == 1 and "ttd calibrate" in lines[0]
    fitted = runner.invoke(main, tag + ["--checkpoint", str(tmp_path / "fitted" / "model.safetensors"),
                                        "-o", str(tmp_path / "b.jsonl")])
    assert fitted.exit_code == 0 and "never fitted" not in fitted.output


def test_calibrate_captions_refuses_bad_input(tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a red square"}) + "\n")
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", "--captions", str(tmp_path / "one.jsonl"), "--dry-run"])
    assert result.exit_code == 2 and "one.jsonl" in result.output and "at least 2" in result.output
    result = runner.invoke(main, ["calibrate", "--captions", str(tmp_path / "nope.jsonl"), "--dry-run"])
    assert result.exit_code == 2 and "nope.jsonl" in result.output
    result = runner.invoke(main, ["calibrate", "--captions", str(tmp_path / "one.jsonl"), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "not both" in result.output
