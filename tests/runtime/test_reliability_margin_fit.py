"""Tagging at another δ or flip TTA than the margin was fitted for says so (the fit records both;
on the world, a margin fitted at δ 0.95 and tagged at 0.5 took precision from 1.000 to 0.978)."""

import warnings

from click.testing import CliRunner

from jobs.test_stream_job import world_job
from ttd.cli import main
from ttd.runtime import MarginFitMismatchWarning, load_tagger


def caught(**options):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_tagger("torch", device="cpu", **options)
    return [str(w.message) for w in seen if issubclass(w.category, MarginFitMismatchWarning)]


def test_tagging_with_other_settings_than_the_fit_warns_once(tmp_path):
    assert caught() == []  # the embedded model's fit: δ 0.5, no flip TTA
    assert caught(threshold=0.95) == [
        "negative_margin 2.2 was fitted for δ 0.5 (tagging at 0.95): its selections differ from what the fit "
        "measured; tag with the fit's settings, or fit for these with `ttd calibrate ... --threshold 0.95`"]
    (message,) = caught(flip_tta=True)
    assert "was fitted without flip TTA (tagging with it)" in message and "--threshold 0.5 --flip-tta" in message
    captions = world_job(tmp_path, 2)
    result = CliRunner().invoke(main, ["tag", "--captions", str(captions), "-o", str(tmp_path / "t.jsonl"),
                                       "--device", "cpu", "--quiet", "--threshold", "0.9"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "was fitted for" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: negative_margin 2.2 was fitted for δ 0.5 (tagging at 0.9)")
