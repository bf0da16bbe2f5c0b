"""Reliability of `ttd tag` (issue #8, items 4-6 and 8): nothing lost on a rerun, no input
overwritten, special files refused, encoding problems confined to their line, mask files unique."""

import json
import os
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.runtime.images import ImageError, decode_image
from ttd.data.items import read_captions
from ttd.runtime.tagger import TagResult
from ttd.jobs.stream_job import tag_stream
from ttd.jobs.tag_job import write_masks


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def world_folder(tmp_path, count=3):
    rows = []
    for i in range(count):
        Image.fromarray(make_sample(3, i).image).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": make_sample(3, i).caption})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# item 4 ---------------------------------------------------------------------------------------

def test_a_failed_rerun_keeps_the_previous_output(tmp_path, tiny_model, monkeypatch):
    from ttd.runtime import load_tagger

    world_folder(tmp_path, 4)
    out = tmp_path / "tags.jsonl"
    tagger = load_tagger("torch", model="world-tiny", device="cpu")
    items = read_captions(tmp_path / "captions.jsonl")
    tag_stream(tagger, items, out, batch_size=2, progress=False)
    before = out.read_text()
    assert len(before.splitlines()) == 4

    calls = {"n": 0}
    original = tagger.submit

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the job is stopped part-way
        return original(*args, **kwargs)

    monkeypatch.setattr(tagger, "submit", dies_on_second_batch)  # the pipelined step calls it once per batch
    with pytest.raises(KeyboardInterrupt):
        tag_stream(tagger, items, out, batch_size=2, progress=False)
    assert out.read_text() == before  # the previous output is whole
    partial = tmp_path / "tags.jsonl.partial"
    assert [r["image"] for r in records(partial)] == ["img0.png", "img1.png"]  # and this run's progress is kept


def test_output_that_is_an_input_is_refused(tmp_path):
    world_folder(tmp_path, 1)
    captions = tmp_path / "captions.jsonl"
    before = captions.read_bytes()
    result = run("tag", "--model", "world-tiny", "--captions", captions, "-o", captions, "--quiet", "--device", "cpu")
    assert result.exit_code == 2
    assert f"output {captions} is an input of this job" in result.output
    assert captions.read_bytes() == before
    image = tmp_path / "img0.png"
    image_bytes = image.read_bytes()
    result = run("tag", "--model", "world-tiny", "--vocabulary", _vocab(tmp_path), image, "-o", image, "--quiet",
                 "--device", "cpu")
    assert result.exit_code == 2 and "is an input of this job" in result.output
    assert image.read_bytes() == image_bytes


def _vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("circle\nsquare\n")
    return path


# item 5 ---------------------------------------------------------------------------------------

def test_fifo_and_devices_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = {}

    def decode():
        try:
            decode_image(fifo)
        except ImageError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("decode_image blocked on a FIFO")
    assert outcome["error"] == f"{fifo}: not a regular file (a FIFO, device or socket); only image files are read"
    with pytest.raises(ImageError, match="/dev/zero: not a regular file"):
        decode_image("/dev/zero")


def test_image_files_larger_than_the_bound_are_refused_before_reading(tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(5 * 1000 * 4 + (1 << 20) + 1)  # sparse: one byte over the bound for 5,000 pixels
    with pytest.raises(ImageError, match=r"big.png: 1,068,577 bytes exceeds the limit of 1,068,576 for an image file"):
        decode_image(big, max_pixels=5_000)


# item 6 ---------------------------------------------------------------------------------------

def test_a_bad_utf8_line_is_one_error_record_naming_file_and_line(tmp_path):
    lines = [json.dumps({"image": "a.png", "caption": "a red circle"}).encode(),
             b'{"image": "b.png", "caption": "caf\xe9 circle"}',
             json.dumps({"image": "c.png", "caption": "line\u2028separator inside"}).encode()]
    path = tmp_path / "captions.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = read_captions(path)
    assert [i.image for i in items] == ["a.png", "<line 2>", "c.png"]
    assert items[1].error == "captions.jsonl:2: not valid UTF-8 (byte 0xe9 at column 35)"
    assert items[0].error is None and items[2].caption == "line\u2028separator inside"


def test_byte_order_marks_are_ignored(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "a.png", "caption": "a red circle"}).encode() + b"\n")
    assert [(i.image, i.caption, i.error) for i in read_captions(jsonl)] == [("a.png", "a red circle", None)]
    csv = tmp_path / "bom.csv"
    csv.write_bytes(b"\xef\xbb\xbfimage,caption\na.png,a red circle\nb.png,caf\xe9\n")
    items = read_captions(csv)
    assert [(i.image, i.caption, i.error) for i in items[:1]] == [("a.png", "a red circle", None)]
    assert items[1].error == "bom.csv:3: not valid UTF-8"


def test_captions_that_are_not_text_are_item_errors(tmp_path):
    rows = [{"image": "a.png", "caption": 42}, {"image": "b.png", "caption": True},
            {"image": "c.png", "caption": ["red", "circle"]}, {"image": 7, "caption": "a red circle"},
            {"image": "d.png", "caption": "a red circle"}]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors = [i.error for i in read_captions(path)]
    assert errors == ["captions.jsonl:1: caption is int 42, not text", "captions.jsonl:2: caption is bool True, not text",
                      "captions.jsonl:3: caption is list ['red', 'circle'], not text",
                      "captions.jsonl:4: image is 7, not a file name", None]


# item 8 ---------------------------------------------------------------------------------------

def test_mask_files_of_similar_tags_do_not_collide(tmp_path):
    from ttd.data.inputs import Item

    tags = ["red/star", "red_star", "red star", "étoile", "звезда", "a" * 80, "a" * 80 + "b"]
    masks = np.random.default_rng(0).random((len(tags), 4, 4)).astype(np.float32)
    result = TagResult(tags, np.ones(len(tags), np.float32), list(tags), masks)
    paths = write_masks(tmp_path / "masks", 0, Item("x.png", tmp_path / "x.png", "c"), result, 8, (8, 8))
    assert sorted(paths) == sorted(tags)
    assert len(set(paths.values())) == len(tags)
    for k, tag in enumerate(tags):
        stored = np.asarray(Image.open(paths[tag]).resize((4, 4), Image.BILINEAR), np.float32) / 255
        assert abs(stored.mean() - masks[k].mean()) < 0.1, tag


def test_a_mask_write_failure_is_an_item_error(tmp_path):
    world_folder(tmp_path, 2)
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "000000_img0").write_text("a file where the first item's mask folder goes")
    out = tmp_path / "tags.jsonl"
    result = run("tag", "--model", "world-tiny", "--captions", tmp_path / "captions.jsonl", "-o", out, "--quiet",
                 "--device", "cpu", "--threshold", "0", "--masks-dir", masks)
    assert result.exit_code == 0, result.output
    first, second = records(out)
    assert first["error"].startswith("cannot write masks:") and first["selected"]
    assert "error" not in second and second["masks"]
