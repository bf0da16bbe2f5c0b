"""The `negatives` pixel-tag score: tags that share pixels both pass, an absent tag does
not, on every path that computes the score (the one scoring function, through Stage 1, the torch
and onnxruntime Taggers, vocabulary mode), and the backends agree on it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ttd.model.config import DEFAULT_NEGATIVE_MARGIN, ModelConfig
from ttd.data.world import make_sample, world_model_config
from ttd.train.distill import ttd_losses
from ttd.model.factory import load_model
from ttd.runtime import load_tagger
from ttd.model.scoring import pad_tags, score_row, select_tags, tag_head
from ttd.evaluation.tag_kinds import KindCounts
from ttd.model.tags import candidate_tags

TAU = 100.0


def _unit(first: float, axis: int, dim: int = 8) -> torch.Tensor:
    """A unit vector with cosine `first` to e_0, the rest along e_axis."""
    v = torch.zeros(dim)
    v[0], v[axis] = first, (1 - first**2) ** 0.5
    return v


def shared_pixels_case():
    """A 4×4 image whose every pixel is the same 'orange heart' feature e_0, so a colour and a
    shape share every pixel (both at cosine 0.7071); an absent tag at cosine 0.60; negatives: a
    generic prompt at cosine 0.62 (close to every pixel, less than the tags) and an unrelated one."""
    patch = torch.eye(8)[0][None, :, None, None].expand(1, 8, 4, 4).contiguous()
    tags = torch.stack([_unit(2**-0.5, 1), _unit(2**-0.5, 2), _unit(0.60, 3)])[None]  # colour, shape, absent
    negatives = torch.stack([_unit(0.62, 4), torch.eye(8)[5]])
    return patch, tags, negatives


def scores_of(patch, tags, negatives, method, margin=DEFAULT_NEGATIVE_MARGIN):
    valid = torch.ones(tags.shape[:2], dtype=torch.bool)
    return score_row(tag_head(patch[:, None], tags, valid, negatives[None], torch.tensor([margin]), TAU, 10.0, -2.5)[0],
                     method)


def test_two_tags_sharing_every_pixel_both_pass_and_an_absent_tag_does_not():
    patch, tags, negatives = shared_pixels_case()
    scores = scores_of(patch, tags, negatives, "negatives")
    selected = select_tags(scores, 0.5)[0].tolist()
    assert selected == [True, True, False], scores
    # sigmoid(100·0.7071 − log(e^62 + e^0) − 2.2) for both tags, sigmoid(60 − 62 − 2.2) for the absent one
    logits = torch.tensor([100 * 2**-0.5, 100 * 2**-0.5, 60.0]) - 62.0 - DEFAULT_NEGATIVE_MARGIN
    torch.testing.assert_close(scores[0], torch.sigmoid(logits), rtol=1e-4, atol=1e-6)
    # the paper's softmax over the caption's tags lets neither pass here: each gets just under 0.5
    softmax = scores_of(patch, tags, negatives, "softmax")
    assert select_tags(softmax, 0.5)[0].tolist() == [False, False, False]
    assert 0.4999 < float(softmax[0, 0]) < 0.5


def test_stage1_selects_both_co_located_tags_and_teaches_their_masks():
    patch, tags, negatives = shared_pixels_case()
    valid = torch.ones(1, 3, dtype=torch.bool)
    weight, bias = torch.tensor(10.0), torch.tensor(-2.5)
    text = F.normalize(patch[:, :, 0, 0], dim=1)
    args = (patch, text, tags, valid, weight, bias, torch.tensor(0.0), TAU, 0.5, 2.0, 1.0)
    chosen = ttd_losses(*args, score_method="negatives", negative_embeds=negatives)
    paper = ttd_losses(*args, score_method="softmax")
    assert chosen.selected_fraction == pytest.approx(2 / 3)  # colour and shape, not the absent tag
    assert paper.selected_fraction == 0.0
    with pytest.raises(ValueError, match="needs negative_embeds"):
        ttd_losses(*args, score_method="negatives")


@pytest.fixture(scope="module")
def world_export(tmp_path_factory):
    from export.pipeline import run_export

    out = tmp_path_factory.mktemp("export")
    run_export(load_model(), out, check_count=8)  # the trained world-base: its scores are far from flat
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_negatives_score_is_the_same_on_torch_onnxruntime_and_the_evaluation_path(world_export, flip):
    samples = [make_sample(2, i) for i in range(8)]
    images = np.stack([s.image for s in samples])
    tag_lists = [candidate_tags(s.caption) for s in samples]
    taggers = {name: load_tagger(name, export_dir=str(world_export), flip_tta=flip, score_method="negatives")
               for name in ("torch", "onnxruntime")}
    results = {name: tagger.tag(images, tag_lists) for name, tagger in taggers.items()}
    model = load_model()
    unique, index, valid = pad_tags(tag_lists)
    with torch.no_grad():
        views = torch.from_numpy(taggers["torch"].encode_images(images)[1])
        negatives = model.encode_tags(list(model.config.negative_prompts))[None]
        expected = score_row(tag_head(views, model.encode_tags(unique)[index], valid, negatives,
                                      torch.tensor([model.config.negative_margin]), model.config.tau, 10.0, -2.5)[0],
                             "negatives").numpy()
    worst = 0.0
    for row, tags in enumerate(tag_lists):
        torch_row, ort_row = results["torch"][row], results["onnxruntime"][row]
        np.testing.assert_allclose(torch_row.scores, expected[row, : len(tags)], atol=1e-4)
        worst = max(worst, float(np.abs(torch_row.scores - ort_row.scores).max()))
        assert torch_row.selected == ort_row.selected
    assert worst < 1e-4
    # the score is informative here: something is selected and something is not
    decisions = np.concatenate([r.scores for r in results["torch"]]) >= 0.5
    assert decisions.any() and not decisions.all()


def test_vocabulary_mode_serves_the_negatives_score_like_the_caption_path(world_export):
    tagger = load_tagger("onnxruntime", export_dir=str(world_export), score_method="negatives")
    images = np.stack([make_sample(2, i).image for i in range(4)])
    vocabulary = ["circle", "heart", "orange", "red", "grass", "snow", "dog"]
    fast = tagger.tag_vocabulary(images, vocabulary)
    slow = tagger.tag(images, [vocabulary] * len(images))
    for f, s in zip(fast, slow):
        np.testing.assert_allclose(f.scores, s.scores, atol=1e-5)
        assert f.selected == s.selected


def test_triton_repository_serves_the_chosen_score(world_export, tmp_path):
    from export.triton import build_repository, validate_repository

    repo = build_repository(world_export, tmp_path / "repo", max_tags=64)
    head = (repo / "ttd_tag_head" / "config.pbtxt").read_text()
    tagger = (repo / "ttd_tagger" / "config.pbtxt").read_text()
    assert 'key: "max_variable_dim" value: { string_value: "64" }' in head  # the negatives have their own input
    assert 'key: "score_method" value: { string_value: "negatives" }' in tagger
    assert any("ttd_tagger" in line for line in validate_repository(repo))
    with pytest.raises(ValueError, match="unknown score method 'best'"):
        build_repository(world_export, tmp_path / "bad", score_method="best")


def test_model_config_refuses_unusable_negative_prompts():
    data = json.loads(json.dumps(world_model_config().to_dict()))
    assert ModelConfig.from_dict(data).negative_prompts == ("photo", "picture", "image", "scene", "view")
    for bad in ([], ["photo", " "], "photo"):
        with pytest.raises(ValueError, match="negative_prompts"):
            ModelConfig.from_dict({**data, "negative_prompts": bad})
    with pytest.raises(ValueError, match="negative_margin"):
        ModelConfig.from_dict({**data, "negative_margin": float("nan")})


def test_recall_by_kind_of_tag():
    counts = KindCounts()
    counts.add(["orange", "heart", "grass", "dog", "photo"], [True, False, True, True, False],
               [True, True, True, False, False])
    counts.add(["red", "circle", "snow", "blue"], [True, True, False, False], [True, True, True, False])
    summary = counts.summary()
    assert summary["colour"] == {"recall": 1.0, "count": 2}
    assert summary["shape"] == {"recall": 0.5, "count": 2}
    assert summary["background"] == {"recall": 0.5, "count": 2}
    # absent = named nothing in the image, whatever the word: "dog" chosen, "photo" and "blue" not
    assert summary["absent"] == {"selected": pytest.approx(1 / 3), "count": 3}
    assert summary["texture"] == {"recall": None, "count": 0}


@pytest.mark.parametrize("score_method, tags_per_caption", [("negatives", [2, 0]), ("softmax", [3, 1])])
def test_stage1_keeps_the_negative_prompts_out_of_the_tag_loss(tiny_model, monkeypatch, score_method,
                                                               tags_per_caption):
    """Taught as absent caption tags, the negative prompts drift and every tag clears the margin."""
    import ttd.train.loop as train_module

    seen = {}

    def capture(*args):
        seen["valid"], seen["negatives"] = args[3], args[14]
        raise StopIteration

    monkeypatch.setattr(train_module, "ttd_losses", capture)
    config = train_module.TrainConfig(score_method=score_method)
    with pytest.raises(StopIteration):
        train_module._step_losses(tiny_model, None, torch.zeros(2, 3, 64, 64), ["photo of a red circle", "a scene"],
                                  config)
    assert seen["valid"].sum(dim=1).tolist() == tags_per_caption  # "photo" and "scene" are negative prompts
    assert (seen["negatives"] is None) == (score_method == "softmax")
    if seen["negatives"] is not None:
        assert seen["negatives"].shape == (5, tiny_model.config.embed_dim)
