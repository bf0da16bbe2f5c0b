"""Tagging at scale: exactly-once output across SIGKILL + --resume, sharding that covers
every item once, streamed inputs (webdataset shards with bounded memory, folders, globs)."""

import functools
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttd.data.world import make_sample
from ttd.runtime.images import Preprocess
from ttd.data.items import open_items, read_captions, select_shard, stream_captions, stream_images, stream_shards
from ttd.jobs.jsonl_output import partial_path

ROOT = Path(__file__).resolve().parents[2]


def world_job(folder: Path, count: int, bad_every: int = 0) -> Path:
    """`count` world images with their captions; every `bad_every`-th line is a missing image."""
    rows = []
    for i in range(count):
        if bad_every and i % bad_every == bad_every - 1:
            rows.append({"image": f"missing{i}.png", "caption": "a red circle"})
            continue
        sample = make_sample(4, i)
        Image.fromarray(sample.image).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": sample.caption})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_records(got: list[dict], want: list[dict]) -> None:
    """Equal records; scores to 1e-4 (batches are cut at other places after a resume)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g_scores = [c.pop("score") for c in g.get("candidates", [])]
        w_scores = [c.pop("score") for c in w.get("candidates", [])]
        np.testing.assert_allclose(g_scores, w_scores, atol=1e-4)
        assert g == w


@pytest.fixture(scope="module")
def tagger():
    from ttd.runtime import load_tagger

    return load_tagger("torch", model="world-tiny", device="cpu")


def tag(tagger, captions: Path, out: Path, **options):
    from ttd.jobs.stream_job import tag_stream

    options = {"batch_size": 3, "progress": False, "decode_workers": 0, **options}
    return tag_stream(tagger, open_items(captions), out, inputs=[captions], **options)


# exactly once -----------------------------------------------------------------------------------

def kill_repeatedly(command: list[str], env: dict, progress, rng: random.Random, runs: int = 5) -> int:
    """Start `command` up to `runs` times and SIGKILL each run at a random moment a few
    milliseconds after its first progress (`progress()` grows: lines or files written). Tied to
    progress, not to a fixed time, so that a fast machine kills as often as a slow one. Returns
    how many runs were killed (a run that finishes first ends the series)."""
    kills = 0
    for _ in range(runs):
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before, deadline = progress(), time.monotonic() + 120
        while job.poll() is None and time.monotonic() < deadline and progress() <= before:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.005))  # mid-batch, mid-write or between batches
        if job.poll() is not None:
            break
        job.send_signal(signal.SIGKILL)
        job.wait()
        kills += 1
    return kills


def test_sigkill_at_random_points_then_resume_writes_every_item_exactly_once(tmp_path, tagger):
    captions = world_job(tmp_path, 30, bad_every=7)
    reference = tmp_path / "reference.jsonl"
    tag(tagger, captions, reference)
    out = tmp_path / "tags.jsonl"
    command = [sys.executable, "-m", "ttd.cli", "tag", "--model", "world-tiny", "--device", "cpu", "--captions",
               str(captions), "-o", str(out), "--batch-size", "2", "--decode-workers", "0", "--quiet", "--resume"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    partial = partial_path(out)
    kills = kill_repeatedly(command, env, lambda: len(partial.read_bytes().splitlines()) if partial.exists() else 0,
                            random.Random(12))
    assert kills >= 3, "the job finished before it could be killed three times"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 30 records" in done.stderr and "(4 errors)" in done.stderr, done.stderr
    records = lines(out)
    assert [r["index"] for r in records] == list(range(30))  # no loss, no duplicate, no torn line
    same_records(records, lines(reference))
    assert not partial_path(out).exists()


class Stop(Exception):
    """Stands for a kill between two batches."""


def stopped_after(tagger, captions: Path, out: Path, count: int, **options) -> None:
    """Run the job of `captions` and stop it after `count` items (a multiple of the batch of 3)."""
    def items():
        yield from list(open_items(captions))[:count]
        raise Stop

    from ttd.jobs.stream_job import tag_stream

    with pytest.raises(Stop):
        tag_stream(tagger, items(), out, batch_size=3, progress=False, decode_workers=0, **options)


def test_a_torn_last_line_is_cut_and_its_item_tagged_again(tmp_path, tagger):
    captions = world_job(tmp_path, 8)
    reference = tmp_path / "reference.jsonl"
    tag(tagger, captions, reference)
    out = tmp_path / "tags.jsonl"
    stopped_after(tagger, captions, out, 3)
    with partial_path(out).open("ab") as f:  # a kill in the middle of writing the fourth line
        f.write(reference.read_bytes().splitlines(keepends=True)[3][:25])
    summary = tag(tagger, captions, out, resume=True)
    assert (summary.items, summary.resumed) == (8, 3)
    same_records(lines(out), lines(reference))


def test_resume_refuses_another_job_and_reports_a_finished_one(tmp_path, tagger):
    captions = world_job(tmp_path, 4)
    out = tmp_path / "tags.jsonl"
    stopped_after(tagger, captions, out, 3, job={"threshold": 0.5})
    with pytest.raises(ValueError, match=r"belongs to a job with other settings \(threshold: 0.5 -> 0.7\)"):
        tag(tagger, captions, out, resume=True, job={"threshold": 0.7})
    assert len(lines(partial_path(out))) == 3  # the refused resume touched nothing
    summary = tag(tagger, captions, out, resume=True, job={"threshold": 0.5})
    assert (summary.items, summary.resumed) == (4, 3)
    again = tag(tagger, captions, out, resume=True, job={"threshold": 0.5})
    assert again.already_complete and again.items == 4 and "already complete" in again.line()


def test_an_error_in_the_head_stage_stops_the_job_and_keeps_the_written_prefix(tmp_path, tagger, monkeypatch):
    import ttd.jobs.stream_job as stream_job

    captions = world_job(tmp_path, 9)
    original, calls = stream_job.CentreStep._whole_array_records, {"n": 0}

    def fails_at_the_second_batch(*args, **kwargs):  # batches of 3: items 3..5
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return original(*args, **kwargs)

    monkeypatch.setattr(stream_job.CentreStep, "_whole_array_records", fails_at_the_second_batch)
    out = tmp_path / "tags.jsonl"
    with pytest.raises(RuntimeError, match="disk on fire"):
        tag(tagger, captions, out)
    assert not out.exists() and [r["index"] for r in lines(partial_path(out))] == [0, 1, 2]


# sharding ---------------------------------------------------------------------------------------

def test_shards_are_disjoint_complete_and_concatenate_into_the_whole_job(tmp_path, tagger):
    captions = world_job(tmp_path, 10, bad_every=4)
    whole = tmp_path / "whole.jsonl"
    tag(tagger, captions, whole)
    parts = []
    for shard in range(3):
        part = tmp_path / f"part{shard}.jsonl"
        tag(tagger, captions, part, shard=shard, num_shards=3)
        parts.append(lines(part))
    assert [len(p) for p in parts] == [4, 3, 3]
    assert [r["index"] % 3 for r in parts[1]] == [1, 1, 1]
    merged = sorted((r for p in parts for r in p), key=lambda r: r["index"])
    same_records(merged, lines(whole))


def test_select_shard_positions():
    items = range(11)
    chosen = [[p for p, _ in select_shard(items, s, 4)] for s in range(4)]
    assert sorted(p for c in chosen for p in c) == list(range(11))
    assert chosen[2] == [2, 6, 10]
    assert [p for p, _ in select_shard(items, 2, 4, skip=1)] == [6, 10]
    with pytest.raises(ValueError, match=r"--shard 4 is not in 0..3"):
        list(select_shard(items, 4, 4))


# streaming inputs -------------------------------------------------------------------------------

def _noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, image: bytes) -> str:
    import webdataset as wds

    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:03d}.tar")) as sink:
            for i in range(per_shard):
                sample = {"__key__": f"{s:03d}_{i:04d}", "png": image}
                if i % 2:
                    sample["txt"] = f"red circle {s} {i}"
                else:
                    sample["json"] = json.dumps({"caption": f"blue square {s} {i}"}).encode()
                sink.write(sample)
    return str(folder / f"{{000..{shards - 1:03d}}}.tar")


def test_streamed_shards_are_read_with_bounded_memory(tmp_path):
    from ttd.jobs.decoding import decoded_batches
    from ttd.jobs.decode_items import prepare_items

    image = _noise_png(256)  # ~197 kB a sample
    pattern = write_shards(tmp_path, 24, 4, image)  # 96 samples: ~19 MB in 24 shards
    tracemalloc.start()
    try:
        seen, captions = 0, []
        prepare = functools.partial(prepare_items, vocabulary_mode=False, preprocess=Preprocess(32, "bicubic", 10**8))
        batches = decoded_batches(enumerate(stream_shards(pattern)), 4, 0, prepare, prefetch=2)
        for batch, outcomes in batches:
            seen += len(batch)
            captions += [item.caption for _, item in batch]
            assert all(not isinstance(o, str) for o in outcomes), outcomes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 96
    assert captions[:2] == ["blue square 0 0", "red circle 0 1"] and captions[-1] == "red circle 23 3"
    # the bound: 16 samples, 1/6 of the input: the batch being used, the 2 decoded ahead (a batch
    # of 4 each) and what the tar reader holds
    total = 96 * len(image)
    assert peak < 16 * len(image), f"peak {peak:,} bytes while reading {total:,} bytes of shards"


def test_a_broken_shard_is_one_error_item_and_the_others_are_read(tmp_path):
    pattern = write_shards(tmp_path, 3, 2, _noise_png(8))
    (tmp_path / "001.tar").write_bytes(b"not a tar file at all" * 50)
    items = list(stream_shards(pattern))
    assert [i.error is None for i in items] == [True, True, False, True, True]
    assert items[2].error.startswith(f"{tmp_path / '001.tar'}: cannot read the shard")
    assert items[3].image == f"{tmp_path / '002.tar'}#002_0000"


def test_read_captions_is_the_stream_gathered_with_one_error_per_bad_line(tmp_path):
    rows = [json.dumps({"image": "a.png", "caption": "red"}), "{broken", json.dumps({"image": "b.png", "caption": 3}),
            "", json.dumps([1]), json.dumps({"caption": "no image"})]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n\xff\xfe bad utf8\n")
    items = read_captions(path)
    assert [(i.image, i.caption) for i in items[:1]] == [("a.png", "red")] and items[0].error is None
    assert [i.error.split(" (")[0] for i in items[1:]] == [
        "c.jsonl:2: not a JSON object", "c.jsonl:3: caption is int 3, not text", "c.jsonl:5: not a JSON object",
        "c.jsonl:6: no image field", "c.jsonl:7: not valid UTF-8"]
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(b"image,caption\na.png,red circle\nb.png,\xff\n")
    assert [(i.caption, i.error) for i in read_captions(csv_path)] == [
        ("red circle", None), (None, "c.csv:3: not valid UTF-8")]


def test_folders_and_globs_stream_in_sorted_order(tmp_path):
    for name in ("b/2.png", "b/1.jpg", "a.png", "c/x.txt", "c/d/3.PNG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    folder = [Path(i.image).relative_to(tmp_path).as_posix() for i in stream_images([tmp_path])]
    assert folder == ["a.png", "b/1.jpg", "b/2.png", "c/d/3.PNG"]
    globbed = [Path(i.image).relative_to(tmp_path).as_posix() for i in stream_images([f"{tmp_path}/b/*.png"])]
    assert globbed == ["b/2.png"]


# training on streamed shards --------------------------------------------------------------------

def test_training_batches_stream_from_shards_and_resume_at_their_sample_position(tmp_path):
    from ttd.data.shard_stream import ShardStreamLoader

    pattern = write_shards(tmp_path, 3, 4, _png_of(make_sample(4, 0).image))  # 12 samples an epoch
    loader = ShardStreamLoader(pattern, Preprocess(32), 4, seed=5)
    steps = [loader.batch(step)[1] for step in range(5)]  # 20 samples: an epoch and two thirds
    epoch = [c for batch in steps[:3] for c in batch]
    assert sorted(epoch) == sorted(f"{'red circle' if i % 2 else 'blue square'} {s} {i}" for s in range(3) for i in range(4))
    assert [c for batch in steps[3:] for c in batch] != epoch[:8]  # the next epoch reads the shards in another order
    resumed = ShardStreamLoader(pattern, Preprocess(32), 4, seed=5)
    assert [resumed.batch(step)[1] for step in (3, 4)] == steps[3:]  # a resume at step 3: the same batches
    ranks = [ShardStreamLoader(pattern, Preprocess(32), 2, seed=5, rank=r, world=2) for r in (0, 1)]
    assert [c for step in (3, 4) for r in ranks for c in r.batch(step)[1]] == steps[3:][0] + steps[3:][1]
    images, _ = loader.batch(5)
    assert images.shape == (4, 32, 32, 3) and loader.skipped == []


def _png_of(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_shard_outside_the_shard_count_is_refused_before_anything_is_written(tmp_path):
    from click.testing import CliRunner

    from ttd.cli import main

    captions = world_job(tmp_path, 2)
    out = tmp_path / "tags.jsonl"
    result = CliRunner().invoke(main, ["tag", "--model", "world-tiny", "--device", "cpu", "--captions", str(captions),
                                       "-o", str(out), "--shard", "3", "--num-shards", "3", "--quiet"])
    assert result.exit_code == 2 and "error: --shard 3 is not in 0..2 (--num-shards 3)" in result.output
    assert not partial_path(out).exists() and not out.exists()
