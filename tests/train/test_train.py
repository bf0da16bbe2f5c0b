import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ttd.model.factory import create_model, load_checkpoint, save_checkpoint
from ttd.model.lora import LoRAConfig, inject_lora, merge_lora
from ttd.train.loop import TrainConfig, train

SMALL = dict(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2, lr=5e-3)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_starts_at_the_base_and_merges_exactly():
    model = create_model("world-tiny", seed=0)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.encode_image(pixels)[1]
        trainable = inject_lora(model, LoRAConfig(rank=4))
        torch.testing.assert_close(model.encode_image(pixels)[1], before)
        for p in trainable:
            if p.ndim == 2:
                p.normal_(0, 0.02)
        adapted = model.encode_image(pixels)[1]
        assert (adapted - before).abs().max() > 1e-3
        merge_lora(model)
        torch.testing.assert_close(model.encode_image(pixels)[1], adapted, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in model.state_dict())
    assert len(trainable) == 2 * 4 * 2 * 4 + 2  # A, B x 4 weights per block x 4 blocks x 2 towers + w, b


def test_ttd_training_writes_adapter_and_merged_model(tmp_path):
    base = create_model("world-tiny", seed=0)
    base_path = save_checkpoint(base, tmp_path / "base.safetensors")
    trained = train(load_checkpoint(base_path), TrainConfig(out_dir=str(tmp_path / "run"), **SMALL), progress=False)
    merged = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert merged.config.source == "ttd:registered:world-tiny"
    # the negatives margin was fitted to the trained model (world calibration split), on disk and in memory
    fit = json.loads((tmp_path / "run" / "train_config.json").read_text())["margin_calibration"]
    assert merged.config.negative_margin == trained.config.negative_margin == round(fit["margin"], 4)
    assert fit["candidates"] > 2000 and merged.config.negative_margin != base.config.negative_margin
    assert merged.config.margin_fit["method"] == "labelled" and fit["method"] == "labelled"
    assert merged.mask_weight.item() != 10.0  # the calibration was trained
    # the adapters were trained too: every adapted weight of both towers moved, nothing else did
    base_weights, merged_weights = load_checkpoint(base_path).state_dict(), merged.state_dict()
    adapted = {k for k in base_weights if ("resblocks" in k and k.endswith(("in_proj_weight", "out_proj.weight",
                                                                          "c_fc.weight", "c_proj.weight")))}
    assert len(adapted) == 2 * 4 * 4  # 2 towers x 4 blocks x 4 weights
    moved = {k for k in base_weights if k not in ("mask_weight", "mask_bias")
             and (merged_weights[k] - base_weights[k]).abs().max() > 1e-6}
    assert moved == adapted
    # the adapter alone, applied to the base, reproduces the merged model
    rebuilt = load_checkpoint(base_path)
    inject_lora(rebuilt, LoRAConfig())
    adapter = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    missing, unexpected = rebuilt.load_state_dict(adapter, strict=False)
    assert not unexpected
    merge_lora(rebuilt)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    logged = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert logged["objective"] == "ttd" and logged["skipped_samples"] == 0


