import numpy as np

from ttd.data.annotations import read_eval_split, world_eval_samples, write_world_split
from ttd.data.world import BACKGROUNDS, COLOURS, SHAPES, make_sample
from ttd.runtime.images import Preprocess
from ttd.model.tags import candidate_tags


def test_samples_are_reproducible_and_differ_by_index():
    a, b, c = make_sample(5, 3), make_sample(5, 3), make_sample(5, 4)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8


def test_ground_truth_is_consistent():
    for index in range(50):
        sample = make_sample(0, index)
        candidates = candidate_tags(sample.caption)
        assert set(sample.relevant_tags) <= set(candidates)
        largest = max(sample.objects, key=lambda o: o.mask.sum())
        assert largest.shape in candidates  # the most salient object is always named
        union = np.zeros((64, 64), bool)
        for tag in sample.relevant_tags:
            assert sample.tag_masks[tag].any()
            union |= sample.tag_masks[tag]
        assert np.array_equal(sample.caption_mask(), union)
        for obj in sample.objects:
            assert obj.shape in SHAPES and np.array_equal(obj.mask & ~sample.tag_masks[obj.shape], np.zeros_like(obj.mask))


def test_ground_truth_masks_agree_with_the_pixels():
    """Each colour tag's mask covers pixels of that colour, each object's pixels have its colour,
    and a background tag's pixels average to that background -- read from the image, not from
    the generator's bookkeeping."""
    names = list(COLOURS)
    chromaticity = np.array([COLOURS[c] for c in names], np.float64)
    chromaticity /= chromaticity.sum(axis=1, keepdims=True)
    for index in range(60):
        sample = make_sample(0, index)
        pixels = sample.image.astype(np.float64)
        chroma = pixels / np.maximum(pixels.sum(axis=-1, keepdims=True), 1)
        nearest = np.array(names)[np.argmin(((chroma[:, :, None] - chromaticity[None, None]) ** 2).sum(-1), axis=-1)]
        for tag, mask in sample.tag_masks.items():
            if tag in COLOURS:
                assert (nearest[mask] == tag).mean() > 0.98, (index, tag)
            elif tag in BACKGROUNDS:
                assert np.abs(pixels[mask].mean(axis=0) - BACKGROUNDS[tag]).max() < 15, (index, tag)
                assert tag == sample.background
            else:
                assert tag in SHAPES
        for obj in sample.objects:
            assert (nearest[obj.mask] == obj.colour).mean() > 0.98, (index, obj.shape)
            assert not (obj.mask & sample.tag_masks[sample.background]).any()


def test_the_world_shows_distractors_and_partial_naming():
    samples = [make_sample(0, i) for i in range(300)]
    candidates = sum(len(candidate_tags(s.caption)) for s in samples)
    relevant = sum(len(s.relevant_tags) for s in samples)
    assert 0.5 < relevant / candidates < 0.8  # a third of the candidate tags are distractors
    unnamed = sum(o.shape not in candidate_tags(s.caption) for s in samples for o in s.objects)
    assert unnamed > 100  # many small objects are never named


def test_written_split_reads_back_identically(tmp_path):
    write_world_split(tmp_path, seed=2, count=6, progress=False)
    on_disk = read_eval_split(tmp_path / "annotations.jsonl", Preprocess(64))
    in_memory = world_eval_samples(2, 6)
    assert len(on_disk) == len(in_memory) == 6
    for a, b in zip(on_disk, in_memory):
        assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.relevant_tags == b.relevant_tags
        assert np.array_equal(a.caption_mask, b.caption_mask)
        for tag in a.relevant_tags:
            assert np.array_equal(a.tag_masks[tag], b.tag_masks[tag])


def test_tagmask_layout_converts_to_the_evaluation_format(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from ttd.cli import main

    source = tmp_path / "tagmask" / "000"
    source.mkdir(parents=True)
    sample = make_sample(2, 1)
    Image.fromarray(sample.image).save(source / "img.jpg", quality=98)
    masks = {}
    for tag in sample.relevant_tags:
        Image.fromarray(sample.tag_masks[tag].astype(np.uint8) * 255).save(source / f"img_{tag}.png")
        masks[tag] = f"img_{tag}.png"
    Image.fromarray(sample.caption_mask().astype(np.uint8) * 255).save(source / "img_caption.png")
    import json

    (source / "img.json").write_text(json.dumps({"image": "img.jpg", "caption": sample.caption,
                                                 "tags": sample.relevant_tags, "tag_masks": masks,
                                                 "caption_mask": "img_caption.png"}))
    result = CliRunner().invoke(main, ["world", "convert-tagmask", str(tmp_path / "tagmask"), str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    (read,) = read_eval_split(tmp_path / "eval" / "annotations.jsonl", Preprocess(64))
    assert read.caption == sample.caption and read.relevant_tags == sample.relevant_tags
    assert np.array_equal(read.caption_mask, sample.caption_mask())
    assert np.abs(read.image.astype(int) - sample.image.astype(int)).mean() < 10  # JPEG noise; another image differs by ~60
