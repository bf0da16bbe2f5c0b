"""`ttd report` on records it cannot trust: one bad record is an
error on its item and the rest renders; a mask is size-checked before it is decoded; images are
found where the job's captions file is; and no file outside the images root is embedded."""

import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.jobs.coco import encode_rle

GOOD = {"image": "grey.png", "caption": "a good one", "candidates": [{"tag": "good", "score": 0.75}],
        "selected": ["good"]}


def write_records(folder, records, name="out.jsonl"):
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def report(records, html, *extra):
    result = CliRunner().invoke(main, ["report", str(records), "--html", str(html), "--per-page", "100", *map(str, extra)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return html.read_text()


def items(page: str) -> dict[int, str]:
    """The HTML of each item section, by its line number."""
    out = {}
    for part in page.split('<section class="item')[1:]:
        number = int(part.split('id="item-', 1)[1].split('"', 1)[0])
        out[number] = part.split("</section>", 1)[0]
    return out


@pytest.fixture
def grey(tmp_path):
    Image.fromarray(np.full((100, 200, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    return tmp_path


def test_one_bad_record_is_an_error_on_its_item_and_the_rest_renders(grey):
    """Item 10: a null, NaN, infinite or string score, a non-list `selected` or a list `masks`
    aborted the whole report (mostly with a traceback)."""
    def with_score(score):
        return f'{{"image": "grey.png", "candidates": [{{"tag": "x", "score": {score}}}], "selected": []}}'

    records = write_records(grey, [
        GOOD,
        with_score("null"), with_score("NaN"), with_score("Infinity"), with_score('"high"'),
        {**GOOD, "selected": 5},
        {**GOOD, "masks": ["a.png"]},
        {**GOOD, "segments": {"label": "x"}},
        {**GOOD, "candidates": "good"},
        GOOD,
    ])
    page = items(report(records, grey / "r.html"))
    assert len(page) == 10
    for good in (1, 10):
        assert "error" not in page[good] and "<td>good</td><td>0.750</td><td>selected</td>" in page[good]
    assert "candidates[0] (&#x27;x&#x27;): score null is not a finite number" in page[2]
    assert "score NaN is not a finite number" in page[3]
    assert "score Infinity is not a finite number" in page[4]
    assert "score &quot;high&quot; is not a finite number" in page[5]
    assert "&#x27;selected&#x27; is int, not a list" in page[6] and "<td>good</td>" in page[6]
    assert "cannot show masks (&#x27;masks&#x27; is list, not an object)" in page[7]
    assert "cannot show masks (&#x27;segments&#x27; is dict, not a list)" in page[8]
    assert "&#x27;candidates&#x27; is str, not a list" in page[9]
    for bad in range(2, 10):
        assert 'class="item failed"' in '<section class="item' + page[bad], bad


def test_a_huge_declared_mask_is_refused_before_it_is_decoded(grey, monkeypatch):
    """Item 11: a 122-byte line declaring a 40000 x 40000 RLE was decoded (3.66 GB, 12 s) before
    its size was compared with the image."""
    import ttd.jobs.coco as coco

    decoded = []
    real_decode = coco.decode_rle

    def watched(rle):
        decoded.append(tuple(rle["size"]))
        if rle["size"][0] * rle["size"][1] > 10**7:  # what the report used to do; not done here (3.66 GB)
            raise MemoryError(f"decoding a {rle['size']} mask")
        return real_decode(rle)

    monkeypatch.setattr(coco, "decode_rle", watched)
    mask = np.zeros((100, 200), bool)
    mask[:, :100] = True
    huge = {"size": [40000, 40000], "counts": "PPYo1"}
    records = write_records(grey, [
        {**GOOD, "segments": [{"label": "huge", "rle": huge}]},
        {**GOOD, "rle_masks": {"huge": huge}},
        {**GOOD, "segments": [{"label": "left", "rle": encode_rle(mask)}]},
    ])
    Image.fromarray(np.zeros((6000, 6000), np.uint8)).save(grey / "big.png")  # 35 kB on disk, 36 MB decoded
    with records.open("a") as f:
        f.write(json.dumps({**GOOD, "masks": {"big": "big.png"}}) + "\n")
    started = time.monotonic()
    page = items(report(records, grey / "r.html"))
    assert time.monotonic() - started < 10
    assert decoded == [(100, 200)]  # only the mask of the image's own size was decoded
    assert "cannot show masks (mask &#x27;huge&#x27; is 40000x40000, the image 200x100)" in page[1]
    assert "cannot show masks (mask &#x27;huge&#x27; is 40000x40000, the image 200x100)" in page[2]
    assert "error" not in page[3] and 'class="overlay"' in page[3]
    assert "cannot show masks (mask &#x27;big&#x27; is 6000x6000, the image 200x100)" in page[4]


def test_images_are_found_where_the_jobs_captions_file_is(tmp_path):
    """Item 12: `ttd tag --captions w/annotations.jsonl -o out/x.jsonl` then `ttd report out/x.jsonl`
    showed no image: paths were resolved against the records' folder, not the captions file's."""
    runner = CliRunner()
    assert runner.invoke(main, ["world", "generate", str(tmp_path / "w"), "--count", "2"]).exit_code == 0
    tagged = runner.invoke(main, ["tag", "--model", "world-tiny", "--captions", str(tmp_path / "w" / "annotations.jsonl"),
                                  "-o", str(tmp_path / "out" / "x.jsonl"), "--quiet", "--device", "cpu"])
    assert tagged.exit_code == 0, tagged.output
    # the job record that travels with the records may name any folder, so it is never the root by
    # itself: a missing image says where the job read its captions and the option that opens it
    page = items(report(tmp_path / "out" / "x.jsonl", tmp_path / "r.html"))
    assert len(page) == 2
    for item in page.values():
        assert f"(the job read its captions in {tmp_path / 'w'}: pass --images-root {tmp_path / 'w'} if you " in item
    page = items(report(tmp_path / "out" / "x.jsonl", tmp_path / "r.html", "--images-root", tmp_path / "w"))
    for item in page.values():
        assert "error" not in item and '<img class="base" src="data:image/jpeg;base64,' in item


def test_no_file_outside_the_images_root_is_embedded(grey, tmp_path):
    """Item 21: records naming `../../secret.png`, an absolute path or a link out of the root made
    the report embed those files. Confined by default; --allow-any-path lifts it."""
    root = tmp_path / "root"
    root.mkdir()
    os.replace(grey / "grey.png", root / "grey.png")
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    records = write_records(root, [
        GOOD,
        {**GOOD, "image": "../secret/secret.png"},
        {**GOOD, "image": str(outside / "secret.png")},
        {**GOOD, "image": "link.png"},
        {**GOOD, "masks": {"good": str(outside / "secret.png")}},
    ])
    page = items(report(records, tmp_path / "r.html", "--images-root", root))
    assert "error" not in page[1] and '<img class="base"' in page[1]
    assert f"image &#x27;../secret/secret.png&#x27; is outside {root}: not embedded" in page[2]
    assert f"image &#x27;{outside / 'secret.png'}&#x27; is outside {root}: not embedded" in page[3]
    assert "image &#x27;link.png&#x27; is outside" in page[4]
    assert f"cannot show masks (mask &#x27;{outside / 'secret.png'}&#x27; is outside {root}: not embedded" in page[5]
    for bad in (2, 3, 4):
        assert '<img class="base"' not in page[bad]
    assert 'class="overlay"' not in page[5]
    opened = items(report(records, tmp_path / "r2.html", "--images-root", root, "--allow-any-path"))
    assert all('<img class="base"' in opened[k] for k in (2, 3, 4))
    assert " is outside " not in "".join(opened.values())


def test_a_job_record_beside_the_records_never_widens_the_root(grey, tmp_path):
    """The default --images-root came from `RECORDS.job.json`, which travels with the records:
    `{"captions": "/x/c.jsonl"}` there made any file under /x embeddable without --allow-any-path."""
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(outside / "secret.png")
    folder = tmp_path / "shared"
    folder.mkdir()
    records = write_records(folder, [{**GOOD, "image": str(outside / "secret.png")},
                                     {**GOOD, "image": "../secret/secret.png"}])
    (folder / "out.jsonl.job.json").write_text(json.dumps({"captions": str(outside / "c.jsonl")}))
    page = items(report(records, tmp_path / "r.html"))
    for item in page.values():
        assert "is outside" in item and "not embedded" in item and "data:image/jpeg" not in item


def test_outputs_over_inputs_and_pages_over_other_files_are_refused(grey, tmp_path):
    records = write_records(grey, [GOOD] * 3)
    before = records.read_bytes()
    for html in (records, grey / "." / "out.jsonl"):  # was: the records replaced by HTML
        result = CliRunner().invoke(main, ["report", str(records), "--html", str(html)])
        assert result.exit_code == 2 and records.read_bytes() == before
        assert f"error: {html} is also an input ({records}): the report would replace it" in result.output
    (tmp_path / "r-2.html").write_text("my notes")  # was overwritten silently by the second page
    result = CliRunner().invoke(main, ["report", str(records), "--html", str(tmp_path / "r.html"), "--per-page", "2"])
    assert result.exit_code == 2 and (tmp_path / "r-2.html").read_text() == "my notes"
    assert f"{tmp_path / 'r-2.html'} exists and is not a page of a ttd report" in result.output
    (tmp_path / "r-2.html").unlink()
    for _ in range(2):  # its own earlier pages are replaced
        result = CliRunner().invoke(main, ["report", str(records), "--html", str(tmp_path / "r.html"), "--per-page", "2"])
        assert result.exit_code == 0, result.output


@pytest.mark.deadline(60)
def test_a_mask_path_naming_a_fifo_is_an_error_of_its_item(grey, tmp_path):
    """Image paths were checked, mask paths were not: a FIFO hung `ttd report` on open."""
    os.mkfifo(grey / "pipe.png")
    records = write_records(grey, [{**GOOD, "masks": {"good": "pipe.png"}}, GOOD])
    started = time.monotonic()
    page = items(report(records, tmp_path / "r.html"))
    assert time.monotonic() - started < 30
    assert "cannot show masks (mask &#x27;good&#x27;" in page[1] and "pipe.png is not a file" in page[1]
    assert "error" not in page[2]



def test_a_segment_record_shows_the_pixels_each_class_won(grey, tmp_path):
    """A class scored 1.000 was listed "rejected" with no reason (it lost the per-pixel argmax), and
    every class score read 0.000 or 1.000: the share of pixels each class won is shown beside it."""
    mask = np.zeros((100, 200), bool)
    mask[:, :150] = True
    record = {"image": "grey.png", "width": 200, "height": 100,
              "candidates": [{"tag": "sky", "score": 1.0}, {"tag": "sea", "score": 1.0}, {"tag": "cat", "score": 0.0}],
              "selected": ["sky"],
              "segments": [{"label": "sky", "kind": "class", "score": 1.0, "area": int(mask.sum()),
                            "rle": encode_rle(mask)}]}
    page = items(report(write_records(grey, [record]), tmp_path / "r.html"))[1]
    assert "<th>pixels won</th>" in page
    assert "<td>sky</td><td>1.000</td><td>75.0 %</td><td>selected</td>" in page
    # a class wins no pixel where another class's mask is higher or every mask is below θ (the
    # background): its score does not decide it, so a class scored 0.000 is not "beaten" either
    won_none = ('<td title="each of its pixels went to a class with a higher mask there, or to the background">'
                "rejected: won no pixel</td>")
    assert f"<td>sea</td><td>1.000</td><td>0.0 %</td>{won_none}" in page
    assert f"<td>cat</td><td>0.000</td><td>0.0 %</td>{won_none}" in page
    plain = items(report(write_records(grey, [GOOD], "plain.jsonl"), tmp_path / "p.html"))[1]
    assert "pixels won" not in plain and "<td>good</td><td>0.750</td><td>selected</td>" in plain
