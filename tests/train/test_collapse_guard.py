"""The caption-mask collapse: its mechanism in the targets, and the label-free guard
that flags it in training (ttd/train/guard.py, docs/training.md). Offline, a few seconds."""

import functools
import json

import pytest
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


def _scripted_diagnostics(monkeypatch, healthy_steps):
    """The real training loop, with the guard's two diagnostics scripted per step (healthy, then
    collapsed), and the trainable weights recorded as each step begins (= after the step before)."""
    real = loop_module._step_losses
    seen = {"step": 0, "weights": []}

    def scripted(model, teacher, pixels, captions, config, *rest):
        step = seen["step"]
        seen["weights"].append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        loss, logs = real(model, teacher, pixels, captions, config, *rest)
        seen["step"] += 1
        return loss, {**logs, "caption_above": 0.8 if step < healthy_steps else 0.05, "evidence_area": 0.85}

    monkeypatch.setattr(loop_module, "_step_losses", scripted)
    return seen


def _saved_adapter_equals(path, weights):
    from safetensors.torch import load_file

    saved = load_file(str(path))  # the LoRA adapters and the mask head's w and b: every trained weight
    assert set(saved) == set(weights) and any("lora" in n for n in saved)
    return all(torch.equal(saved[n], w) for n, w in weights.items())


def _guarded_run(tmp_path, monkeypatch, warmup: int, healthy_steps: int, steps: int, **settings):
    """A short world-tiny run under a guard checking every 2 steps after `warmup`, its diagnostics
    scripted healthy for `healthy_steps`: (the guard's record, the weights as each step began)."""
    monkeypatch.setattr(loop_module, "CollapseGuard",
                        functools.partial(CollapseGuard, warmup=warmup, every=2, smoothing=1.0))
    seen = _scripted_diagnostics(monkeypatch, healthy_steps=healthy_steps)
    torch.manual_seed(0)
    config = TrainConfig(out_dir=str(tmp_path / "run"), steps=steps, batch_size=4, warmup_steps=1, lr=1e-2,
                         checkpoint_every=steps, calibrate_margin=False, **settings)
    train(create_model("world-tiny", seed=0), config, resume=False, progress=False)
    return json.loads((tmp_path / "run" / "train_config.json").read_text())["collapse_guard"], seen


def test_a_run_that_collapses_after_a_healthy_stretch_saves_exactly_the_kept_weights(tmp_path, monkeypatch):
    """The guard's restore was only tested on its own: the loop calling `guard.report` instead of
    `guard.restore` left the suite green. Healthy for 4 steps, collapsed for 2: the weights kept
    after step 4 (the last in-band snapshot) are the ones written."""
    recorded, seen = _guarded_run(tmp_path, monkeypatch, warmup=2, healthy_steps=4, steps=6)
    assert recorded["flagged"] and recorded["first_flagged_step"] == 4 and recorded["kept_step"] == 4
    assert len(seen["weights"]) == 6
    kept = seen["weights"][4]  # the weights after steps 0..3, as step 4 began
    assert _saved_adapter_equals(tmp_path / "run" / "adapter.safetensors", kept)
    assert not _saved_adapter_equals(tmp_path / "run" / "adapter.safetensors", seen["weights"][5])


def test_a_run_that_collapses_within_the_warm_up_ends_with_its_initial_weights(tmp_path, monkeypatch, capsys):
    """The first snapshot came at step 20: a run collapsing earlier (`--lr 0.3 --steps 30
    --batch-size 4`) wrote the collapsed weights after saying it would keep healthy ones."""
    recorded, seen = _guarded_run(tmp_path, monkeypatch, warmup=4, healthy_steps=0, steps=4)
    assert recorded["flagged"] and recorded["kept_step"] == 0 and recorded["kept_ratio"] is None
    assert _saved_adapter_equals(tmp_path / "run" / "adapter.safetensors", seen["weights"][0])
    assert "kept the weights of step 0 (the weights it started from: no step was seen healthy)" in capsys.readouterr().out


def test_a_restarting_guard_goes_on_from_the_snapshot_at_a_lower_rate_once(tmp_path, monkeypatch, capsys):
    """docs/training.md, "Segmentation too": restart. Healthy for 4 steps, collapsed after: at the
    flag (step 4) the weights of the snapshot are put back and the rest of the run trains at a
    tenth of the rate, once (step 5 is out of band again and goes on)."""
    rates = []
    real_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    recorded, seen = _guarded_run(tmp_path, monkeypatch, warmup=2, healthy_steps=4, steps=8,
                                  guard_restart_lr_scale=0.1)
    assert recorded["flagged"] and recorded["restarted_step"] == 4 and recorded["restarted_from"] == 4
    assert all(torch.equal(seen["weights"][5][n], w) for n, w in seen["weights"][4].items())  # step 4 undone
    assert not all(torch.equal(seen["weights"][6][n], w) for n, w in seen["weights"][5].items())  # and trained on
    plain = [loop_module._lr_factor(s, 1, 8) * 1e-2 for s in range(8)]
    assert rates[:5] == pytest.approx(plain[:5]) and rates[5:] == pytest.approx([0.1 * r for r in plain[5:]])
    assert capsys.readouterr().out.count("went back to the weights of step 4") == 1
