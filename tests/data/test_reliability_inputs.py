"""Reliability of the inputs (issue #23, items 3, 4, 13, 14 and 20): Unicode caption words, the
glob module's rules for image patterns, file modes of atomic writes, inputs that name nothing,
and resumes that name an input another way."""

import glob
import json
import os
import stat
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.inputs import InputError
from ttd.data.items import open_items, stream_images
from ttd.data.world import make_sample
from ttd.model.tags import candidate_tags


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tagger():
    from ttd.runtime import load_tagger

    return load_tagger("torch", model="world-tiny", device="cpu")


# item 3: Unicode words ---------------------------------------------------------------------------

def test_accented_captions_keep_their_words():
    assert candidate_tags("a jalapeño and a café near a Pokémon") == ["jalapeño", "café", "pokémon"]
    decomposed = unicodedata.normalize("NFD", "a jalapeño and a CAFÉ near a Pokémon")
    assert candidate_tags(decomposed) == ["jalapeño", "café", "pokémon"]  # NFC, case-folded


def test_sharp_s_is_one_case_folded_tag():
    assert candidate_tags("Straße") == ["strasse"]
    assert candidate_tags("STRASSE and a straße") == ["strasse"]


def test_cyrillic_words_split_on_spaces_and_cjk_runs_are_one_tag_each():
    assert candidate_tags("Кошка сидит на диване.") == ["кошка", "сидит", "на", "диване"]
    assert candidate_tags("一只猫在沙发上") == ["一只猫在沙发上"]
    assert candidate_tags("一只猫, a dog and 沙发") == ["一只猫", "dog", "沙发"]
    assert candidate_tags("猫cat") == ["猫", "cat"]  # split where the script changes


def test_multi_word_phrases_and_apostrophes_still_match():
    assert candidate_tags("Crème brûlée near the traffic light", ["crème brûlée", "traffic light"]) == [
        "crème brûlée", "traffic light"]
    assert candidate_tags("it’s the dog's toy") == ["dog's", "toy"]  # typographic apostrophe, stopword


def test_non_latin_captions_are_tagged_not_refused(tmp_path, tagger):
    from ttd.jobs.stream_job import tag_stream

    captions = ["一只猫在沙发上", "Кошка сидит", "a jalapeño"]
    rows = []
    for i, caption in enumerate(captions):
        Image.fromarray(make_sample(3, i).image).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": caption})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                             encoding="utf-8")
    out = tmp_path / "tags.jsonl"
    tag_stream(tagger, open_items(tmp_path / "captions.jsonl"), out, batch_size=3, progress=False, decode_workers=0)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r.get("error") for r in records] == [None, None, None]
    assert [[c["tag"] for c in r["candidates"]] for r in records] == [["一只猫在沙发上"], ["кошка", "сидит"],
                                                                       ["jalapeño"]]


# item 4: the glob module's rules -----------------------------------------------------------------

def _tree(root: Path) -> None:
    for name in ("photos/a.png", "photos/b.jpg", "photos/.hidden.png", "photos/sub/c.png", "photos/sub/deep/d.png",
                 "photos/sub.png", "photos/z/e.png", "photos/notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def _names(root: Path, items) -> list[str]:
    return [Path(i.image).relative_to(root).as_posix() for i in items]


def _stdlib(root: Path, pattern: str) -> set[str]:
    return {Path(p).relative_to(root).as_posix() for p in glob.glob(str(root / pattern), recursive=True)
            if not os.path.isdir(p)}


@pytest.mark.parametrize("pattern, expected", [
    ("photos/**/*.png", ["photos/a.png", "photos/sub/c.png", "photos/sub/deep/d.png", "photos/sub.png",
                         "photos/z/e.png"]),
    ("photos/*.png", ["photos/a.png", "photos/sub.png"]),
    ("photos/*/*.png", ["photos/sub/c.png", "photos/z/e.png"]),
    ("photos/**", ["photos/a.png", "photos/b.jpg", "photos/notes.txt", "photos/sub/c.png", "photos/sub/deep/d.png",
                   "photos/sub.png", "photos/z/e.png"]),
    ("**/deep/*.png", ["photos/sub/deep/d.png"]),
    ("photos/.*.png", ["photos/.hidden.png"]),
])
def test_globs_follow_the_glob_module_in_sorted_streamed_order(tmp_path, pattern, expected):
    _tree(tmp_path)
    items = stream_images([f"{tmp_path}/{pattern}"])
    assert iter(items) is items  # streamed, not listed
    got = _names(tmp_path, items)
    assert got == expected  # sorted, depth first, as a folder is walked
    assert set(got) == _stdlib(tmp_path, pattern)
    assert _names(tmp_path, list(stream_images([f"{tmp_path}/{pattern}"]))) == expected


def test_a_relative_pattern_matches_from_the_working_folder(tmp_path, monkeypatch):
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path / "photos")
    assert [i.image for i in stream_images(["**/*.png"])] == ["a.png", "sub/c.png", "sub/deep/d.png", "sub.png",
                                                              "z/e.png"]


# item 13: file modes ------------------------------------------------------------------------------

@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_keeps_the_umask_mode_or_the_old_files_mode(tmp_path, umask_022):
    from ttd.model.factory import atomic_write

    path = tmp_path / "model.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text("{}"))
    assert _mode(path) == 0o644  # what open() would give a new file, not mkstemp's 600
    path.chmod(0o640)
    atomic_write(path, lambda tmp: Path(tmp).write_text("{ }"))
    assert _mode(path) == 0o640 and path.read_text() == "{ }"


