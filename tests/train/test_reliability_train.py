"""What `ttd train` never loses and never hides (docs/reliability.md, "Training"): the trained
weights are written before the margin is fitted, a failed fit is a warning with the command to
run, and bad captions or settings end in one line."""

import json

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
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out)] + SMALL)
    # before: the fit ran first and wrote 210.9 (or, once refused, left only last.pt)
    assert result.exit_code == 0, result.output
    assert "warning: the negatives margin was not fitted" in result.output and "give 0" in result.output
    assert f"ttd calibrate --checkpoint {out / 'model.safetensors'} --captions PAIRS.jsonl" in result.output
    model = load_checkpoint(out / "model.safetensors")
    assert model.config.margin_fit is None and model.config.negative_margin == 2.2
    logged = json.loads((out / "train_config.json").read_text())
    assert "shuffled tags" in logged["margin_calibration"]["error"]
    # the finished run resumes without the fit when asked (a setting a resume may change)
    again = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), "--no-calibrate"] + SMALL)
    assert again.exit_code == 0, again.output
    assert "negative_margin stays 2.2" in again.output and (out / "model.safetensors").is_file()
