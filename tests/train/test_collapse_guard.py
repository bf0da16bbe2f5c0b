"""The caption-mask collapse of issue 24: its mechanism in the targets, and the label-free guard
that flags it in training (ttd/train/guard.py, docs/training.md). Offline, a few seconds."""

import functools
import json

import torch

import ttd.train.loop as loop_module

from ttd.model.factory import create_model
from ttd.train.distill import distill_targets
from ttd.train.guard import CollapseGuard
from ttd.train.loop import TrainConfig, train


def test_mask_targets_shrink_when_cosines_drift_down_cosine_targets_do_not():
    """The mechanism: the same cosine map shifted down by 0.2 puts the mask in the sigmoid's lower
    tail, and min-max of the mask becomes a peak; min-max of the cosine does not move."""
    cosines = torch.linspace(0.0, 0.6, 64).reshape(1, 1, 8, 8)
    selected = torch.ones(1, 1, dtype=torch.bool)
    w, b = 10.0, -2.5
    area = {}
    for norm in ("mask", "cosine"):
        for shift in (0.0, -0.2):
            _, union = distill_targets(w * (cosines + shift) + b, selected, norm)
            area[norm, shift] = float((union >= 0.5).float().mean())
    assert area["mask", -0.2] < 0.75 * area["mask", 0.0]
    assert area["cosine", -0.2] == area["cosine", 0.0] == 0.5


def _feed(guard, params, steps, caption, evidence, start):
    lines = []
    for step in range(start, start + steps):
        params[0].data.fill_(step)  # the weights "are" the step they were trained to
        lines.append(guard.observe(step, {"caption_above": caption, "evidence_area": evidence}, params))
    return [line for line in lines if line]


def test_guard_flags_shrinking_masks_once_and_restores_the_last_healthy_weights():
    params = [torch.nn.Parameter(torch.zeros(1))]
    guard = CollapseGuard()
    assert _feed(guard, params, 60, caption=0.8, evidence=0.85, start=0) == []
    lines = _feed(guard, params, 60, caption=0.15, evidence=0.8, start=60)
    assert len(lines) == 1 and "shrank" in lines[0]
    report = guard.restore(params)
    assert report.flagged and 60 <= report.first_flagged_step < 80
    assert report.kept_step is not None and report.kept_step % 10 == 0 and report.kept_step <= report.first_flagged_step
    assert params[0].item() == report.kept_step - 1  # the weights after step kept_step - 1, i.e. kept_step steps
    assert report.final_ratio < 0.5 <= report.kept_ratio


def test_guard_keeps_the_last_weights_of_a_healthy_or_recovered_run():
    params = [torch.nn.Parameter(torch.zeros(1))]
    guard = CollapseGuard()
    _feed(guard, params, 60, caption=0.8, evidence=0.85, start=0)
    _feed(guard, params, 30, caption=0.1, evidence=0.8, start=60)
    _feed(guard, params, 60, caption=0.7, evidence=0.8, start=90)  # recovered: the last weights are kept
    report = guard.restore(params)
    assert report.flagged and report.kept_step is None and params[0].item() == 149


def test_training_flags_collapsed_caption_masks_and_records_it(tmp_path, capsys, monkeypatch):
    """A mask head far in the sigmoid's tail (b = -30): every caption mask is empty while the
    selected tags win most pixels, the collapse at its extreme. `ttd train` must say so and
    record it; without the guard this test fails."""
    monkeypatch.setattr(loop_module, "CollapseGuard", functools.partial(CollapseGuard, warmup=4, every=2))  # a short run
    torch.manual_seed(0)
    model = create_model("world-tiny", seed=0)
    with torch.no_grad():
        model.mask_bias.fill_(-30.0)
    config = TrainConfig(out_dir=str(tmp_path / "run"), steps=8, batch_size=4, warmup_steps=1, lr=1e-3,
                         checkpoint_every=8, calibrate_margin=False, target_norm="mask")
    train(model, config, resume=False, progress=False)
    printed = capsys.readouterr()
    assert "collapse guard" in printed.out + printed.err
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["collapse_guard"]
    assert recorded["flagged"] and recorded["final_ratio"] < 0.5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"caption_area", "target_area", "evidence_area", "w", "b", "selected"} <= rows[0].keys()
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
