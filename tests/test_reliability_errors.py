"""Clean errors instead of tracebacks (issue #8, item 11): every damaged or wrong input names the
file and the problem, and the command exits with status 2."""

import json
import math

import pytest
from click.testing import CliRunner

from ttd.cli import main
from ttd.model.factory import create_model, save_checkpoint


@pytest.fixture()
def checkpoint(tmp_path):
    return save_checkpoint(create_model("world-tiny", seed=0), tmp_path / "model.safetensors")


def fails_cleanly(args, *expected):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for text in expected:
        assert text in result.output, result.output
    return result.output


def edit_config(checkpoint, change):
    path = checkpoint.with_suffix(".json")
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return path


def test_damaged_checkpoint_files(checkpoint, tmp_path):
    export = ["export", tmp_path / "out", "--checkpoint", checkpoint]
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[:100])
    fails_cleanly(export, f"checkpoint {checkpoint} cannot be read as safetensors")
    checkpoint.write_bytes(good)
    edit_config(checkpoint, lambda c: c["model_cfg"].update(embed_dim=c["model_cfg"]["embed_dim"] * 2))
    fails_cleanly(export, f"checkpoint {checkpoint} does not fit its config model.json")
    config = checkpoint.with_suffix(".json")
    config.write_text("{broken")
    fails_cleanly(export, f"{config} is not a usable model config")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("model_cfg"), "model config lacks model_cfg"),
    (lambda c: c.update(prompt_templates=["a photo of {0} and {1}"]), "prompt template 'a photo of {0} and {1}' must be text with one {}"),
    (lambda c: c.update(prompt_templates=["no placeholder"]), "prompt template 'no placeholder'"),
    (lambda c: c.update(image_size=10**6), "model config image_size 1000000 must be an integer in 8..4096"),
    (lambda c: c.update(tau=math.nan), "model config tau nan must be a finite number > 0"),
])
def test_bad_model_configs(checkpoint, tmp_path, change, message):
    config = edit_config(checkpoint, change)
    fails_cleanly(["export", tmp_path / "out", "--checkpoint", checkpoint], f"{config} is not a usable model config", message)


def test_unreachable_triton_url(tmp_path):
    from export.pipeline import run_export

    run_export(create_model("world-tiny", seed=0), tmp_path / "exp", check_count=4)
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "caption": "a red circle"}\n')
    fails_cleanly(["tag", "--captions", tmp_path / "c.jsonl", "-o", tmp_path / "o.jsonl", "--backend", "triton",
                   "--export-dir", tmp_path / "exp", "--url", "127.0.0.1:9"], "no Triton server answers at 127.0.0.1:9")
