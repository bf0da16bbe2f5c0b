import math

import pytest
import torch

from ttd.model.scoring import (global_tag_scores, minmax_over_tags, pad_tags, pixel_tag_probs, pixel_tag_scores, select_tags,
                         tag_masks)


def unit(*values):
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.norm()


@pytest.fixture()
def two_pixel_example():
    """One image, 1x2 pixels, D=2: pixel 0 points at tag 0, pixel 1 half-way between the tags."""
    f0, f1 = unit(1.0, 0.0), unit(1.0, 1.0)
    patch = torch.stack([f0, f1], dim=1).reshape(1, 2, 1, 2)
    tags = torch.stack([unit(1.0, 0.0), unit(0.0, 1.0)]).reshape(1, 2, 2)
    return patch, tags


def test_pixel_tag_score_matches_hand_computation(two_pixel_example):
    patch, tags = two_pixel_example
    tau = 10.0
    # pixel 0: cos = (1, 0); pixel 1: cos = (1/√2, 1/√2)
    p_tag1_pixel0 = 1 / (1 + math.exp(tau * 1.0))  # softmax over (10, 0) for tag 1
    p_tag1_pixel1 = 0.5
    scores = pixel_tag_scores(patch, tags, tau)
    expected_tag0 = max(1 / (1 + math.exp(-tau)), 0.5)
    expected_tag1 = max(p_tag1_pixel0, p_tag1_pixel1)
    torch.testing.assert_close(scores, torch.tensor([[expected_tag0, expected_tag1]]), rtol=1e-6, atol=1e-6)
    assert select_tags(scores, 0.5).tolist() == [[True, True]]
    assert select_tags(scores, 0.6).tolist() == [[True, False]]


def test_padding_is_excluded_from_the_softmax(two_pixel_example):
    patch, tags = two_pixel_example
    padded = torch.cat([tags, torch.zeros(1, 1, 2)], dim=1)
    valid = torch.tensor([[True, True, False]])
    scores = pixel_tag_scores(patch, padded, 10.0, valid)
    torch.testing.assert_close(scores[:, :2], pixel_tag_scores(patch, tags, 10.0))
    assert scores[0, 2] == 0


def test_flip_tta_averages_the_maps_of_both_views():
    generator = torch.Generator().manual_seed(0)
    patch = torch.nn.functional.normalize(torch.randn(1, 4, 3, 5, generator=generator), dim=1)
    flipped_view = torch.nn.functional.normalize(torch.randn(1, 4, 3, 5, generator=generator), dim=1)
    tags = torch.nn.functional.normalize(torch.randn(1, 3, 4, generator=generator), dim=-1)
    expected = ((pixel_tag_probs(patch, tags, 100.0) + pixel_tag_probs(flipped_view.flip(-1), tags, 100.0)) / 2).amax(dim=(2, 3))
    torch.testing.assert_close(pixel_tag_scores(patch, tags, 100.0, flipped_patch_embeds=flipped_view), expected)
    # a view that is exactly the mirror image changes nothing
    torch.testing.assert_close(pixel_tag_scores(patch, tags, 100.0, flipped_patch_embeds=patch.flip(-1)),
                               pixel_tag_scores(patch, tags, 100.0))


def test_minmax_and_sigmoid_scores(two_pixel_example):
    patch, tags = two_pixel_example
    # best-pixel cosines: tag 0 -> 1, tag 1 -> 1/√2: min-max over tags gives (1, 0)
    torch.testing.assert_close(pixel_tag_scores(patch, tags, 100.0, method="minmax"), torch.tensor([[1.0, 0.0]]))
    sigmoid = pixel_tag_scores(patch, tags, 100.0, method="sigmoid", mask_weight=10.0, mask_bias=-2.5)
    expected = torch.sigmoid(torch.tensor([[10.0 - 2.5, 10.0 / math.sqrt(2) - 2.5]]))
    torch.testing.assert_close(sigmoid, expected)
    assert minmax_over_tags(torch.tensor([[0.3]]), None).item() == 1.0


def test_global_scores_and_masks():
    embeds = unit(1.0, 0.0).reshape(1, 2)
    tags = torch.stack([unit(1.0, 0.0), unit(0.0, 1.0)]).reshape(1, 2, 2)
    scores = global_tag_scores(embeds, tags, 100.0)
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))
    assert scores[0, 0] > 0.999
    torch.testing.assert_close(tag_masks(torch.tensor(0.25), 10.0, -2.5), torch.tensor(0.5))


def test_pad_tags_indexes_unique_tags():
    unique, index, valid = pad_tags([["red", "circle"], ["circle"], []])
    assert unique == ["red", "circle"]
    assert index.tolist() == [[0, 1], [1, 0], [0, 0]]
    assert valid.tolist() == [[True, True], [True, False], [False, False]]
