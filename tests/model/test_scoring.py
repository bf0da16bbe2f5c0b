"""THE scoring function (ttd.model.scoring.tag_head) against the formulas of docs/architecture.md
§3.3 written out naively, pixel by pixel; padding with a validity mask is exact for every score
(the softmax and the min-max over tags included), views average their maps, and one shared
vocabulary row broadcasts over the images exactly."""

import math

import numpy as np
import pytest
import torch

from ttd.model.contract import SCORE_ROWS
from ttd.model.scoring import (combine_windows, global_tag_scores, minmax_over_tags, pad_tags, score_row, select_tags,
                               tag_head)

TAU, W, B, MARGIN = 100.0, 10.0, -2.5, 2.2


def unit(*values):
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.norm()


def random_case(seed=0, batch=3, views=2, dim=6, h=3, w=4, tags=5, negatives=3):
    g = torch.Generator().manual_seed(seed)
    n = torch.nn.functional.normalize
    return (n(torch.randn(batch, views, dim, h, w, generator=g), dim=2), n(torch.randn(batch, tags, dim, generator=g), dim=-1),
            n(torch.randn(1, negatives, dim, generator=g), dim=-1))


def naive_scores(views, tags, negatives, tau=TAU, margin=MARGIN):
    """Every score of one image, pixel by pixel in float64: views [V, D, h, w], tags [K, D], negatives [N, D]."""
    views, tags, negatives = (x.double().numpy() for x in (views, tags, negatives))
    v_count, _, h, w = views.shape
    k = len(tags)
    neg_map, soft_map, sig_map, cos_map = (np.zeros((v_count, k, h, w)) for _ in range(4))
    for v in range(v_count):
        for i in range(h):
            for j in range(w):
                f = views[v, :, i, j]
                cos = tags @ f
                pooled = math.log(sum(math.exp(tau * c) for c in negatives @ f))
                exps = np.exp(tau * cos - (tau * cos).max())
                for t in range(k):
                    neg_map[v, t, i, j] = 1 / (1 + math.exp(-(tau * cos[t] - pooled - margin)))
                    soft_map[v, t, i, j] = exps[t] / exps.sum()
                    sig_map[v, t, i, j] = 1 / (1 + math.exp(-(W * cos[t] + B)))
                    cos_map[v, t, i, j] = cos[t]
    peak = cos_map.mean(0).max(axis=(1, 2))
    minmax = (peak - peak.min()) / (peak.max() - peak.min()) if peak.max() > peak.min() else np.ones(k)
    return {"negatives": neg_map.mean(0).max(axis=(1, 2)), "softmax": soft_map.mean(0).max(axis=(1, 2)),
            "minmax": minmax, "sigmoid": sig_map.mean(0).max(axis=(1, 2)), "peak_cosine": peak,
            "cosines": cos_map.mean(0)}


def head(views, tags, valid, negatives, margin=MARGIN):
    return tag_head(views, tags, valid, negatives, torch.tensor([margin]), TAU, W, B)


def test_every_score_equals_its_formula_with_two_views():
    views, tags, negatives = random_case()
    scores, cosines = head(views, tags, torch.ones(tags.shape[:2], dtype=torch.bool), negatives)
    assert scores.shape == (3, len(SCORE_ROWS), 5) and cosines.shape == (3, 5, 3, 4)
    for row in range(3):
        expected = naive_scores(views[row], tags[row], negatives[0])
        for name in SCORE_ROWS:
            np.testing.assert_allclose(score_row(scores, name)[row].numpy(), expected[name], atol=2e-5, err_msg=name)
        np.testing.assert_allclose(cosines[row].numpy(), expected["cosines"], atol=1e-6)


@pytest.mark.parametrize("score", SCORE_ROWS)
def test_a_padded_batch_gives_each_list_its_own_scores(score):
    """Lists of 5, 2 and 3 tags padded into one call score as each list alone, whatever the padding
    holds (here: other tags, which would win a softmax they took part in); padding scores 0."""
    views, tags, negatives = random_case(seed=1)
    lengths = [5, 2, 3]
    valid = torch.tensor([[k < n for k in range(5)] for n in lengths])
    scores = score_row(head(views, tags, valid, negatives)[0], score)
    for row, n in enumerate(lengths):
        alone = score_row(head(views[row : row + 1], tags[row : row + 1, :n], valid[row : row + 1, :n], negatives)[0], score)
        torch.testing.assert_close(scores[row, :n], alone[0], atol=1e-6, rtol=0)
        assert (scores[row, n:] == 0).all()


