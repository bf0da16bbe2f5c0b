import numpy as np
import pytest

from ttd.evaluation.metrics import MaskCounts, TagCounts, average_precision, r_precision


def test_tag_counts_by_hand():
    counts = TagCounts()
    counts.add(np.array([0.9, 0.6, 0.2, 0.1]), np.array([True, False, True, False]), 0.5)
    counts.add(np.array([0.7]), np.array([True]), 0.5)
    summary = counts.summary()
    # TP 2, FP 1, FN 1, TN 1
    assert summary["precision"] == pytest.approx(2 / 3)
    assert summary["recall"] == pytest.approx(2 / 3)
    assert summary["f1"] == pytest.approx(2 / 3)
    assert summary["accuracy"] == pytest.approx(3 / 5)
    # AP of caption 1: hits at ranks 1 and 3 -> (1 + 2/3) / 2; caption 2: 1
    assert summary["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert summary["r_precision"] == pytest.approx((0.5 + 1) / 2)


def test_ranking_metrics():
    assert average_precision(np.array([0.1, 0.9]), np.array([True, False])) == pytest.approx(0.5)
    assert r_precision(np.array([0.1, 0.9, 0.5]), np.array([True, True, False])) == pytest.approx(0.5)


def test_mask_counts():
    masks = MaskCounts()
    predicted = np.array([[1, 1], [0, 0]], bool)
    truth = np.array([[1, 0], [1, 0]], bool)
    masks.add(predicted, truth)
    masks.add(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    summary = masks.summary()
    assert summary["iou"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["fpr"] == pytest.approx((1 / 2 + 0) / 2)
    assert summary["fnr"] == pytest.approx((1 / 2 + 0) / 2)


def test_tied_scores_are_ranked_pessimistically():
    """A tie earns no credit: a constant scorer must not look perfect because the relevant tags came first."""
    relevant = np.array([True, False, True, False])
    flat = np.full(4, 0.5)
    assert average_precision(flat, relevant) == pytest.approx((1 / 3 + 2 / 4) / 2)  # hits at ranks 3 and 4
    assert r_precision(flat, relevant) == 0.0
    # a partial tie: 0.9 first (relevant), then a 3-way tie at 0.4 of which one is relevant -> rank 4
    scores = np.array([0.4, 0.9, 0.4, 0.4])
    relevant = np.array([True, True, False, False])
    assert average_precision(scores, relevant) == pytest.approx((1 + 2 / 4) / 2)
    assert r_precision(scores, relevant) == pytest.approx(0.5)
    # the order of the input does not matter
    assert average_precision(scores[::-1], relevant[::-1]) == pytest.approx((1 + 2 / 4) / 2)
