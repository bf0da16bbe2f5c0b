"""Hardening of the commands around the server (issue #8, item 12): a warning for a public bind,
vocabulary tags that would be empty prompts, a cap on caption length, no orphans in world folders."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.data.inputs import InputError, read_vocabulary


# tests here start servers: a hang fails the test in minutes (tests/conftest.py)
pytestmark = pytest.mark.deadline(300)

def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_public_bind_is_warned_about(tmp_path):
    result = invoke("serve", tmp_path, "--host", "0.0.0.0")
    assert "warning: binding 0.0.0.0 exposes the server to the network" in result.output
    assert "warning" not in invoke("serve", tmp_path).output


def test_vocabulary_tags_without_letters_are_refused(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("circle\n# a comment\n...\nsquare\n")
    with pytest.raises(InputError, match=r"vocab.txt:3: tag '...' has no letter or digit"):
        read_vocabulary(path)


def test_a_caption_with_thousands_of_tags_is_an_item_error(tmp_path):
    Image.fromarray(make_sample(3, 0).image).save(tmp_path / "a.png")
    long_caption = " ".join(f"word{i}" for i in range(5000))
    rows = [{"image": "a.png", "caption": long_caption}, {"image": "a.png", "caption": make_sample(3, 0).caption}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("tag", "--model", "world-tiny", "--captions", tmp_path / "c.jsonl", "-o", tmp_path / "o.jsonl",
                    "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    first, second = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert first["error"].startswith("caption has 5000 candidate tags, more than the limit of 1024")
    assert "error" not in second


def test_world_generate_refuses_a_used_folder(tmp_path):
    assert invoke("world", "generate", tmp_path / "w", "--count", "3").exit_code == 0
    result = invoke("world", "generate", tmp_path / "w", "--count", "2")
    assert result.exit_code == 2 and "exists and is not an empty folder" in result.output
    assert len(list((tmp_path / "w" / "images").iterdir())) == 3


def test_vocabulary_tags_the_tokenizer_cannot_tell_apart_are_warned_about(tmp_path):
    from ttd.runtime import load_tagger
    from ttd.jobs.tag_job import warn_indistinct_tags

    tagger = load_tagger("torch", model="world-tiny", device="cpu")
    with pytest.warns(UserWarning, match=r"4 vocabulary tags are indistinguishable .*: 'звезда', '星'; 'xyzzy', 'qwerty'$"):
        warn_indistinct_tags(tagger, ["circle", "звезда", "square", "星", "xyzzy", "qwerty"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_indistinct_tags(tagger, ["circle", "square", "red circle"])
