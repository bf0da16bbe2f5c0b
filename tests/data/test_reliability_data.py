"""Reliability of evaluation data and training resume (issue #8, items 7, 10 and 11): masks read
as the format says, bad samples skipped with a reason, a resume with other settings refused,
clean errors instead of tracebacks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ttd.data.annotations import read_eval_split, write_world_split
from ttd.model.factory import create_model
from ttd.runtime.images import Preprocess
from ttd.train.loop import TrainConfig, train


@pytest.fixture()
def eval_folder(tmp_path):
    write_world_split(tmp_path, seed=2, count=3, progress=False)
    return tmp_path


def test_zero_one_masks_are_read_as_non_zero_inside(eval_folder):
    reference = read_eval_split(eval_folder / "annotations.jsonl", Preprocess(64))
    for line in (eval_folder / "annotations.jsonl").read_text().splitlines():
        record = json.loads(line)
        for rel in [record["caption_mask"], *record["tag_masks"].values()]:
            values = np.asarray(Image.open(eval_folder / rel))
            Image.fromarray((values > 0).astype(np.uint8), "L").save(eval_folder / rel)  # 0/1, not 0/255
    again = read_eval_split(eval_folder / "annotations.jsonl", Preprocess(64))
    assert len(again) == 3
    for a, b in zip(reference, again):
        assert a.caption_mask.sum() > 0
        assert np.array_equal(a.caption_mask, b.caption_mask)
        assert all(np.array_equal(a.tag_masks[t], b.tag_masks[t]) for t in a.tag_masks)


def test_wrong_size_and_missing_masks_skip_their_sample_only(eval_folder):
    records = [json.loads(line) for line in (eval_folder / "annotations.jsonl").read_text().splitlines()]
    Image.new("L", (32, 48), 255).save(eval_folder / records[0]["caption_mask"])
    (eval_folder / records[1]["caption_mask"]).unlink()
    errors: list[str] = []
    samples = read_eval_split(eval_folder / "annotations.jsonl", Preprocess(64), errors=errors)
    assert [s.caption for s in samples] == [records[2]["caption"]]
    assert len(errors) == 2
    assert errors[0].endswith(f"record 1: mask {eval_folder / records[0]['caption_mask']} is 32x48, its image 64x64")
    assert errors[1].endswith(f"record 2: mask {eval_folder / records[1]['caption_mask']} does not exist")


def test_eval_command_reports_skipped_samples_and_goes_on(eval_folder):
    from click.testing import CliRunner

    from ttd.cli import main

    records = [json.loads(line) for line in (eval_folder / "annotations.jsonl").read_text().splitlines()]
    (eval_folder / records[0]["caption_mask"]).write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["eval", "--model", "world-tiny", "--data", str(eval_folder), "--json",
                                       str(eval_folder / "m.json")])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "cannot be read" in result.output
    metrics = json.loads((eval_folder / "m.json").read_text())
    assert metrics["samples"] == 2 and len(metrics["skipped"]) == 1


SMALL = dict(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=1)


def test_resume_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "run")
    train(create_model("world-tiny", seed=0), TrainConfig(out_dir=out, **SMALL), progress=False, stop_after=1)
    saved = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(ValueError) as error:
        train(create_model("world-tiny", seed=0), TrainConfig(out_dir=out, **{**SMALL, "lr": 2e-3, "batch_size": 6}),
              progress=False)
    message = str(error.value)
    assert "batch_size: 4 -> 6" in message and "lr: 0.001 -> 0.002" in message and "--no-resume" in message
    assert (tmp_path / "run" / "last.pt").read_bytes() == saved  # nothing overwritten
    assert not (tmp_path / "run" / "train_config.json").exists()
    # the same settings resume (and a moved --out or another --checkpoint-every may differ)
    train(create_model("world-tiny", seed=0), TrainConfig(out_dir=out, **{**SMALL, "checkpoint_every": 2}),
          progress=False)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["lr"] == 1e-3


def test_a_garbage_training_state_is_a_clean_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(ValueError) as error:
        train(create_model("world-tiny", seed=0), TrainConfig(out_dir=str(tmp_path), **SMALL), progress=False)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'last.pt'} is not a training state written by `ttd train`")
    assert "weights_only=False" not in message and "--no-resume" in message
    torch.save({"model": {}}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="is not a training state written by `ttd train`; delete it"):
        train(create_model("world-tiny", seed=0), TrainConfig(out_dir=str(tmp_path), **SMALL), progress=False)


def test_a_json_array_line_in_training_data_names_file_and_line(tmp_path):
    from ttd.data.sources import read_jsonl

    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.png", "caption": "x"}\n["a.png", "x"]\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: a JSON list, expected an object"):
        read_jsonl(path)
