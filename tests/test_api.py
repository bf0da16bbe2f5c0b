"""The library gives what the CLI writes: `ttd.load()` + `Tagger.tag` / `tag_vocabulary` / `segment`
against `ttd tag` / `ttd segment` records for the same images (paths, bytes, PIL images, arrays;
single and batched; with and without masks), `ttd.run(ttd.Job)` against the CLI's output, and
every user-caused error a `ttd.TTDError` that the CLI prints as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import ttd
from ttd.cli import main

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "examples/world"


@pytest.fixture(scope="module")
def tagger() -> ttd.Tagger:
    return ttd.load()


@pytest.fixture(scope="module")
def cli_records(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("cli")
    result = CliRunner().invoke(main, ["tag", "--captions", str(WORLD / "annotations.jsonl"), "-o",
                                       str(out / "t.jsonl"), "--masks-dir", str(out / "m"), "--quiet"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "t.jsonl").read_text().splitlines()], out


def _as(kind: str, path: Path):
    if kind == "path":
        return str(path)
    if kind == "bytes":
        return path.read_bytes()
    image = Image.open(path)
    return image if kind == "pil" else np.asarray(image.convert("RGB"))


def _same(result: ttd.TagResult, record: dict) -> None:
    assert result.selected == record["selected"]
    assert list(result.scores) == [c["tag"] for c in record["candidates"]]
    assert max(abs(result.scores[c["tag"]] - c["score"]) for c in record["candidates"]) <= 1e-6


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "array"])
def test_batched_tags_equal_the_cli_records(tagger, cli_records, kind):
    records, _ = cli_records
    images = [_as(kind, WORLD / r["image"]) for r in records]
    results = tagger.tag(images, [r["caption"] for r in records])
    assert len(results) == len(records) == 8
    for result, record in zip(results, records):
        _same(result, record)
        assert result.masks is None


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "array"])
def test_single_image_with_masks_equals_the_cli_masks(tagger, cli_records, kind):
    records, _ = cli_records
    record = records[0]
    result = tagger.tag(_as(kind, WORLD / record["image"]), record["caption"], masks=True)
    _same(result, record)
    assert sorted(result.masks) == sorted(record["masks"]) and len(result.masks) == 3
    for tag, png in record["masks"].items():
        expected = np.asarray(Image.open(png)) >= 0.5 * 255
        assert result.masks[tag].dtype == bool and result.masks[tag].shape == expected.shape
        assert (result.masks[tag] == expected).all()
    assert any(0 < m.sum() < m.size for m in result.masks.values())  # not all masks trivially full or empty


def test_vocabulary_tags_equal_the_cli_records(tagger, tmp_path):
    vocabulary = ["orange", "heart", "circle", "yellow", "square", "star", "car", "grass"]
    (tmp_path / "v.txt").write_text("\n".join(vocabulary))
    images = sorted((WORLD / "images").glob("*.png"))
    result = CliRunner().invoke(main, ["tag", "--vocabulary", str(tmp_path / "v.txt"), *map(str, images), "-o",
                                       str(tmp_path / "v.jsonl"), "--quiet", "--no-vocab-cache", "--top-k", "8"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    results = tagger.tag_vocabulary([str(p) for p in images], vocabulary)
    for result, record in zip(results, records, strict=True):
        assert result.selected == [s["tag"] for s in record["selected"]]
        assert max(abs(result.scores[t["tag"]] - t["score"]) for t in record["top"]) <= 1e-6
    assert sum(len(r.selected) for r in results) > 8


def test_segment_equals_the_cli_records(tagger, tmp_path):
    from pycocotools import mask as coco_mask

    image = WORLD / "images/010000.png"
    result = CliRunner().invoke(main, ["segment", "--classes", "heart,circle,star", str(image), "-o",
                                       str(tmp_path / "s.jsonl"), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "s.jsonl").read_text())
    seg = tagger.segment(str(image), classes=["heart", "circle", "star"])
    assert [s.label for s in seg.segments] == [s["label"] for s in record["segments"]]
    for mine, theirs in zip(seg.segments, record["segments"]):
        rle = {"size": theirs["rle"]["size"], "counts": theirs["rle"]["counts"].encode()}
        assert (coco_mask.decode(rle).astype(bool) == mine.mask).all()
        assert abs(mine.score - theirs["score"]) <= 1e-6


def test_run_job_writes_what_the_cli_writes(cli_records, tmp_path):
    records, _ = cli_records
    summary = ttd.run(ttd.Job(output=tmp_path / "t.jsonl", captions=WORLD / "annotations.jsonl", progress=False))
    assert (summary.items, sum(summary.errors.values())) == (8, 0)
    mine = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert mine == [{k: v for k, v in r.items() if k != "masks"} for r in records]


def test_a_bad_image_is_a_ttd_error_naming_it(tagger, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ttd.TTDError, match=r"broken\.png: cannot decode image"):
        tagger.tag(str(tmp_path / "broken.png"), "a red star")
    with pytest.raises(ttd.TTDError, match=r"image 0 \(array\): an array image must be H×W×3 uint8 RGB"):
        tagger.tag(np.zeros((4, 4), np.float32), "a red star")
    with pytest.raises(ttd.TTDError, match="2 images but 1 captions"):
        tagger.tag([str(WORLD / "images/010000.png")] * 2, ["a red star"])
    with pytest.raises(ttd.TTDError, match="caption 0: caption 'the of a' has no candidate tags"):
        tagger.tag(str(WORLD / "images/010000.png"), "the of a")


def test_empty_images_and_a_string_vocabulary_are_ttd_errors(tagger):
    with pytest.raises(ttd.TTDError, match=r"image 0 \(array\): 0×5 pixels: nothing to tag"):
        tagger.tag(np.zeros((5, 0, 3), np.uint8), "a red star")
    with pytest.raises(ttd.TTDError, match=r"0×0 pixels: nothing to tag"):
        tagger.tag(Image.new("RGB", (0, 0)), "a red star")
    with pytest.raises(ttd.TTDError, match=r"tags: give a list of tags, not one string \('red': write \['red'\]\)"):
        tagger.tag_vocabulary(str(WORLD / "images/010000.png"), "red")


@pytest.mark.parametrize(("setting", "flag", "value"), [
    ("threshold", "--threshold", 2), ("threshold", "--threshold", -0.1), ("mask_threshold", "--mask-threshold", 1),
    ("threads", "--threads", -1), ("dtype", "--dtype", "fp8"), ("score_method", "--score", "cosine"),
    ("dense_mode", "--dense-mode", "mean"), ("backend", "--backend", "tflite")])
def test_load_refuses_what_the_cli_refuses_with_the_same_reason(tmp_path, setting, flag, value):
    result = CliRunner().invoke(main, ["segment", "--captions", str(WORLD / "annotations.jsonl"), "-o",
                                       str(tmp_path / "s.jsonl"), flag, str(value)])
    assert result.exit_code == 2 and not (tmp_path / "s.jsonl").exists()
    reason = result.output.strip().splitlines()[-1].split(f"'{flag}': ")[-1]
    with pytest.raises(ttd.TTDError, match=f"^{setting}={value!r}: ") as refused:
        ttd.load(**{setting: value})
    assert str(refused.value).split(": ", 1)[1] == reason


def test_an_impossible_job_is_refused_before_any_work(tmp_path):
    with pytest.raises(ttd.TTDError, match="--top-k lists a vocabulary's best tags"):
        ttd.run(ttd.Job(output=tmp_path / "t.jsonl", captions=WORLD / "annotations.jsonl", top_k=3))
    with pytest.raises(ttd.TTDError, match="unknown settings thresh"):
        ttd.run(ttd.Job(output=tmp_path / "t.jsonl", captions=WORLD / "annotations.jsonl", settings={"thresh": 1}))
    assert not (tmp_path / "t.jsonl").exists()


def test_cli_prints_a_ttd_error_as_one_line_and_lets_a_bug_be_a_traceback(monkeypatch, tmp_path):
    result = CliRunner().invoke(main, ["tag", "--captions", str(WORLD / "annotations.jsonl"), "-o",
                                       str(tmp_path / "t.jsonl"), "--top-k", "3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --top-k lists a vocabulary's best tags; with --captions every candidate is in the record: leave it out"]

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("ttd.jobs.job.run", bug)
    result = CliRunner().invoke(main, ["tag", "--captions", str(WORLD / "annotations.jsonl"), "-o",
                                       str(tmp_path / "t.jsonl")])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_auto_backend_says_what_it_picked():
    tagger = ttd.load(backend="auto", dtype="fp32")
    assert tagger.backend == "torch" and tagger.auto_choice is not None
    assert tagger.auto_choice.line().startswith("auto: torch fp32 on cpu")