def test_a_saved_checkpoint_and_its_config_are_readable_by_others(tmp_path, tiny_model, umask_022):
    from ttd.model.factory import save_checkpoint

    path = save_checkpoint(tiny_model, tmp_path / "model.safetensors")
    assert _mode(path) == 0o644 and _mode(path.with_suffix(".json")) == 0o644


def test_the_vocabulary_cache_entry_keeps_the_umask_mode(tmp_path, umask_022):
    from ttd.runtime.vocab_cache import load_or_encode

    fake = SimpleNamespace(config=SimpleNamespace(prompt_templates=("a photo of {}.",), embed_dim=4),
                           encode_tags=lambda tags, progress=False: np.ones((len(tags), 4), np.float32))
    result = load_or_encode(fake, ["cat", "dog"], "k" * 32, tmp_path)
    assert not result.hit and _mode(result.path) == 0o644


# item 14: inputs that name nothing ----------------------------------------------------------------

def _vocab(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("circle\nsquare\n")
    return path


@pytest.mark.parametrize("command", ["tag", "segment"])
@pytest.mark.parametrize("spec", ["nothing/*.png", "empty/**/*.png", "missing_folder", "missing_folder/"])
def test_image_arguments_that_name_nothing_are_refused_and_the_old_output_stays(tmp_path, command, spec):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no image")
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0, "image": "old.png"}\n')
    before = out.read_bytes()
    names = ("--vocabulary", _vocab(tmp_path)) if command == "tag" else ("--classes", "circle,square")
    result = run(command, "--model", "world-tiny", "--device", "cpu", "--quiet", *names, f"{tmp_path}/{spec}",
                 "-o", out)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and spec.rstrip("/").split("/")[0] in errors[0]
    assert "Traceback" not in result.output
    assert out.read_bytes() == before


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("")
    with pytest.raises(InputError, match="holds no image file"):
        stream_images([tmp_path / "docs"])


def test_a_missing_image_file_stays_one_error_item(tmp_path):
    assert [i.image for i in stream_images([tmp_path / "gone.png"])] == [str(tmp_path / "gone.png")]


def test_an_input_without_items_keeps_the_previous_output(tmp_path, tagger):
    from ttd.jobs.stream_job import tag_stream

    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n")
    out = tmp_path / "tags.jsonl"
    out.write_text('{"index": 0}\n')
    with pytest.raises(InputError, match="holds no item"):
        tag_stream(tagger, open_items(captions), out, batch_size=2, progress=False, decode_workers=0,
                   inputs=[captions])
    assert out.read_text() == '{"index": 0}\n'


def test_segment_of_an_input_without_items_keeps_the_previous_output(tmp_path, tagger):
    from ttd.jobs.runner import JobOptions, run_job
    from ttd.jobs.segment_job import WholeImageStep
    from ttd.segment.segmentation import SegmentOptions

    out = tmp_path / "seg.jsonl"
    out.write_text('{"index": 0}\n')
    with pytest.raises(InputError, match="holds no item"):
        run_job(tagger, WholeImageStep(["circle"], SegmentOptions(), None, 10**6), iter(()), out, None,
                JobOptions(8, 0, progress=False))
    assert out.read_text() == '{"index": 0}\n'


# item 20: resume names an input another way ------------------------------------------------------

def _description(captions, images):
    from ttd.jobs.stream_job import tag_job_description

    return tag_job_description(captions, images, "torch", "world-tiny", None, None, None, "ttd", "fp32", None,
                               "mean", False)


def test_a_resume_may_name_a_relative_input_by_its_absolute_path(tmp_path, monkeypatch):
    from ttd.jobs.jsonl_output import check_same_job, write_job

    (tmp_path / "data" / "photos").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    job_file = tmp_path / "job.json"
    write_job(job_file, _description("data/captions.jsonl", []))
    check_same_job(job_file, _description(tmp_path / "data" / "captions.jsonl", []), tmp_path / "out")
    check_same_job(job_file, _description("./data/../data/captions.jsonl", []), tmp_path / "out")
    write_job(job_file, _description(None, ["data/photos", "data/photos/**/*.png"]))
    check_same_job(job_file, _description(None, [tmp_path / "data" / "photos", f"{tmp_path}/data/photos/**/*.png"]),
                   tmp_path / "out")
    with pytest.raises(ValueError, match="other settings"):  # another input is still another job
        check_same_job(job_file, _description(None, ["data/photos/*.png"]), tmp_path / "out")


def test_resume_through_the_cli_accepts_the_absolute_path(tmp_path, monkeypatch):
    for i in range(2):
        Image.fromarray(make_sample(3, i).image).save(tmp_path / f"img{i}.png")
    _vocab(tmp_path)
    monkeypatch.chdir(tmp_path)
    first = run("tag", "--model", "world-tiny", "--device", "cpu", "--quiet", "--backend", "torch", "--dtype", "fp32",
                "--vocabulary", "vocab.txt", "img0.png", "img1.png", "-o", "out.jsonl")
    assert first.exit_code == 0, first.output
    again = run("tag", "--model", "world-tiny", "--device", "cpu", "--quiet", "--backend", "torch", "--dtype", "fp32",
                "--vocabulary", "vocab.txt", tmp_path / "img0.png", tmp_path / "img1.png", "-o", "out.jsonl",
                "--resume")
    assert again.exit_code == 0, again.output
    assert "already complete" in again.output
