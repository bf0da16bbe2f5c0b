"""The pipelined tagging path on a CPU, where streams and events are no-ops:
its records are byte for byte those of the plain path in every mode, its top-k from the
device's candidates is the full sort's, and the job reports its stage times."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttd.data.items import open_items
from ttd.data.world import make_sample
from ttd.jobs.stream_job import ranked_top, tag_stream
from ttd.runtime import load_tagger

VOCABULARY = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "heart", "grass", "sand",
              "water", "purple", "orange", "dog"]


@pytest.fixture(scope="module")
def taggers():
    """The embedded world model (trained: its selections are not all empty), without and with flip TTA."""
    return {flip: load_tagger("torch", device="cpu", flip_tta=flip) for flip in (False, True)}


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    rows = []
    for i in range(23):
        if i == 7:
            rows.append({"image": "missing.png", "caption": "a red circle"})
            continue
        sample = make_sample(2, i)
        Image.fromarray(sample.image).save(folder / f"{i:03d}.png")
        rows.append({"image": f"{i:03d}.png", "caption": sample.caption if i != 11 else "the of and"})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tagger, captions: Path, out: Path, pipelined: bool, **options) -> bytes:
    summary = tag_stream(tagger, open_items(captions), out, batch_size=5, progress=False, decode_workers=0,
                         pipelined=pipelined, inputs=[captions], **options)
    assert summary.items == 23
    return out.read_bytes()


@pytest.mark.parametrize("mode", ["captions", "flip", "vocabulary", "vocabulary_top3", "rle_masks",
                                  "vocabulary_repeated_tag"])
def test_pipelined_job_writes_the_plain_jobs_bytes(taggers, captions, tmp_path, mode):
    tagger = taggers[mode == "flip"]
    options: dict = {}
    if mode.startswith("vocabulary"):
        options["vocabulary"] = VOCABULARY + (["red"] if mode == "vocabulary_repeated_tag" else [])
        options["top_k"] = 3 if mode == "vocabulary_top3" else 10
    if mode == "rle_masks":
        options["rle_masks"] = True
    plain = _run(tagger, captions, tmp_path / "plain.jsonl", False, **options)
    pipelined = _run(tagger, captions, tmp_path / "pipelined.jsonl", True, **options)
    records = [json.loads(line) for line in pipelined.splitlines()]
    # a missing image; a caption of stopwords only (no error against a vocabulary)
    assert len(records) == 23 and sum("error" in r for r in records) == (1 if "vocabulary" in options else 2)
    assert sum(len(r.get("selected", [])) for r in records) >= 10  # the comparison covers real selections
    assert pipelined == plain


def test_device_top_k_candidates_give_the_full_sort(taggers):
    """Scores that tie after rounding to 6 decimals rank in vocabulary order, as sorting every
    {tag, score} does, whether the device's candidates suffice or the full row is needed."""
    rng = np.random.default_rng(5)
    for trial in range(300):
        k = int(rng.integers(1, 60))
        row = rng.choice(np.float32([0.1, 0.2000001, 0.2000004, 0.2000006, 0.3, 0.5000002, 0.5, 0.9]), k)
        row = (row + rng.normal(0, 1e-7, k).astype(np.float32) * (trial % 2)).astype(np.float32)
        top_k = int(rng.integers(0, 12))
        values = row.tolist()
        want = sorted(range(k), key=lambda i: -round(values[i], 6))[:top_k]
        for width in (1, 3, top_k + 2, k):
            candidates = np.argsort(-row, kind="stable")[: min(k, max(width, 1))]
            assert ranked_top(values, candidates, top_k) == want, (trial, width)
        assert ranked_top(values, None, top_k) == want


def test_job_reports_its_stage_times(taggers, captions, tmp_path):
    summary = tag_stream(taggers[False], open_items(captions), tmp_path / "t.jsonl", batch_size=5, progress=False,
                         decode_workers=0, inputs=[captions])
    stages = summary.stages
    for name in ("decode", "decode_wait", "submit", "stage", "upload", "encode", "head", "download", "wait", "host",
                 "write", "main_cpu", "record_cpu"):
        assert name in stages and stages[name] >= 0.0, name
    assert stages["encode"] > 0 and stages["decode"] > 0 and stages["main_cpu"] > 0 and stages["record_cpu"] > 0
    # on a CPU the backend's work happens while the model's thread submits: its clocks are inside that time
    # (host staging apart from the transfer, which on a CPU is nothing)
    assert stages["stage"] + stages["upload"] + stages["encode"] + stages["head"] + stages["download"] \
        <= stages["submit"] + 1e-3
    assert stages["upload"] == 0.0
    # the model's thread's own CPU time is within its wall time (thread_time: this thread alone)
    assert stages["main_cpu"] <= summary.seconds and stages["record_cpu"] <= summary.seconds
    # each stage is a part of the job's wall time (the model's thread submits 5 batches in it)
    assert stages["submit"] + stages["decode_wait"] <= summary.seconds
    assert summary.profile().startswith("stages (s): decode ")


def test_tag_profile_prints_the_stage_times(captions, tmp_path):
    from click.testing import CliRunner

    from ttd.cli import main

    result = CliRunner().invoke(main, ["tag", "--captions", str(captions), "-o", str(tmp_path / "p.jsonl"), "--quiet",
                                       "--profile", "--decode-workers", "0", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("stages (s): "))
    times = dict(part.rsplit(" ", 1) for part in line.removeprefix("stages (s): ").replace(";", ",").split(", "))
    assert {"decode", "encode", "head", "host", "write", "wall"} <= set(times)
    assert float(times["encode"]) > 0 and float(times["wall"]) >= float(times["encode"])


def test_pinned_output_buffers_are_reused_once_nothing_holds_them():
    """The pipelined path's output buffers (pinned on a GPU: a slow driver call each) are taken
    again instead of allocated per batch, but never while a result made from them is alive."""
    import gc

    import torch

    from ttd.runtime.device_pipeline import HostBuffers

    buffers = HostBuffers(pin=False)  # pin=True on a GPU; the reuse is the same
    first = buffers.take("scores", (4, 10), torch.float32)
    address = first.data_ptr()
    held = buffers.as_numpy(first)[1, :3]  # a row of a batch's scores, as a TagResult keeps it
    del first
    gc.collect()
    second = buffers.take("scores", (4, 10), torch.float32)
    assert second.data_ptr() != address  # the first is still held through its numpy row
    del held
    gc.collect()
    third = buffers.take("scores", (4, 7), torch.float32)  # a smaller batch: the freed buffer again
    assert third.data_ptr() == address and third.shape == (4, 7)
    del third
    assert buffers.take("scores", (2, 3), torch.int64).data_ptr() == address
    assert len(buffers.buffers["scores"]) == 2  # two buffers served four batches
