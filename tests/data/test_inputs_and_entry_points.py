"""Claims of the README with no test before: webdataset inputs, `ttd world generate` +
`ttd eval --data`, --pretrained FILE, the hub fast-fail, the torch backend's --device / --threads /
--dtype float16."""

import io
import json
import tarfile
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.runtime.images import Preprocess


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture()
def shards(tmp_path):
    """Two shards: png + json caption, webp (lossless) + txt caption."""
    with tarfile.open(tmp_path / "000.tar", "w") as tar:
        for i in range(3):
            add(tar, f"a{i}.png", encoded(make_sample(4, i).image, "PNG"))
            add(tar, f"a{i}.json", json.dumps({"caption": make_sample(4, i).caption, "id": i}).encode())
    with tarfile.open(tmp_path / "001.tar", "w") as tar:
        for i in range(3, 6):
            buffer = io.BytesIO()
            Image.fromarray(make_sample(4, i).image).save(buffer, "WEBP", lossless=True)
            add(tar, f"b{i}.webp", buffer.getvalue())
            add(tar, f"b{i}.txt", make_sample(4, i).caption.encode())
    return tmp_path


def test_webdataset_brace_pattern_png_webp_and_json_captions(shards):
    from ttd.data.sources import open_source

    source = open_source(str(shards / "{000..001}.tar"), Preprocess(64), seed=0)
    assert len(source) == 6
    for index in range(6):
        image, caption = source.get(index)
        expected = make_sample(4, index)
        assert caption == expected.caption
        assert np.array_equal(image, expected.image), index  # both formats lossless at the model's size


def test_ttd_train_on_shards(shards):
    out = shards / "run"
    result = CliRunner().invoke(main, ["train", "--model", "world-tiny", "--captions", str(shards / "{000..001}.tar"),
                                       "--steps", "2", "--batch-size", "4", "--warmup", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    logged = json.loads((out / "train_config.json").read_text())
    assert logged["data"].endswith("{000..001}.tar") and logged["skipped_samples"] == 0
    assert (out / "model.safetensors").is_file() and (out / "adapter.safetensors").is_file()


def test_world_generate_then_eval_data_equals_the_in_memory_split(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["world", "generate", str(tmp_path / "split"), "--count", "12", "--seed", "2"])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "split" / "annotations.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len(list((tmp_path / "split" / "images").glob("*.png"))) == 12
    metrics = {}
    for name, args in (("disk", ["--data", str(tmp_path / "split")]), ("memory", ["--count", "12", "--seed", "2"])):
        result = runner.invoke(main, ["eval", *args, "--json", str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert metrics["disk"]["samples"] == 12 and metrics["disk"]["candidates"] > 30
    assert metrics["disk"]["tags"] == metrics["memory"]["tags"]
    assert metrics["disk"]["caption_mask"] == pytest.approx(metrics["memory"]["caption_mask"])
    missing = runner.invoke(main, ["eval", "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "nowhere does not exist (expected an evaluation folder with annotations.jsonl)" in missing.output


def test_pretrained_local_open_clip_file_is_loaded(tmp_path):
    import open_clip

    from ttd.model.factory import create_model

    torch.manual_seed(123)
    source = open_clip.create_model("ViT-S-32-alt")
    path = tmp_path / "open_clip_weights.pt"
    torch.save(source.state_dict(), path)
    model = create_model("ViT-S-32-alt", pretrained=str(path), seed=0)  # seed 0 init differs from seed 123
    loaded = model.clip.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert model.config.source == f"open_clip:ViT-S-32-alt/{path}"


def test_unreachable_hub_fails_fast_with_instructions(monkeypatch):
    from ttd.model.factory import ModelLoadError, create_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    message = str(error.value)
    assert "the model hub 127.0.0.1:9 is unreachable" in message
    assert "--pretrained /path/to/open_clip_model.safetensors" in message
    assert time.monotonic() - start < 60  # a hang guard: the point is not waiting for the hub client's retries


def test_torch_backend_device_threads_and_float16(tmp_path, monkeypatch):
    Image.fromarray(make_sample(2, 0).image).save(tmp_path / "a.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "caption": make_sample(2, 0).caption}) + "\n")
    runner = CliRunner()
    base = ["tag", "--captions", str(tmp_path / "c.jsonl"), "--quiet"]
    if not torch.cuda.is_available():
        result = runner.invoke(main, [*base, "-o", str(tmp_path / "x.jsonl"), "--device", "cuda"])
        assert result.exit_code == 2 and "--device cuda: CUDA is not available" in result.output
    threads = torch.get_num_threads()
    try:
        scores = {}
        for dtype in ("float32", "float16"):
            out = tmp_path / f"{dtype}.jsonl"
            result = runner.invoke(main, [*base, "-o", str(out), "--device", "cpu", "--threads", "1", "--dtype", dtype])
            assert result.exit_code == 0, result.output
            assert torch.get_num_threads() == 1
            record = json.loads(out.read_text())
            assert "error" not in record
            scores[dtype] = np.array([c["score"] for c in record["candidates"]])
    finally:
        torch.set_num_threads(threads)
    assert len(scores["float16"]) == len(scores["float32"]) >= 2
    np.testing.assert_allclose(scores["float16"], scores["float32"], atol=0.05)
    assert not np.array_equal(scores["float16"], scores["float32"])  # it did run in half precision
