"""Every cell of mode × engine × format × resume × shard: each is honoured (the records
of the plain local run of that mode, the shard's share of them, the rest of a killed run after
--resume) or refused with a reason before anything is written. Plus the options that go with a
mode (--batch-size, --masks-dir, --rle-masks, --rows-per-file, --top-k): honoured or refused.

A killed run is made from a finished one, as a SIGKILL leaves it (kill -9 itself:
tests/jobs/test_stream_job.py): JSON lines cut to a prefix in OUT.partial beside its job
description; Parquet without _SUCCESS and its last shard files."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.jobs.coco import decode_rle
from ttd.jobs.jsonl_output import finished_job_path, job_path, partial_path
from ttd.jobs.parquet_output import SUCCESS_FILE, read_records, shard_files

ITEMS = 5
CLASSES = "red,circle,square"
MODES = {  # mode -> the arguments that make it (INPUT: the captions file or the images folder)
    "centre": ["tag", "--captions", "{captions}"],
    "vocabulary": ["tag", "--vocabulary", "{vocabulary}", "{images}"],
    "whole": ["tag", "--captions", "{captions}", "--crop", "whole"],
    "segment-captions": ["segment", "--captions", "{captions}"],
    "segment-classes": ["segment", "--classes", CLASSES, "{images}"],
}
JSONL_ONLY = {"whole", "segment-captions", "segment-classes"}  # records of RLE segments: Parquet is refused
MODEL = ["--model", "world-tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("matrix")
    images = folder / "images"
    images.mkdir()
    rows = []
    for i in range(ITEMS):
        sample = make_sample(5, i)
        Image.fromarray(sample.image).resize((80 + 8 * i, 64)).save(images / f"img{i}.png")
        rows.append({"image": f"images/img{i}.png", "caption": sample.caption if i != 3 else ""})  # 3: an error
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "vocabulary.txt").write_text("red\ncircle\nsquare\nblue\n")
    return folder


def run(world, mode, output, *extra, ok=True):
    args = [a.format(captions=world / "captions.jsonl", vocabulary=world / "vocabulary.txt", images=world / "images")
            for a in MODES[mode]]
    result = CliRunner().invoke(main, [*args, "-o", str(output), *MODEL, "--quiet", *map(str, extra)],
                                catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def records(output):
    if output.is_dir():
        return list(read_records(output))
    return [json.loads(line) for line in output.read_text().splitlines()]


def same(got, want, path="record"):
    """Equal records, floats to 1e-4; masks compared by their size and area (mask files by name)."""
    if isinstance(want, dict):
        files = {"masks", "label_map"}  # mask files: what --masks-dir adds, checked apart
        assert isinstance(got, dict) and sorted(set(got) - files) == sorted(set(want) - files), f"{path}: {got}"
        for key in set(want) - files - {"counts"}:  # an RLE's counts: its size is compared beside them
            same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), path
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """Each mode's plain local run: JSON lines, one shard, no resume."""
    folder = tmp_path_factory.mktemp("reference")
    outputs = {}
    for mode in MODES:
        run(world, mode, folder / f"{mode}.jsonl")
        outputs[mode] = records(folder / f"{mode}.jsonl")
        assert [r["index"] for r in outputs[mode]] == list(range(ITEMS))
        errors = [r["index"] for r in outputs[mode] if "error" in r]
        assert errors == ([3] if "--captions" in MODES[mode] else [])  # item 3's empty caption
    return outputs


def kill(output, keep: int) -> None:
    """Turn a finished output into what a SIGKILL after `keep` records leaves behind."""
    if output.is_dir():  # Parquet, one record a shard file
        (output / SUCCESS_FILE).unlink()
        for extra in shard_files(output)[keep:]:
            extra.unlink()
        return
    lines = output.read_text().splitlines(keepends=True)
    partial_path(output).write_text("".join(lines[:keep]) + lines[keep][:7])  # and a torn line
    shutil.move(finished_job_path(output), job_path(output))
    output.unlink()


def cell(world, reference, tmp_path, mode, engine, output_format, resume, shard):
    output = tmp_path / ("out.parquet" if output_format == "parquet" else "out.jsonl")
    extra = ["--engine", engine, *(["--actors", 1] if engine == "ray" else [])]
    if output_format == "parquet" and MODES[mode][0] == "tag":  # `ttd segment` has no --format: a .parquet name asks
        extra += ["--format", "parquet", "--rows-per-file", 1]
    if shard:
        extra += ["--shard", 1, "--num-shards", 2]
    if output_format == "parquet" and mode in JSONL_ONLY:
        result = run(world, mode, output, *extra, ok=False)
        assert result.exit_code != 0 and ("JSON lines" in result.output or "json lines" in result.output.lower())
        assert not output.exists() and not partial_path(output).exists()
        return
    want = [r for r in reference[mode] if not shard or r["index"] % 2 == 1]
    run(world, mode, output, *extra)
    same(records(output), want)
    if resume:
        kill(output, 1)
        result = run(world, mode, output, *extra, "--resume")
        assert "1 from the interrupted run" in result.output, result.output
        same(records(output), want)


