"""What calibration refuses rather than write (docs/reliability.md, "What is refused"): a label-free
fit without a null to trust, a fit whose margin would tag nothing, outputs over its inputs,
unbounded captions, and calibrating an exported checkpoint in place."""

import hashlib
import json
import random

import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.errors import TTDError
from ttd.evaluation.label_free import LabelFreeFitError, fit_label_free
from ttd.model.factory import load_model, save_checkpoint
from ttd.runtime import load_tagger

PAIRS = 40


@pytest.fixture(scope="module")
def world_pairs():
    return [make_sample(7, i) for i in range(PAIRS)]


@pytest.fixture(scope="module")
def tagger():
    return load_tagger("torch", device="cpu")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_label_free_fit_without_a_trustworthy_null_is_refused(world_pairs, tagger):
    images = [s.image for s in world_pairs]
    good = fit_label_free(tagger, images, [s.caption for s in world_pairs], progress=False)
    assert 3.0 < good.margin < 6.0 and good.selected_share > 0.5, good.line()  # 4.59 with these 40 pairs
    # every caption the same: no image is ever scored against a tag its caption does not name
    # (before: margin 162.9, "selects 0.0 %", written)
    with pytest.raises(LabelFreeFitError, match=r"at least 30 shuffled tags .* give 0 \(their captions all name"):
        fit_label_free(tagger, images, ["a red square on sand"] * PAIRS, progress=False)
    # two pairs: a handful of shuffled tags (before: 2 pairs of `ttd world generate --seed 3` gave 17.0, written)
    with pytest.raises(LabelFreeFitError, match=r"these 2 pairs give [0-9]+:"):
        fit_label_free(tagger, images[:2], [s.caption for s in world_pairs[:2]], progress=False)
    # captions that name nothing in their images: a margin above all of them would tag nothing
    words = "piano violin trumpet banjo guitar cello flute harp drum organ tuba oboe".split()
    rng = random.Random(0)
    with pytest.raises(LabelFreeFitError, match=r"selects 0\.0 % of the captions' own tags \(below 5 %\)"):
        fit_label_free(tagger, images, [" ".join(rng.sample(words, 3)) for _ in images], progress=False)
    assert issubclass(LabelFreeFitError, TTDError)


def write_pairs(folder, samples, caption=None):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(samples):
        Image.fromarray(sample.image).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": caption or sample.caption}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


@pytest.fixture()
def checkpoint(tmp_path):
    path = save_checkpoint(load_model(None, None, None, None), tmp_path / "ck" / "model.safetensors")
    return path


def test_calibrate_writes_nothing_when_the_fit_is_refused(tmp_path, world_pairs, checkpoint):
    pairs = write_pairs(tmp_path, world_pairs, caption="a red square on sand")
    before = digest(checkpoint.with_suffix(".json"))
    result = CliRunner().invoke(main, ["calibrate", "--checkpoint", str(checkpoint), "--captions", str(pairs),
                                       "--device", "cpu", "--json", str(tmp_path / "fit.json")])
    assert result.exit_code == 2, result.output
    assert "at least 30 shuffled tags" in result.output and "give 0" in result.output
    assert digest(checkpoint.with_suffix(".json")) == before and not (tmp_path / "fit.json").exists()


def test_calibrate_refuses_outputs_over_its_inputs_before_any_work(tmp_path, world_pairs, checkpoint):
    pairs = write_pairs(tmp_path, world_pairs[:4])
    config = checkpoint.with_suffix(".json")
    before, pairs_before = digest(config), digest(pairs)
    runner = CliRunner()
    for args, named in (
            (["--json", str(config)], f"{config} is also an input ({config}): --json would replace it"),
            (["--json", str(pairs)], f"{pairs} is also an input ({pairs}): --json would replace it"),
            (["--out", str(checkpoint.parent)], f"is also an input ({checkpoint}): --out would replace it")):
        result = runner.invoke(main, ["calibrate", "--checkpoint", str(checkpoint), "--captions", str(pairs),
                                      "--device", "cpu", *args])
        # before: the fit ran (4 pairs: refused only then) or, with enough pairs, the config was replaced by the fit
        assert result.exit_code == 2 and named in result.output, result.output
        assert "calibrate (label-free)" not in result.output  # refused before any image was read
    assert digest(config) == before and digest(pairs) == pairs_before


