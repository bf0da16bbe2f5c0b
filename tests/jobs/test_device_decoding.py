"""`ttd tag --decode device` (docs/gpu.md, "GPU decoding"), everything but nvJPEG itself: the job
decodes its JPEGs with ttd.runtime.device_decode on CPU tensors (torchvision's decode_jpeg on the
CPU), judges the agreement gate on the first batch, leaves other files and what the device cannot
decode to PIL, and is refused where it cannot run."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.items import open_items
from ttd.data.world import make_sample
from ttd.jobs import device_decoding
from ttd.jobs.device_decoding import DeviceDecoding
from ttd.jobs.runner import JobOptions, run_job
from ttd.jobs.stream_job import CentreStep
from ttd.runtime import load_tagger

pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def tagger():
    return load_tagger("torch", device="cpu", threads=1)


def mixed_job(folder: Path, count: int = 24) -> Path:
    """World images larger than the model's input (so both paths resize): mostly JPEGs, every
    fifth a PNG, and one file that starts like a JPEG and is not one."""
    rows = []
    for i in range(count):
        sample = make_sample(5, i)
        image = Image.fromarray(sample.image).resize((100, 80), Image.BICUBIC)
        name = f"{i:03d}.png" if i % 5 == 4 else f"{i:03d}.jpg"
        image.save(folder / name, quality=95) if name.endswith(".jpg") else image.save(folder / name)
        rows.append({"image": name, "caption": sample.caption})
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    rows.insert(11, {"image": "broken.jpg", "caption": "a red circle"})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tagger, captions: Path, output: Path, decoding: DeviceDecoding | None, pipelined: bool = True,
        workers: int = 0) -> list[dict]:
    step = CentreStep(pipelined=pipelined, decoding=decoding)
    run_job(tagger, step, open_items(captions), output, {}, JobOptions(8, workers, progress=False))
    return [json.loads(line) for line in output.read_text().splitlines()]




@pytest.mark.parametrize("pipelined, workers", [(True, 0), (False, 0), (True, 1)])
def test_jpegs_decoded_on_the_device_after_the_gate_passes_and_the_rest_by_pil(tagger, tmp_path, monkeypatch,
                                                                               pipelined, workers):
    captions = mixed_job(tmp_path)
    reference = run(tagger, captions, tmp_path / "pil.jsonl", None, pipelined, workers)
    calls, said = [], []
    decode_batch = device_decoding.decode_batch
    monkeypatch.setattr(device_decoding, "decode_batch",
                        lambda datas, *a: calls.append(len(datas)) or decode_batch(datas, *a))
    decoding = DeviceDecoding("cpu", said.append)
    records = run(tagger, captions, tmp_path / "device.jsonl", decoding, pipelined, workers)
    jpegs = [[r["image"].endswith(".jpg") and r["image"] != "broken.jpg" for r in reference[i : i + 8]]
             for i in range(0, len(reference), 8)]
    assert calls == [sum(batch) for batch in jpegs]  # every batch's JPEGs went to the device, and only those
    assert decoding.gate.passed and decoding.gate.images == sum(jpegs[0]) and len(said) == 1
    assert said[0].startswith("--decode device: ") and "device decoding on" in said[0]
    assert records[:8] == reference[:8]  # the judged batch's records are PIL's
    broken = next(r for r in records if r["image"] == "broken.jpg")
    assert broken == next(r for r in reference if r["image"] == "broken.jpg")  # PIL's error, word for word
    assert "cannot decode image" in broken["error"]
    for mine, theirs in zip(records, reference):
        assert mine["image"] == theirs["image"]
        if not mine["image"].endswith(".jpg"):
            assert mine == theirs  # a PNG is PIL's, exactly
    alike = total = 0
    for mine, theirs in zip(records[8:], reference[8:]):
        if "error" in mine:
            continue
        for candidate in theirs["candidates"]:
            total += 1
            alike += (candidate["tag"] in mine["selected"]) == (candidate["tag"] in theirs["selected"])
    assert total > 40 and alike / total >= 0.99


def test_a_failed_gate_leaves_every_jpeg_to_pil_and_says_so(tagger, tmp_path, monkeypatch):
    captions = mixed_job(tmp_path)
    reference = run(tagger, captions, tmp_path / "pil.jsonl", None)
    monkeypatch.setattr("ttd.runtime.device_decode.GATE", 1.01)  # no agreement passes it
    calls, said = [], []
    decode_batch = device_decoding.decode_batch
    monkeypatch.setattr(device_decoding, "decode_batch",
                        lambda datas, *a: calls.append(len(datas)) or decode_batch(datas, *a))
    decoding = DeviceDecoding("cpu", said.append)
    records = run(tagger, captions, tmp_path / "device.jsonl", decoding)
    assert records == reference  # PIL's records, byte for byte
    assert len(calls) == 1 and not decoding.gate.passed  # the device decoded the judged batch only
    assert len(said) == 1 and "device decoding off" in said[0] and "PIL decodes every JPEG" in said[0]


def test_decode_device_is_refused_where_it_cannot_run(tmp_path):
    """On a machine without a CUDA GPU (this one), on the CPU, with whole images, another backend:
    one line naming why, before anything is loaded."""
    captions = mixed_job(tmp_path, 2)
    base = ["tag", "--captions", str(captions), "-o", str(tmp_path / "out.jsonl"), "--decode", "device"]
    import torch

    cases = [([], "this machine has none" if not torch.cuda.is_available() else None),
             (["--device", "cpu"], "not on --device cpu"),
             (["--crop", "whole"], "whole images are decoded at their own size by PIL"),
             (["--backend", "onnxruntime"], "--backend onnxruntime takes host arrays")]
    for extra, reason in cases:
        if reason is None:
            continue
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code != 0 and reason in result.output, (extra, result.output)
        assert "--decode device" in result.output and not (tmp_path / "out.jsonl").exists()