def test_one_vocabulary_row_broadcasts_over_the_images():
    views, tags, negatives = random_case(seed=2)
    shared = tags[:1]
    one = head(views, shared, torch.ones(1, 5, dtype=torch.bool), negatives)
    expanded = head(views, shared.expand(3, -1, -1), torch.ones(3, 5, dtype=torch.bool), negatives.expand(3, -1, -1))
    torch.testing.assert_close(one[0], expanded[0])
    torch.testing.assert_close(one[1], expanded[1])


def test_views_average_their_maps_and_a_mirrored_copy_changes_nothing():
    views, tags, negatives = random_case(seed=3, views=1)
    valid = torch.ones(3, 5, dtype=torch.bool)
    single = head(views, tags, valid, negatives)[0]
    doubled = head(torch.cat([views, views], dim=1), tags, valid, negatives)[0]
    torch.testing.assert_close(single, doubled)


def test_two_pixel_example_by_hand():
    """Pixel 0 points at tag 0, pixel 1 half-way between the two tags (D = 2, τ = 10)."""
    patch = torch.stack([unit(1.0, 0.0), unit(1.0, 1.0)], dim=1).reshape(1, 1, 2, 1, 2)
    tags = torch.stack([unit(1.0, 0.0), unit(0.0, 1.0)]).reshape(1, 2, 2)
    scores, _ = tag_head(patch, tags, torch.ones(1, 2, dtype=torch.bool), tags, torch.tensor([0.0]), 10.0, W, B)
    softmax = score_row(scores, "softmax")
    expected = [max(1 / (1 + math.exp(-10.0)), 0.5), max(1 / (1 + math.exp(10.0)), 0.5)]
    torch.testing.assert_close(softmax, torch.tensor([expected]), rtol=1e-6, atol=1e-6)
    assert select_tags(softmax, 0.5).tolist() == [[True, True]]
    assert select_tags(softmax, 0.6).tolist() == [[True, False]]
    assert score_row(scores, "minmax").tolist() == [[1.0, 0.0]]  # peak cosines 1 and 1/√2


def test_minmax_over_tags_ignores_padding_and_a_single_tag_scores_one():
    raw = torch.tensor([[0.2, 0.6, 9.0], [0.3, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(minmax_over_tags(raw, valid)[:, :2], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))


def test_combine_windows_takes_the_best_window_and_minmax_over_the_whole_image():
    views, tags, negatives = random_case(seed=4, batch=4, views=1)
    shared = tags[:1]
    windows = head(views, shared, torch.ones(1, 5, dtype=torch.bool), negatives)[0]
    combined = combine_windows(windows)
    # the windows side by side are one image: its best pixels are the best windows' pixels
    whole = torch.cat(list(views), dim=-1)[None]  # [1, 1, D, h, 4·w]
    expected = head(whole, shared, torch.ones(1, 5, dtype=torch.bool), negatives)[0][0]
    torch.testing.assert_close(combined, expected, atol=1e-6, rtol=0)


def test_combine_windows_of_several_images_at_once_is_each_images_own_exactly():
    """Images combined together (leading dimension, tags padded with their validity) give the
    numbers each image gets alone, in numpy (the whole-image job's record stage) and torch."""
    rng = np.random.default_rng(0)
    scores = rng.random((3, 4, len(SCORE_ROWS), 5)).astype(np.float32)  # 3 images, 4 windows, 5 tag slots
    counts = [5, 2, 1]
    valid = np.arange(5)[None] < np.array(counts)[:, None]
    together = combine_windows(scores, valid)
    for n, k in enumerate(counts):
        assert np.array_equal(together[n][:, :k], combine_windows(scores[n][:, :, :k]))
    assert torch.equal(combine_windows(torch.from_numpy(scores), torch.from_numpy(valid))[1][:, :2],
                       combine_windows(torch.from_numpy(scores[1][:, :, :2])))


def test_global_scores_and_pad_tags():
    embeds = unit(1.0, 0.0)[None]
    tags = torch.stack([unit(1.0, 0.0), unit(0.0, 1.0), unit(1.0, 0.0)])[None]
    scores = global_tag_scores(embeds, tags, 100.0, torch.tensor([[True, True, False]]))
    assert scores[0, 0] > 0.999 and scores[0, 2] == 0
    unique, index, valid = pad_tags([["red", "circle"], ["circle"], []])
    assert unique == ["red", "circle"]
    assert index.tolist() == [[0, 1], [1, 0], [0, 0]]
    assert valid.tolist() == [[True, True], [True, False], [False, False]]
