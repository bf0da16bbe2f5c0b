"""`ttd tag` outputs: masks as COCO RLE in the records, Parquet shard folders
with the records of the JSON-lines output and the same exactly-once resume, and a finished job
that a resume with other settings cannot pass for its own."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.test_stream_job import ROOT, kill_repeatedly, lines, same_records, tag, tagger, world_job  # noqa: F401 - tagger: a fixture
from ttd.jobs.coco import decode_rle
from ttd.data.items import open_items
from ttd.jobs.jsonl_output import finished_job_path

pq = pytest.importorskip("pyarrow.parquet")


def without_nulls(records: list[dict]) -> list[dict]:
    """A JSON null and an absent field are one thing in a Parquet column."""
    return [{k: v for k, v in r.items() if v is not None} for r in records]


def parquet_records(folder: Path) -> list[dict]:
    from ttd.jobs.parquet_output import read_records

    return list(read_records(folder))


def overlay_mask(overlay) -> np.ndarray:
    """The pixels an overlay of `ttd report` colours (its PNG data URI's alpha)."""
    import base64
    import io

    png = base64.b64decode(overlay.data_uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)))[..., 3] > 0


# masks as COCO RLE ------------------------------------------------------------------------------

def test_rle_masks_in_the_records_are_the_thresholded_png_masks_and_the_report_shows_them(tmp_path):
    from ttd.jobs.report import FileAccess, _entry
    from ttd.runtime import load_tagger

    trained = load_tagger("torch", device="cpu")  # the embedded world model: masks with shapes in them
    captions = world_job(tmp_path, 4, bad_every=4)
    out = tmp_path / "tags.jsonl"
    tag(trained, captions, out, masks_dir=tmp_path / "masks", rle_masks=True)
    records = lines(out)
    assert "rle_masks" not in records[3] and records[3]["error"]
    shaped = 0
    for record in records[:3]:
        assert list(record["rle_masks"]) == list(record["masks"]) == record["selected"] != []
        for tag_name, rle in record["rle_masks"].items():
            assert rle["size"] == [64, 64] and isinstance(rle["counts"], str)
            png = np.asarray(Image.open(record["masks"][tag_name]))
            np.testing.assert_array_equal(decode_rle(rle), png >= 0.5 * 255)  # DEFAULT_MASK_THRESHOLD
            mask = decode_rle(rle)
            shaped += 0 < mask.sum() < mask.size and not np.array_equal(mask, mask.T)
    assert shaped >= 3, "too few masks with a shape to tell a wrong orientation or threshold apart"
    # `ttd report` shows the RLE masks as it shows the PNG files: the same overlays
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(tmp_path / "wide.png")  # not square: crop placement
    for record in records[:3]:
        record = {**record, "image": str(tmp_path / "wide.png")}
        from_rle = _entry(1, {k: v for k, v in record.items() if k != "masks"}, FileAccess.under(tmp_path, confined=False), 200)
        from_png = _entry(1, {k: v for k, v in record.items() if k != "rle_masks"}, FileAccess.under(tmp_path, confined=False), 200)
        assert not from_rle.errors and [o.label for o in from_rle.overlays] == record["selected"]
        for rle_overlay, png_overlay in zip(from_rle.overlays, from_png.overlays, strict=True):
            inside_rle, inside_png = overlay_mask(rle_overlay), overlay_mask(png_overlay)
            assert inside_png.any() and (inside_rle != inside_png).mean() <= 0.02  # only edge pixels differ
    # vocabulary mode asks the tag head for masks when only --rle-masks wants them
    vocab_out = tmp_path / "vocab.jsonl"
    from ttd.jobs.stream_job import tag_stream

    tag_stream(trained, open_items(None, [tmp_path / "img0.png"]), vocab_out, vocabulary=["star", "cross", "red"],
               progress=False, decode_workers=0, rle_masks=True)
    (record,) = lines(vocab_out)
    assert list(record["rle_masks"]) == [s["tag"] for s in record["selected"]]
    both = set(record["rle_masks"]) & set(records[0]["rle_masks"])  # a tag's mask does not depend on the others
    assert both and all(record["rle_masks"][t] == records[0]["rle_masks"][t] for t in both)


# Parquet ----------------------------------------------------------------------------------------

