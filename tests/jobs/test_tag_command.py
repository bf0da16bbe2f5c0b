import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.model.tags import candidate_tags


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def world_png(path, index):
    Image.fromarray(make_sample(3, index).image).save(path)
    return make_sample(3, index).caption


@pytest.fixture()
def messy_folder(tmp_path):
    """Good world images mixed with every kind of bad input `ttd tag` must survive."""
    rows = []
    for i in range(3):
        rows.append({"image": f"good{i}.png", "caption": world_png(tmp_path / f"good{i}.png", i)})
    world_png(tmp_path / "plain.png", 5)
    Image.open(tmp_path / "plain.png").convert("L").save(tmp_path / "grey.png")
    Image.open(tmp_path / "plain.png").convert("RGBA").save(tmp_path / "rgba.png")
    Image.open(tmp_path / "plain.png").convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(tmp_path / "sixteen.png")
    Image.new("L", (2000, 2000)).save(tmp_path / "bomb.png")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good0.png").read_bytes()[:200])
    for name in ("grey.png", "rgba.png", "cmyk.jpg", "sixteen.png"):
        rows.append({"image": name, "caption": "a red circle on grass"})
    rows += [
        {"image": "bomb.png", "caption": "a red circle"},
        {"image": "zero.png", "caption": "a red circle"},
        {"image": "text.png", "caption": "a red circle"},
        {"image": "truncated.png", "caption": "a red circle"},
        {"image": "missing.png", "caption": "a red circle"},
        {"image": "good1.png", "caption": ""},
        {"image": "good1.png", "caption": "and the of it"},
        {"image": "good2.png", "caption": " ".join(["red circle"] * 40)},
    ]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    return tmp_path


def test_every_bad_item_gets_an_error_record_and_the_rest_are_tagged(messy_folder):
    out = messy_folder / "out" / "tags.jsonl"
    result = run("tag", "--model", "world-tiny", "--captions", messy_folder / "captions.jsonl", "-o", out,
                 "--max-pixels", 1_000_000, "--batch-size", 4, "--quiet", "--masks-dir", messy_folder / "masks")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 16
    by_image = {}
    for r in records:
        by_image.setdefault(r["image"], []).append(r)
    for name in ("good0.png", "grey.png", "rgba.png", "cmyk.jpg", "sixteen.png"):
        (record,) = by_image[name]
        assert "error" not in record, record
        if not name.startswith("good"):
            assert [c["tag"] for c in record["candidates"]] == ["red", "circle", "grass"]
        assert all(0.0 <= c["score"] <= 1.0 for c in record["candidates"])
        assert set(record["selected"]) <= {c["tag"] for c in record["candidates"]}
    errors = {r["image"]: r["error"] for r in records if "error" in r}
    assert "4,000,000 pixels exceeds the limit of 1,000,000" in errors["bomb.png"]
    assert "empty file (0 bytes)" in errors["zero.png"]
    assert "cannot decode image" in errors["text.png"]
    assert "cannot decode image" in errors["truncated.png"]
    assert "file not found" in errors["missing.png"]
    assert "not a JSON object" in errors["<line 16>"]
    good1 = by_image["good1.png"]
    assert [r.get("error") for r in good1[1:]] == ["empty caption",
                                                  "caption 'and the of it' has no candidate tags (only stopwords or punctuation)"]
    long_caption = by_image["good2.png"][1]
    assert [c["tag"] for c in long_caption["candidates"]] == ["red", "circle"]
    assert "wrote 16 records" in result.output and "(8 errors)" in result.output
    # a mask PNG per selected tag, inside the masks folder
    for record in records:
        for path in record.get("masks", {}).values():
            assert path.startswith(str((messy_folder / "masks").resolve()))
            assert Image.open(path).size == (64, 64)