@pytest.mark.parametrize("shard", [False, True], ids=["all", "shard"])
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
@pytest.mark.parametrize("mode", MODES)
def test_local_cell(world, reference, tmp_path, mode, output_format, resume, shard):
    cell(world, reference, tmp_path, mode, "local", output_format, resume, shard)


@pytest.fixture(scope="module")
def local_ray():
    import os
    from pathlib import Path

    import ray

    root = Path(__file__).resolve().parents[2]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}",
                                       "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.mark.parametrize("mode, output_format, resume", [
    ("centre", "jsonl", True), ("centre", "parquet", True), ("vocabulary", "jsonl", False),
    ("whole", "jsonl", True), ("whole", "parquet", False), ("segment-captions", "jsonl", False),
    ("segment-captions", "parquet", False), ("segment-classes", "jsonl", False),
])
def test_ray_cell(world, reference, tmp_path, local_ray, mode, output_format, resume):
    """Ray runs every mode's step, sharded; resumed once per step and format (the writer is the local
    engine's, whatever the mode: each Ray job costs seconds of actor start-up)."""
    cell(world, reference, tmp_path, mode, "ray", output_format, resume, shard=True)


@pytest.mark.parametrize("mode", MODES)
def test_batch_size_and_masks_dir_in_every_mode(world, reference, tmp_path, mode):
    output, masks = tmp_path / "out.jsonl", tmp_path / "masks"
    run(world, mode, output, "--batch-size", 2, "--masks-dir", masks)
    got = records(output)
    same(got, reference[mode])
    for record in got:
        if "error" in record:
            continue
        image = Image.open(world / "images" / f"img{record['index']}.png")
        files = list(record.get("masks", {}).values())
        assert files or not record["selected"], record
        for path in files:
            assert Image.open(path).size == image.size and str(path).startswith(str(masks))


def test_rle_masks_in_the_centre_modes_refused_where_masks_are_rle_already(world, reference, tmp_path):
    for mode in ("centre", "vocabulary"):
        output = tmp_path / f"{mode}.jsonl"
        run(world, mode, output, "--rle-masks")
        for record in records(output):
            if "error" not in record:
                selected = [s if isinstance(s, str) else s["tag"] for s in record["selected"]]
                assert sorted(record["rle_masks"]) == sorted(selected)
                size = Image.open(world / "images" / f"img{record['index']}.png").size
                assert all(decode_rle(rle).shape == size[::-1] for rle in record["rle_masks"].values())
    refused = run(world, "whole", tmp_path / "w.jsonl", "--rle-masks", ok=False)
    assert refused.exit_code != 0 and "masks as RLE already" in refused.output
    assert not (tmp_path / "w.jsonl").exists()
    for option in ("--rle-masks", "--format"):  # not offered by `ttd segment`; refused with the reason (below)
        assert option not in CliRunner().invoke(main, ["segment", "--help"]).output


@pytest.mark.parametrize("args, message", [
    (("centre", "--rows-per-file", 3), "--rows-per-file sizes Parquet shard files"),
    (("centre", "--top-k", 3), "--top-k lists a vocabulary's best tags"),
    (("whole", "--top-k", 3), "--top-k lists a vocabulary's best tags"),
    (("segment-captions", "--actors", 2), "apply to --engine ray"),
    (("vocabulary", "--engine", "ray", "--decode-workers", 1), "applies to --engine local"),
    (("centre", "--engine", "ray", "--dtype", "auto"), "--engine ray needs an explicit --backend and --dtype"),
    (("centre", "--no-vocab-cache"), "apply to --vocabulary with --engine local"),
    (("vocabulary", "--engine", "ray", "--vocab-cache", "cache"), "apply to --vocabulary with --engine local"),
    (("centre", "--compile", "--backend", "onnxruntime"), "--compile compiles the torch backend's encoder"),
    (("segment-captions", "--rle-masks"), "hold every mask as COCO RLE already"),
    (("segment-classes", "--format", "parquet"), "written as JSON lines"),
])
def test_options_a_cell_cannot_honour_are_refused_before_any_work(world, tmp_path, args, message):
    mode, *extra = args
    output = tmp_path / "out.jsonl"
    result = run(world, mode, output, *extra, ok=False)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not output.exists() and not partial_path(output).exists()


def test_a_vocabulary_top_k_is_honoured(world, reference, tmp_path):
    output = tmp_path / "out.jsonl"
    run(world, "vocabulary", output, "--top-k", 2)
    for got, want in zip(records(output), reference["vocabulary"]):
        assert [t["tag"] for t in got["top"]] == [t["tag"] for t in want["top"][:2]]
        assert np.isfinite([t["score"] for t in got["top"]]).all()