def ttd_command(*args):
    """The `ttd` console script of this tree, whatever is on PATH."""
    return [sys.executable, "-m", "ttd.cli", *map(str, args)]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """A real `ttd train` process is SIGKILLed mid-run; the rerun must continue from last.pt.

    Training is seeded, so a restart from step 0 would also end with the same weights: the rerun
    must also start its progress at the killed step and never at step 0. (It cannot take another
    --seed to tell them apart: a resume with other settings is refused: tests/data/test_reliability_data.py.)"""
    steps = 30
    common = ["train", "--model", "world-tiny", "--steps", steps, "--batch-size", 8, "--warmup", 2, "--lr", 5e-3,
              "--checkpoint-every", 1, "--no-calibrate"]  # the margin fit after training is not what resumes
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(ttd_command(*common, "--out", run_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    state_path = run_dir / "last.pt"
    deadline = time.monotonic() + 600  # a hang guard, not a timing
    try:
        while not (state_path.is_file() and torch.load(state_path, weights_only=True)["step"] >= 3):
            assert process.poll() is None, f"ttd train ended before it could be killed: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "ttd train wrote no checkpoint of step 3 in 10 minutes"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    killed_at = torch.load(state_path, weights_only=True)["step"]
    assert 3 <= killed_at < steps and not (run_dir / "model.safetensors").exists()

    resumed = subprocess.run(ttd_command(*common, "--out", run_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"| {killed_at}/{steps} [" in resumed.stderr and f"| 0/{steps} [" not in resumed.stderr, resumed.stderr[-800:]
    # the uninterrupted run in a process of its own too: the same threads, so the same float sums
    # (the collapse guard's decisions turn tiny differences into other kept weights)
    straight = subprocess.run(ttd_command(*common, "--out", tmp_path / "straight"), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = load_file(str(tmp_path / "straight" / "model.safetensors"))
    actual = load_file(str(run_dir / "model.safetensors"))
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=key)


def test_clip_objective_lowers_the_contrastive_loss(tmp_path):
    from ttd.data.sources import WorldSource
    from ttd.train.distill import clip_loss
    from ttd.runtime.images import normalize

    model = create_model("world-tiny", seed=0)
    source = WorldSource(seed=9)
    images, captions = zip(*(source.get(i) for i in range(32)))
    import numpy as np

    pixels = torch.from_numpy(normalize(np.stack(images), model.config.mean, model.config.std))

    def loss(m):
        with torch.no_grad():
            return clip_loss(m.encode_image(pixels)[0], m.encode_texts(list(captions)), m.clip.logit_scale).item()

    before = loss(model)
    train(model, TrainConfig(objective="clip", out_dir=str(tmp_path), steps=30, batch_size=32, warmup_steps=3,
                             lr=2e-3, checkpoint_every=30), progress=False)
    assert loss(model) < before - 0.2


def test_non_finite_loss_is_caught(tmp_path):
    model = create_model("world-tiny", seed=0)
    with torch.no_grad():
        model.mask_weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite steps"):
        train(model, TrainConfig(out_dir=str(tmp_path), max_bad_steps=1, **SMALL), progress=False)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    from ttd.data.annotations import write_world_split

    write_world_split(tmp_path / "d", seed=3, count=10, progress=False)
    (tmp_path / "d" / "images" / "000004.png").write_bytes(b"broken")
    (tmp_path / "d" / "images" / "000007.png").unlink()
    config = TrainConfig(out_dir=str(tmp_path / "run"), data=str(tmp_path / "d" / "annotations.jsonl"), **SMALL)
    train(create_model("world-tiny", seed=0), config, progress=False)
    logged = json.loads((tmp_path / "run" / "train_config.json").read_text())
    # 4 steps x 8 samples over a 10-sample dataset: each of the 2 bad files is drawn at least once
    assert logged["skipped_samples"] >= 2
    # user data: the margin is fitted label-free on the training pairs (the 8 readable ones), and recorded
    fit = logged["margin_calibration"]
    assert fit["method"] == "label-free" and fit["pairs"] == 8
    config = json.loads((tmp_path / "run" / "model.json").read_text())
    assert config["margin_fit"]["method"] == "label-free" and config["negative_margin"] == round(fit["margin"], 4)


def test_webdataset_shards_with_a_corrupt_sample(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from ttd.data.sources import ShardSource
    from ttd.runtime.images import Preprocess
    from ttd.data.world import make_sample

    with tarfile.open(tmp_path / "000.tar", "w") as tar:
        for i in range(4):
            sample = make_sample(3, i)
            buffer = io.BytesIO()
            Image.fromarray(sample.image).save(buffer, "JPEG")
            payload = {"jpg": buffer.getvalue() if i != 2 else b"corrupt", "txt": sample.caption.encode()}
            for ext, data in payload.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = ShardSource(str(tmp_path / "000.tar"), Preprocess(64))
    assert len(source) == 4
    image, caption = source.get(0)
    assert image.shape == (64, 64, 3) and caption == make_sample(3, 0).caption
    with pytest.raises(ValueError, match="sample 0002: cannot decode image"):
        source.get(2)


def test_distributed_training_matches_a_single_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), 4 samples each, equals one process with 8."""
    base = save_checkpoint(create_model("world-tiny", seed=0), tmp_path / "base.safetensors")
    common = ["train", "--checkpoint", str(base), "--steps", "3", "--warmup", "1", "--lr", "5e-3", "--no-resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(ttd_command(*common, "--batch-size", "8", "--out", tmp_path / "single"), env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as probe:  # a free port now, rather than a fixed one another run may hold
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "ttd.cli", *common,
                          "--batch-size", "4", "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    ddp = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    base_weights = load_file(str(base))
    changed = [k for k in single if not torch.equal(single[k], base_weights[k])]
    assert len(changed) > 10
    # float noise of different batch splits, amplified by Adam, stays below 2e-5 here; normalising the
    # losses by local instead of global counts (the mistake this guards against) differs by 5e-3
    worst = max((ddp[k] - single[k]).abs().max().item() for k in single)
    assert worst < 2e-4


def test_trained_model_stays_usable_after_its_outputs_are_written(tmp_path):
    model = train(create_model("world-tiny", seed=0), TrainConfig(out_dir=str(tmp_path), **SMALL), progress=False)
    merged = load_checkpoint(tmp_path / "model.safetensors")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels)[1], merged.encode_image(pixels)[1], rtol=1e-5, atol=1e-5)


def test_train_options_reach_the_training(tmp_path, monkeypatch):
    """--lora-targets, --score and --frozen-teacher change what `ttd train` does, not only its log."""
    from click.testing import CliRunner

    import ttd.train.loop as train_module
    from ttd.cli import main

    calls = []
    real_losses = train_module.ttd_losses

    def recording_losses(*args, **kwargs):
        calls.append((args, kwargs))
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(train_module, "ttd_losses", recording_losses)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", "world-tiny", "--steps", "2", "--batch-size", "4", "--warmup",
                                       "1", "--lr", "5e-3", "--lora-targets", "attn", "--stage1-score", "minmax",
                                       "--frozen-teacher", "--target-norm", "cosine", "--no-collapse-guard",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["target_norm"], recorded["collapse_guard"]) == ("cosine", None)  # no guard ran
    adapter = load_file(str(out / "adapter.safetensors"))
    lora_keys = [k for k in adapter if "lora_" in k]
    assert len(lora_keys) == 2 * 4 * 2 * 2  # towers x blocks x (in_proj, out_proj) x (A, B): no MLP adapters
    assert all(".attn." in k for k in lora_keys), lora_keys
    assert len(calls) == 2
    for args, _ in calls:
        score_method, teacher = args[11], args[12]
        assert score_method == "minmax"
        assert teacher is not None  # a separate frozen teacher, not the online student
    # after one update the student has moved, the frozen teacher has not: their features differ
    student_patch, (teacher_patch, _) = calls[1][0][0], calls[1][0][12]
    assert (student_patch - teacher_patch.float()).abs().max() > 1e-5
    logged = json.loads((out / "train_config.json").read_text())
    assert logged["score_method"] == "minmax" and logged["frozen_teacher"] and logged["lora"]["targets"] == ["attn"]