def test_calibrating_an_exported_checkpoint_in_place_is_refused(tmp_path, world_pairs):
    from export.pipeline import run_export
    from ttd.runtime.export_dir import read_export

    export = tmp_path / "export"
    run_export(load_model(None, None, None, None), export, check_count=4)
    pairs = write_pairs(tmp_path, world_pairs)
    result = CliRunner().invoke(main, ["calibrate", "--checkpoint", str(export / "model.safetensors"), "--captions",
                                       str(pairs), "--device", "cpu"])
    # before: model.json was rewritten and every later load refused the export (sha256 differs)
    assert result.exit_code == 2, result.output
    assert (f"{export / 'model.safetensors'} belongs to the export {export} (its manifest.json holds the hash of "
            "model.json)") in result.output and "Calibrate the checkpoint it was exported from" in result.output
    read_export(export)  # still valid
    copy = tmp_path / "calibrated"
    result = CliRunner().invoke(main, ["calibrate", "--checkpoint", str(export / "model.safetensors"), "--captions",
                                       str(pairs), "--device", "cpu", "--out", str(copy)])
    assert result.exit_code == 0, result.output
    read_export(export)
    assert json.loads((copy / "model.json").read_text())["margin_fit"]["method"] == "label-free"


def test_an_unbounded_caption_is_a_skipped_pair_not_the_fit(world_pairs, tagger):
    """A 20,000-word caption kept `ttd calibrate --captions` busy for minutes (its tags were all
    encoded and scored); a 1,500-word one dominated the null. The tag limit of `ttd tag` applies."""
    import time

    images = [s.image for s in world_pairs]
    captions = [s.caption for s in world_pairs]
    clean = fit_label_free(tagger, images, captions, progress=False)
    for words in (1_500, 20_000):
        skipped: list[str] = []
        started = time.monotonic()
        fit = fit_label_free(tagger, images + [images[0]], captions + [" ".join(f"junk{i}" for i in range(words))],
                             progress=False, skipped=skipped)
        assert time.monotonic() - started < 30
        assert skipped == [f"pair {PAIRS + 1}: caption has {words} candidate tags, more than the limit of 1024 (the "
                           "served tagger's cap); split it into shorter captions"]
        assert fit.pairs == PAIRS and fit.margin == pytest.approx(clean.margin, abs=1e-9)


def test_a_failed_fit_says_why_pairs_were_skipped(tmp_path, world_pairs, checkpoint):
    pairs = write_pairs(tmp_path, world_pairs[:3])
    with pairs.open("a") as f:
        for i in range(7):
            f.write(json.dumps({"image": f"images/gone{i}.png", "caption": "a red square"}) + "\n")
    result = CliRunner().invoke(main, ["calibrate", "--checkpoint", str(checkpoint), "--captions", str(pairs),
                                       "--device", "cpu", "--dry-run"])
    # before: only "these 3 pairs give N" — not that 7 more were never read
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert "at least 30 shuffled tags" in last and "; 7 skipped (7 file not found), first: " in last
    assert "gone0.png" in last and "gone3.png" not in last
    tiny = CliRunner().invoke(main, ["calibrate", "--checkpoint", str(checkpoint), "--captions", str(pairs),
                                     "--dry-run", "--max-false-rate", "1e-300"])
    assert tiny.exit_code == 2 and "max false rate 1e-300 is too small to place a margin" in tiny.output


def test_a_fit_over_shards_takes_their_images_as_it_reads_them(world_pairs, tagger, tmp_path):
    """The images of a calibration over shards are read again as the fit takes them (one batch
    decoded at a time, never every image's bytes held): the same fit as over the images in memory."""
    import io
    import tarfile

    from ttd.data.items import ShardImages, read_pairs

    with tarfile.open(tmp_path / "000.tar", "w") as tar:
        for i, sample in enumerate(world_pairs):
            buffer = io.BytesIO()
            Image.fromarray(sample.image).save(buffer, "PNG")
            for ext, data in (("png", buffer.getvalue()), ("txt", sample.caption.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    images, captions = read_pairs(tmp_path / "000.tar", PAIRS, [])
    assert isinstance(images, ShardImages)
    streamed = fit_label_free(tagger, images, captions, progress=False, batch_size=8)
    in_memory = fit_label_free(tagger, [s.image for s in world_pairs], captions, progress=False, batch_size=8)
    assert streamed.as_dict() == in_memory.as_dict() and streamed.pairs == PAIRS
