"""Issue 20's reproduced defects of the job seams, as regression tests: whole-image tagging and
`ttd segment` go through the exactly-once writer (a second run, --resume and --shard are
honoured), webdataset samples are segmented from their own bytes, and one option name means one
thing. Every mode x engine x format x resume x shard: tests/jobs/test_job_matrix.py."""

import json

import numpy as np
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def captions_file(folder, count=4):
    rows = []
    for i in range(count):
        sample = make_sample(3, i)
        Image.fromarray(sample.image).resize((96, 64)).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": sample.caption})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_whole_image_tagging_twice_writes_the_same_records(tmp_path):
    captions = captions_file(tmp_path)
    out = tmp_path / "whole.jsonl"
    first = run("tag", "--captions", captions, "-o", out, "--crop", "whole", "--quiet")
    assert first.exit_code == 0, first.output
    written = records(out)
    second = run("tag", "--captions", captions, "-o", out, "--crop", "whole", "--quiet")
    assert second.exit_code == 0, second.output
    assert len(written) == 4 and records(out) == written  # was: replaced by 0 records
    assert [r["index"] for r in written] == [0, 1, 2, 3]
    assert all(r["width"] == 96 and r["height"] == 64 for r in written)
    resumed = run("tag", "--captions", captions, "-o", out, "--crop", "whole", "--resume", "--quiet")
    assert "already complete (4 records)" in resumed.output


def test_whole_image_shards_take_their_own_items(tmp_path):
    captions = captions_file(tmp_path)
    for shard in (0, 1):
        result = run("tag", "--captions", captions, "-o", tmp_path / f"s{shard}.jsonl", "--crop", "whole",
                     "--shard", shard, "--num-shards", 2, "--quiet")
        assert result.exit_code == 0, result.output
    assert [r["index"] for r in records(tmp_path / "s0.jsonl")] == [0, 2]  # was: all items, shard ignored
    assert [r["index"] for r in records(tmp_path / "s1.jsonl")] == [1, 3]


def test_segment_reads_webdataset_samples_from_their_own_bytes(tmp_path):
    with wds.TarWriter(str(tmp_path / "000.tar")) as sink:
        for i in range(2):
            sample = make_sample(3, i)
            image = Image.fromarray(sample.image).resize((80, 48))
            path = tmp_path / f"tmp{i}.png"
            image.save(path)
            sink.write({"__key__": f"s{i}", "png": path.read_bytes(), "txt": sample.caption})
            path.unlink()  # only the tar holds the image
    out = tmp_path / "seg.jsonl"
    result = run("segment", "--captions", tmp_path / "000.tar", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    lines = records(out)
    assert [("error" in r, r.get("width"), r.get("height")) for r in lines] == [(False, 80, 48)] * 2


def test_one_option_name_means_one_thing():
    for command in ("tag", "segment", "eval", "calibrate"):
        text = run(command, "--help").output
        if "--score [" in text:
            assert "default: negatives" in text.split("--score [")[1].split("--")[0], command
    train = run("train", "--help").output
    assert "--stage1-score" in train and "--score [" not in train


def test_tag_masks_have_the_input_images_width_and_height(tmp_path):
    """The centre crop's mask lies where the crop was; the rest of a 300×120 image is background."""
    from ttd.jobs.coco import decode_rle

    sample = make_sample(3, 0)
    Image.fromarray(sample.image).resize((120, 120)).save(tmp_path / "square.png")
    canvas = Image.new("RGB", (300, 120), (255, 255, 255))
    canvas.paste(Image.open(tmp_path / "square.png"), (90, 0))  # the centre crop is the world image
    canvas.save(tmp_path / "wide.png")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(sample.relevant_tags) + "\n")
    out = tmp_path / "tags.jsonl"
    result = run("tag", "--vocabulary", vocab, tmp_path / "wide.png", "-o", out, "--masks-dir", tmp_path / "masks",
                 "--rle-masks", "--quiet")
    assert result.exit_code == 0, result.output
    record = records(out)[0]
    assert record["selected"], record
    for tag, path in record["masks"].items():
        png = Image.open(path)
        assert png.size == (300, 120)  # was: the model's 64×64
        grey = np.asarray(png)
        assert grey[:, :89].max() == 0 and grey[:, 211:].max() == 0  # outside the crop: background
        rle = decode_rle(record["rle_masks"][tag])
        assert rle.shape == (120, 300)
        np.testing.assert_array_equal(rle, grey >= 128)


def test_the_summary_line_counts_in_words():
    from collections import Counter
    from pathlib import Path

    from ttd.jobs.runner import JobSummary

    one = JobSummary(Path("tags.jsonl"), items=1, errors=Counter({"image": 1}), seconds=0.5)
    assert one.line() == ("wrote 1 record to tags.jsonl (1 error); errors by kind: image 1; "
                          "1 item this run at 2.0 images/s")
    many = JobSummary(Path("tags.jsonl"), items=12, resumed=2, seconds=2.0)
    assert many.line() == ("wrote 12 records to tags.jsonl (0 errors); 10 items this run, 2 from the "
                           "interrupted run at 5.0 images/s")
