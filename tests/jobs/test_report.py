"""`ttd report`: a static, self-contained HTML page, checked in a real headless
Chromium (Debian's `chromium`): it loads with no console message at all, its script runs, and
the screenshot shows the coloured mask overlay exactly where the mask is."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.jobs.coco import encode_rle
from ttd.jobs.report import COLOURS, OVERLAY_ALPHA, write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (CI installs Debian's: apt-get install chromium)")
GREY = 128


def browse(page, tmp_path, mode: str) -> subprocess.CompletedProcess:
    """Chromium headless on a file: --screenshot (to tmp_path/shot.png) or --dump-dom; stderr
    carries every console message as a ':CONSOLE' line."""
    action = [f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1000,700"] if mode == "screenshot" else ["--dump-dom"]
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
               "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", *action,
               page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def console_lines(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def grey_job(tmp_path, with_mask: bool = True):
    """A uniform grey 200 x 100 image whose left half is the mask 'left'; an error item; a
    caption with markup."""
    Image.fromarray(np.full((100, 200, 3), GREY, np.uint8)).save(tmp_path / "grey.png")
    mask = np.zeros((100, 200), bool)
    mask[:, :100] = True
    records = [
        {"image": "grey.png", "width": 200, "height": 100, "caption": "left <b>half</b> <script>alert(1)</script>",
         "candidates": [{"tag": "left", "score": 0.93}, {"tag": "half", "score": 0.12}], "selected": ["left"],
         "segments": [{"label": "left", "kind": "tag", "score": 0.93, "rle": encode_rle(mask)}] if with_mask else []},
        {"image": "missing.png", "caption": "a red circle", "error": "missing.png: file not found"},
    ]
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tinted_and_grey(shot: np.ndarray) -> tuple[int, int]:
    """(pixels of the overlay colour over the grey image, pixels of plain grey); an overlay that
    spills beyond its image (tinting the page) fails here."""
    colour = np.asarray(COLOURS[0], float)
    blend = GREY + (colour - GREY) * OVERLAY_ALPHA / 255
    spilled = 255 + (colour - 255) * OVERLAY_ALPHA / 255  # the overlay over the white page
    assert (np.abs(shot[..., :3] - spilled).max(axis=-1) <= 3).sum() == 0, "overlay outside its image"
    tinted = (np.abs(shot[..., :3] - blend).max(axis=-1) <= 3).sum()
    grey = (np.abs(shot[..., :3].astype(float) - GREY).max(axis=-1) <= 3).sum()
    return int(tinted), int(grey)


@needs_chromium
def test_report_loads_cleanly_in_chromium_and_shows_the_overlay(tmp_path):
    # the harness sees console messages: a page that logs one is caught
    noisy = tmp_path / "noisy.html"
    noisy.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    assert len(console_lines(browse(noisy, tmp_path, "dom"))) == 2

    page = write_report(grey_job(tmp_path), tmp_path / "report" / "report.html")[0]
    dom = browse(page, tmp_path, "dom")
    assert dom.returncode == 0 and console_lines(dom) == [], dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout  # the page's script ran to its end
    assert "<script>alert(1)</script>" not in dom.stdout and "&lt;script&gt;alert(1)" in dom.stdout
    shot_run = browse(page, tmp_path, "screenshot")
    assert shot_run.returncode == 0 and console_lines(shot_run) == []
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).astype(int)
    tinted, grey = tinted_and_grey(shot)
    # the 200 x 100 image is shown at 256 x 128: the mask's half is 128 x 128 = 16384 tinted pixels
    assert abs(tinted - 128 * 128) < 600, tinted
    assert abs(grey - 128 * 128) < 600, grey
    # and where the mask is: the tint is a 128-wide block left of the untinted grey half
    colour = np.asarray(COLOURS[0], float)
    tint_x = np.nonzero((np.abs(shot - (GREY + (colour - GREY) * OVERLAY_ALPHA / 255)).max(-1) <= 3).sum(0) >= 100)[0]
    grey_x = np.nonzero((np.abs(shot - GREY).max(-1) <= 3).sum(0) >= 100)[0]  # columns of the image, not text
    assert tint_x.max() - tint_x.min() == 127 and grey_x.min() == tint_x.max() + 1

    # without the mask the same page shows no tint, only the grey image
    plain = write_report(grey_job(tmp_path, with_mask=False), tmp_path / "plain" / "report.html")[0]
    assert browse(plain, tmp_path, "screenshot").returncode == 0
    tinted, grey = tinted_and_grey(np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).astype(int))
    assert tinted == 0 and abs(grey - 256 * 128) < 1200


def test_report_lists_errors_escapes_text_and_paginates(tmp_path):
    records = grey_job(tmp_path)
    with records.open("a") as f:
        f.write("not json\n")
        for i in range(3):
            f.write(json.dumps({"image": "grey.png", "candidates": [{"tag": f"t{i}", "score": 0.5}],
                                "selected": [f"t{i}"]}) + "\n")
    elsewhere = tmp_path / "outputs" / "out.jsonl"  # records away from the images: --images-root finds them
    elsewhere.parent.mkdir()
    records = records.rename(elsewhere)
    result = CliRunner().invoke(main, ["report", str(records), "--html", str(tmp_path / "r.html"), "--per-page", "2",
                                       "--images-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pages = [tmp_path / "r.html", tmp_path / "r-2.html", tmp_path / "r-3.html"]
    assert [p.exists() for p in pages] == [True, True, True] and not (tmp_path / "r-4.html").exists()
    first, second = pages[0].read_text(), pages[1].read_text()
    assert "6 items, 2 with errors" in first and 'href="r-2.html"' in first and 'href="r.html"' in second
    assert "missing.png: file not found" in first and "&lt;script&gt;alert(1)&lt;/script&gt;" in first
    assert "<script>alert" not in first and "grey.png: file not found" not in first + second  # images found
    assert "out.jsonl line 3: not a record" in second
    assert 'class="overlay"' in first and first.count("data:image/png;base64,") == 1  # one mask overlay
    assert "http://" not in first and "https://" not in first  # self-contained: nothing to fetch
    assert 'class="selected"' in first and 'class="rejected"' in first


def test_report_places_ttd_tag_png_masks_over_the_centre_crop(tmp_path):
    """`ttd tag --masks-dir` masks cover the centre crop at the model's size; the report puts
    them there in the image's geometry."""
    from ttd.jobs.report import _tag_png_mask

    crop = np.zeros((64, 64), np.uint8)
    crop[:, :32] = 255  # the left half of the crop
    Image.fromarray(crop, "L").save(tmp_path / "m.png")
    placed = _tag_png_mask(tmp_path / "m.png", (160, 64))  # crop is x in [48, 112)
    assert placed.shape == (64, 160)
    assert placed[:, 48:80].all() and not placed[:, :48].any() and not placed[:, 80:].any()