def test_parquet_output_holds_the_jsonl_records_in_typed_columns_and_shards_concatenate(tmp_path, tagger):
    captions = world_job(tmp_path, 8, bad_every=3)
    reference = tmp_path / "tags.jsonl"
    tag(tagger, captions, reference, masks_dir=tmp_path / "masks", rle_masks=True)
    out = tmp_path / "tags.parquet"  # a .parquet name picks Parquet (format "auto")
    summary = tag(tagger, captions, out, masks_dir=tmp_path / "masks", rle_masks=True, rows_per_file=3)
    assert "wrote 8 records" in summary.line() and "(2 errors)" in summary.line()
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "_ttd_job.json", "part-00000.parquet",
                                                     "part-00001.parquet", "part-00002.parquet"]
    assert parquet_records(out) == without_nulls(lines(reference))
    table = pq.read_table(out)  # the folder is one table for pyarrow (and pandas, duckdb, Spark)
    assert table.num_rows == 8 and table.column("index").to_pylist() == list(range(8))
    assert str(table.schema.field("candidates").type) == "list<element: struct<tag: string, score: double>>"
    assert str(table.schema.field("rle_masks").type).startswith("map<string, struct<size: list<element: int64>")
    from ttd.jobs.report import write_report

    (page,) = write_report(out, tmp_path / "report.html")  # `ttd report` reads the folder too
    assert "8 items, 2 with errors" in page.read_text()
    # vocabulary mode: selected tags carry scores; shards of a --shard job array concatenate
    images = [tmp_path / f"img{i}.png" for i in (0, 1, 3, 4)]
    from ttd.jobs.stream_job import tag_stream

    def vocab(output, **options):
        return tag_stream(tagger, open_items(None, images), output, vocabulary=["star", "red", "cross"], batch_size=2,
                          progress=False, decode_workers=0, **options)

    vocab(tmp_path / "vocab.jsonl")
    for shard in (0, 1):
        vocab(tmp_path / f"vocab{shard}", shard=shard, num_shards=2, output_format="parquet", rows_per_file=1)
    merged = sorted(parquet_records(tmp_path / "vocab0") + parquet_records(tmp_path / "vocab1"),
                    key=lambda r: r["index"])
    assert merged == without_nulls(lines(tmp_path / "vocab.jsonl"))
    assert isinstance(merged[0]["selected"], list) and len(merged) == 4


def test_parquet_job_killed_with_sigkill_and_resumed_writes_every_item_exactly_once(tmp_path, tagger):
    captions = world_job(tmp_path, 30, bad_every=7)
    reference = tmp_path / "reference.jsonl"
    tag(tagger, captions, reference)
    out = tmp_path / "tags.parquet"
    command = [sys.executable, "-m", "ttd.cli", "tag", "--model", "world-tiny", "--device", "cpu", "--captions",
               str(captions), "-o", str(out), "--batch-size", "2", "--rows-per-file", "3", "--decode-workers", "0",
               "--quiet", "--resume"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    kills = kill_repeatedly(command, env, lambda: len(list(out.glob("part-*.parquet"))) if out.exists() else 0,
                            random.Random(7))
    assert kills >= 3, "the job finished before it could be killed three times"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("wrote 30 records" in done.stderr and "(4 errors)" in done.stderr
            or "already complete (30 records)" in done.stderr), done.stderr  # (if the last killed run got to finish)
    records = parquet_records(out)
    assert [r["index"] for r in records] == list(range(30))  # no loss, no duplicate
    same_records(records, without_nulls(lines(reference)))
    assert (out / "_SUCCESS").exists() and not list(out.glob(".*.tmp"))


# a finished job keeps its description -----------------------------------------------------------

@pytest.mark.parametrize("name", ["tags.jsonl", "tags.parquet"])
def test_resume_of_a_finished_job_with_other_settings_is_refused(tmp_path, tagger, name):
    captions = world_job(tmp_path, 3)
    out = tmp_path / name
    tag(tagger, captions, out, job={"threshold": 0.5})
    described = out / "_ttd_job.json" if out.is_dir() else finished_job_path(out)
    assert json.loads(described.read_text())["threshold"] == 0.5
    written = {p: p.read_bytes() for p in ([*out.iterdir()] if out.is_dir() else [out])}
    with pytest.raises(ValueError, match=r"belongs to a job with other settings \(threshold: 0.5 -> 0.7\)"):
        tag(tagger, captions, out, resume=True, job={"threshold": 0.7})
    assert {p: p.read_bytes() for p in written} == written  # the refused resume touched nothing
    again = tag(tagger, captions, out, resume=True, job={"threshold": 0.5})
    assert again.already_complete and again.items == 3
    described.unlink()  # an output nobody can vouch for is not taken as this job's
    with pytest.raises(ValueError, match=r"no readable job description|did not write \(no _ttd_job.json\)"):
        tag(tagger, captions, out, resume=True, job={"threshold": 0.5})


# clear errors -----------------------------------------------------------------------------------

def test_parquet_without_pyarrow_and_a_foreign_folder_are_refused_before_anything_is_written(tmp_path, tagger,
                                                                                               monkeypatch):
    from ttd.jobs.parquet_output import ParquetShards

    captions = world_job(tmp_path, 2)
    foreign = tmp_path / "photos.parquet"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"photos.parquet is a folder that `ttd tag` did not write"):
        tag(tagger, captions, foreign)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    with pytest.raises(ValueError, match=r"is a folder; JSON lines go to a file"):
        tag(tagger, captions, foreign, output_format="jsonl")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(RuntimeError, match=r"Parquet output needs pyarrow: pip install 'ttd-toolkit\[parquet\]'"):
        ParquetShards(tmp_path / "new.parquet", {}, resume=False)
    assert not (tmp_path / "new.parquet").exists()
