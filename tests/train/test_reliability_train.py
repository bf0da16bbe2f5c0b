"""What `ttd train` never loses and never hides (docs/reliability.md, "Training"): the trained
weights are written before the margin is fitted, a failed fit is a warning with the command to
run, and bad captions or settings end in one line."""

import json

import pytest

from click.testing import CliRunner

from ttd.cli import main
from ttd.data.annotations import write_world_split
from ttd.model.factory import load_checkpoint

SMALL = ["--steps", "4", "--batch-size", "8", "--warmup", "1", "--checkpoint-every", "2", "--lr", "5e-3",
         "--model", "world-tiny", "--device", "cpu"]


def same_captions(folder, count=10):
    write_world_split(folder, seed=3, count=count, progress=False)
    path = folder / "annotations.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({"image": r["image"], "caption": "a red square on sand"}) + "\n"
                            for r in lines))
    return path


def test_a_failed_margin_fit_keeps_the_trained_weights(tmp_path):
    data = same_captions(tmp_path / "d")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--captions", str(data), "--out", str(out)] + SMALL)
    # before: the fit ran first and wrote 210.9 (or, once refused, left only last.pt)
    assert result.exit_code == 0, result.output
    assert "warning: the negatives margin was not fitted" in result.output and "give 0" in result.output
    assert f"ttd calibrate --checkpoint {out / 'model.safetensors'} --captions PAIRS.jsonl" in result.output
    model = load_checkpoint(out / "model.safetensors")
    assert model.config.margin_fit is None and model.config.negative_margin == 2.2
    logged = json.loads((out / "train_config.json").read_text())
    assert "shuffled tags" in logged["margin_calibration"]["error"]
    # the finished run resumes without the fit when asked (a setting a resume may change)
    again = CliRunner().invoke(main, ["train", "--captions", str(data), "--out", str(out), "--no-calibrate"] + SMALL)
    assert again.exit_code == 0, again.output
    assert "negative_margin stays 2.2" in again.output and (out / "model.safetensors").is_file()


def test_an_unbounded_caption_is_a_skipped_sample_not_the_run(tmp_path):
    """One 20,000-word caption grew `ttd train` to 23 GB (every word a tag, each embedded)."""
    from ttd.data.sources import open_source
    from ttd.runtime.images import Preprocess
    from ttd.train.loop import BatchLoader

    write_world_split(tmp_path / "d", seed=3, count=6, progress=False)
    path = tmp_path / "d" / "annotations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["caption"] = " ".join(f"junk{i}" for i in range(20_000))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loader = BatchLoader(open_source(str(path), Preprocess(64), 1), batch_size=6, seed=1, rank=0, world=1)
    images, captions = loader.batch(0)
    assert len(captions) == 5 and all(len(c) < 200 for c in captions)
    assert loader.skipped == ["2: caption has 20000 candidate tags, more than the limit of 1024 (the served tagger's "
                              "cap); split it into shorter captions"]


def test_captions_without_tags_and_divergence_are_one_line(tmp_path):
    import torch

    from ttd.errors import TTDError
    from ttd.model.factory import create_model
    from ttd.train.loop import TrainConfig, TrainingDiverged, train

    write_world_split(tmp_path / "d", seed=3, count=6, progress=False)
    path = tmp_path / "d" / "annotations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "caption": "of the and a, on it!"}) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["train", "--captions", str(path), "--out", str(tmp_path / "run")] + SMALL)
    # before: IndexError and its traceback
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: step 0: fewer than 2 readable samples in the batch")
    assert "has no candidate tags (only stopwords or punctuation)" in result.output
    model = create_model("world-tiny", seed=0)
    with torch.no_grad():
        model.mask_weight.fill_(float("nan"))  # every step non-finite, as --lr 1000 makes them
    config = TrainConfig(out_dir=str(tmp_path / "nan"), max_bad_steps=1, steps=4, batch_size=4, warmup_steps=1)
    with pytest.raises(TrainingDiverged, match=r"^training diverged: 2 non-finite steps \(the last at step 1\) at lr "
                                               r"0\.001: lower --lr"):
        train(model, config, progress=False)
    # a FloatingPointError as before, and what the CLI turns into one line (was a traceback)
    assert issubclass(TrainingDiverged, (TTDError)) and issubclass(TrainingDiverged, RuntimeError)
    assert issubclass(TrainingDiverged, FloatingPointError)


def test_a_torn_metrics_line_is_cut_on_resume(tmp_path):
    from ttd.model.factory import create_model
    from ttd.train.loop import TrainConfig, train

    config = TrainConfig(out_dir=str(tmp_path / "run"), steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2,
                         calibrate_margin=False, collapse_guard=False)
    train(create_model("world-tiny", seed=0), config, progress=False, stop_after=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 2, "loss": 4.0')  # a kill in the middle of a line
    train(create_model("world-tiny", seed=0), config, progress=False)  # before: a JSON error naming no file
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1, 2, 3]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["garbage"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=rf"^{metrics}:2 is not a metrics line written by `ttd train`"):
        from ttd.train.loop import MetricsLog

        MetricsLog(metrics, 3)
