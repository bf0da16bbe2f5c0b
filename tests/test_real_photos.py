"""Real photographs end to end: scikit-image's bundled photos with hand-written captions,
through label-free calibration (refused: four pairs are too few), tagging, segmentation and the report, with ViT-B/16 at random
weights (no accuracy expected: the pipeline must simply work on photos, not only on world images).

Only the photo files are read, from scikit-image's data folder (the `dev` extra installs it);
scikit-image itself is never imported."""

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ttd.cli import main

# short captions: every distinct tag costs a pass of ViT-B/16's text tower per prompt template
PHOTOS = {
    "astronaut.png": "an astronaut beside a flag",
    "coffee.png": "a coffee cup on a saucer",
    "chelsea.png": "a ginger cat",
    "rocket.jpg": "a rocket under a blue sky",
}


def photo_folder() -> Path:
    spec = importlib.util.find_spec("skimage")
    folder = Path(spec.origin).parent / "data" if spec and spec.origin else None
    if folder is None or not all((folder / name).is_file() for name in PHOTOS):
        pytest.skip("scikit-image's bundled photos are missing: pip install -e '.[dev]'")
    return folder


def test_real_photos_calibrate_tag_segment_and_report(tmp_path):
    folder = photo_folder()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(folder / name), "caption": caption}) + "\n"
                             for name, caption in PHOTOS.items()))
    runner = CliRunner()
    model = ["--model", "ViT-B-16", "--device", "cpu"]
    # four pairs leave too few shuffled tags for a label-free null: the fit is refused, nothing written
    calibrated = runner.invoke(main, ["calibrate", *model, "--captions", str(pairs), "--out", str(tmp_path / "fitted"),
                                      "--batch-size", "1"])
    assert calibrated.exit_code == 2, calibrated.output
    assert "needs at least 30 shuffled tags" in calibrated.output and not (tmp_path / "fitted").exists()

    tagged = runner.invoke(main, ["tag", *model, "--backend", "torch",
                                  "--dtype", "fp32", "--batch-size", "1", "--captions", str(pairs),
                                  "-o", str(tmp_path / "tags.jsonl")])
    assert tagged.exit_code == 0, tagged.output
    assert "never fitted" in tagged.output  # the margin of an uncalibrated model says so
    records = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(not r.get("error") and r["candidates"] for r in records)

    segmented = runner.invoke(main, ["segment", *model, "--crop", "center",
                                     "--captions", str(pairs), "-o", str(tmp_path / "segments.jsonl"), "--quiet"])
    assert segmented.exit_code == 0, segmented.output
    segments = [json.loads(line) for line in (tmp_path / "segments.jsonl").read_text().splitlines()]
    assert len(segments) == 4 and all(not s.get("error") for s in segments)

    # the photos lie outside the job's folder: the report embeds them once their folder is the images root
    reported = runner.invoke(main, ["report", str(tmp_path / "segments.jsonl"), "--html", str(tmp_path / "report.html"),
                                    "--images-root", str(folder)])
    assert reported.exit_code == 0, reported.output
    page = (tmp_path / "report.html").read_text()
    assert "chelsea.png" in page and "<img" in page