def test_csv_input_and_vocabulary_mode(tmp_path):
    caption = world_png(tmp_path / "a.png", 0)
    (tmp_path / "c.csv").write_text(f"image,caption\na.png,{caption}\n")
    out = tmp_path / "t.jsonl"
    assert run("tag", "--model", "world-tiny", "--captions", tmp_path / "c.csv", "-o", out, "--quiet").exit_code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in record, record  # an error record echoes the caption too
    assert record["image"] == "a.png" and record["caption"] == caption
    assert [c["tag"] for c in record["candidates"]] == candidate_tags(caption) and len(record["candidates"]) >= 2
    assert all(0.0 <= c["score"] <= 1.0 for c in record["candidates"])
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# shapes\nred\ncircle\n\nsquare\nred\n")
    result = run("tag", "--model", "world-tiny", "--vocabulary", vocab, tmp_path, "-o", out, "--quiet", "--top-k", 2)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert [t["tag"] for t in record["top"]] and len(record["top"]) == 2
    assert sorted(t["tag"] for t in record["top"]) != ["red", "red"]


def test_ten_thousand_tag_vocabulary(tmp_path):
    """10,000 filler words the world tokenizer does not know, with the world's real words mixed in:
    the real words that name the image must come out on top (embedded default model, sigmoid score,
    which does not depend on the size of the vocabulary)."""
    from ttd.data.world import ABSENT_THINGS, BACKGROUNDS, COLOURS, SHAPES

    sample = make_sample(3, 5)  # a big blue cross on grass
    Image.fromarray(sample.image).save(tmp_path / "a.png")
    real = [*SHAPES, *COLOURS, *BACKGROUNDS, *ABSENT_THINGS]
    vocabulary = [f"tag{i}" for i in range(10_000)]
    for k, word in enumerate(real):  # spread through the list, not appended at the end
        vocabulary.insert(1 + k * 9_000 // len(real), word)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(vocabulary) + "\n")
    out = tmp_path / "t.jsonl"
    result = run("tag", "--vocabulary", vocab, tmp_path / "a.png", "-o", out, "--quiet", "--score", "sigmoid",
                 "--top-k", 10)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert "error" not in record
    top = [t["tag"] for t in record["top"]]
    assert len(top) == 10 and not any(t.startswith("tag") for t in top), top  # no filler word in the top 10
    assert set(top[:2]) == {"blue", "grass"} and set(top[:2]) <= set(sample.tag_masks), top


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give exactly one of --captions FILE or --vocabulary FILE"),
        (["--vocabulary", "v.txt"], "--vocabulary needs image files or folders"),
        (["--captions", "nope.jsonl"], "captions file nope.jsonl does not exist"),
        (["--captions", "c.jsonl", "--backend", "tensorrt"], "pass --export-dir DIR"),
        (["--captions", "c.jsonl", "--checkpoint", "x.pt"], "never unpickles"),
    ],
)
def test_bad_options_exit_with_a_clear_message(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    (tmp_path / "x.pt").write_bytes(b"x")
    result = CliRunner().invoke(main, ["tag", "-o", "out.jsonl", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_random_vit_b_16_end_to_end(tmp_path):
    """The real ViT-B/16 architecture (random weights) through `ttd tag`: real shapes and cost."""
    for i in range(2):
        Image.fromarray(make_sample(4, i).image).resize((300, 240)).save(tmp_path / f"{i}.png")
    (tmp_path / "c.jsonl").write_text('{"image": "0.png", "caption": "a red circle"}\n'
                                      '{"image": "1.png", "caption": "a blue square on grass"}\n')
    out = tmp_path / "t.jsonl"
    result = run("tag", "--model", "ViT-B-16", "--captions", tmp_path / "c.jsonl", "-o", out, "--quiet",
                 "--dtype", "bfloat16", "--masks-dir", tmp_path / "m")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [[c["tag"] for c in r["candidates"]] for r in records] == [["red", "circle"], ["blue", "square", "grass"]]
    for record in records:
        assert sum(c["score"] >= 0.5 for c in record["candidates"]) == len(record["selected"])
        for path in record.get("masks", {}).values():
            assert Image.open(path).size == (224, 224)
