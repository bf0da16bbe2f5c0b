"""Per-class segmentation metrics with exact ground truth, COCO RLE masks, and the VOC-style
layout reader."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.jobs.coco import coco_from_records, decode_rle, encode_rle
from ttd.data.voc import VOCError, read_voc, world_label_map, world_segmentation_samples, write_world_segmentation
from ttd.data.world import SHAPES, make_sample
from ttd.evaluation.metrics import SegmentationCounts


def square(top: int, left: int, side: int = 10, size: int = 20, label: int = 1) -> np.ndarray:
    labels = np.zeros((size, size), np.uint8)
    labels[top : top + side, left : left + side] = label
    return labels


def test_perfect_prediction_scores_miou_one():
    counts = SegmentationCounts(3)
    for index in range(4):
        truth = world_label_map(make_sample(2, index)) % 3
        counts.add(truth.copy(), truth)
    summary = counts.summary()
    assert summary == {"miou": 1.0, "mfpr": 0.0, "mfnr": 0.0, "pixel_accuracy": 1.0}


def test_a_known_shift_scores_what_it_must():
    """A 10 x 10 square in a 20 x 20 image, predicted 2 pixels to the right: overlap 8 x 10 = 80,
    union 120 -> IoU 2/3; background: 300 true, 280 overlap, union 320 -> 7/8. FPR of the
    square: 20 wrong of 300 background pixels; FNR: 20 missed of 100."""
    counts = SegmentationCounts(2)
    counts.add(square(5, 7), square(5, 5))
    per = counts.per_class()
    np.testing.assert_allclose(per["iou"], [280 / 320, 80 / 120])
    np.testing.assert_allclose(per["fpr"], [20 / 100, 20 / 300])
    np.testing.assert_allclose(per["fnr"], [20 / 300, 20 / 100])
    summary = counts.summary()
    assert summary["miou"] == pytest.approx((7 / 8 + 2 / 3) / 2)
    assert summary["mfnr"] == pytest.approx((20 / 300 + 20 / 100) / 2)
    assert summary["pixel_accuracy"] == pytest.approx(360 / 400)


def test_a_known_shrink_separates_false_positives_from_false_negatives():
    """Predicted: only columns 7..12 of the true square (60 of its 100 pixels), nothing outside.
    Square: IoU 0.6, FPR 0, FNR 0.4; background: IoU 300/340, FPR 40/100 (40 of the 100
    non-background pixels called background), FNR 0."""
    truth = square(5, 5)
    prediction = np.zeros_like(truth)
    prediction[5:15, 7:13] = 1
    counts = SegmentationCounts(2)
    counts.add(prediction, truth)
    per = counts.per_class()
    np.testing.assert_allclose(per["iou"], [300 / 340, 0.6])
    np.testing.assert_allclose(per["fpr"], [0.4, 0.0])
    np.testing.assert_allclose(per["fnr"], [0.0, 0.4])


def test_metrics_pool_pixels_over_images_ignore_255_and_skip_absent_classes():
    counts = SegmentationCounts(4)
    counts.add(square(5, 7), square(5, 5))  # as above
    truth = square(0, 0, side=20, label=2)  # a whole image of class 2, half of it ignored
    truth[:, 10:] = 255
    prediction = np.full((20, 20), 2, np.uint8)
    prediction[:, 10:] = 1  # wrong, but on ignored pixels only
    counts.add(prediction, truth)
    per = counts.per_class()
    assert per["iou"][2] == 1.0 and np.isnan(per["iou"][3]) and np.isnan(per["fnr"][3])
    assert per["iou"][1] == pytest.approx(80 / 120)  # the ignored pixels predicted 1 count nowhere
    assert counts.summary()["miou"] == pytest.approx((7 / 8 + 2 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="ground-truth label 7 outside 0..3"):
        counts.add(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        counts.add(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8))


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 200), (481, 353)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    masks = [rng.random(shape) < 0.3, np.zeros(shape, bool), np.ones(shape, bool)]
    for mask in masks:
        rle = json.loads(json.dumps(encode_rle(mask)))  # through JSON, as written
        assert rle["size"] == list(shape)
        decoded = decode_rle(rle)
        assert decoded.dtype == bool and np.array_equal(decoded, mask)


def test_uncompressed_rle_and_bad_rle():
    mask = np.zeros((4, 3), bool)
    mask[1:3, 1] = True  # column-major runs: 5 out, 2 in, 5 out
    assert np.array_equal(decode_rle({"size": [4, 3], "counts": [5, 2, 5]}), mask)
    with pytest.raises(ValueError, match="not an RLE mask"):
        decode_rle({"counts": "abc"})


def test_coco_json_reads_back_with_pycocotools():
    from pycocotools.coco import COCO

    first, second = square(2, 3, size=20), square(0, 0, side=5, size=20)
    records = [
        {"image": "a.png", "width": 20, "height": 20, "caption": "a red square",
         "segments": [{"label": "a red square", "kind": "caption", "score": 0.9, "rle": encode_rle(first > 0)},
                      {"label": "red", "kind": "tag", "score": 0.8, "rle": encode_rle(second > 0)}]},
        {"image": "b.png", "error": "cannot decode image"},
    ]
    data = COCO()
    data.dataset = coco_from_records(records)
    data.createIndex()
    assert [c["name"] for c in data.dataset["categories"]] == ["caption", "red"]
    assert len(data.imgs) == 1 and len(data.anns) == 2
    caption, tag = data.anns[1], data.anns[2]
    assert caption["caption"] == "a red square" and caption["area"] == 100 and caption["bbox"] == [3, 2, 10, 10]
    assert np.array_equal(data.annToMask(tag).astype(bool), second > 0)


def test_voc_layout_round_trip_of_the_world_split(tmp_path):
    root = write_world_segmentation(tmp_path / "voc", seed=2, count=3, size=96)
    assert (root / "classes.txt").read_text().split() == ["background", *SHAPES]
    assert np.asarray(Image.open(root / "SegmentationClass" / "000000.png")).dtype == np.uint8
    dataset = read_voc(root)
    memory = world_segmentation_samples(2, 3, 96)
    assert dataset.classes == memory.classes and len(dataset) == 3
    for index in range(3):
        (image, labels), (image2, labels2) = dataset.load(index), memory.load(index)
        assert image.size == (96, 96) and np.array_equal(np.asarray(image), np.asarray(image2))
        assert np.array_equal(labels, labels2)
    sample = make_sample(2, 1, 96)
    visible = {SHAPES.index(o.shape) + 1 for o in sample.objects}
    assert set(np.unique(memory.load(1)[1])) == visible | ({0} if (world_label_map(sample) == 0).any() else set())


def test_voc_reader_errors_name_the_file(tmp_path):
    with pytest.raises(VOCError, match="no JPEGImages/ folder"):
        read_voc(tmp_path)
    root = write_world_segmentation(tmp_path / "voc", count=2, size=32)
    with pytest.raises(VOCError, match="test.txt does not exist"):
        read_voc(root, split="test")
    (root / "SegmentationClass" / "000001.png").unlink()
    with pytest.raises(VOCError, match="no label map 000001.png"):
        read_voc(root)
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(root / "SegmentationClass" / "000001.png")
    dataset = read_voc(root)
    with pytest.raises(VOCError, match="000001.png: label map is 16x16, its image 32x32"):
        dataset.load(1)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "SegmentationClass" / "000001.png")
    with pytest.raises(VOCError, match="label map has mode RGB"):
        dataset.load(1)


def test_eval_segmentation_of_the_written_split_equals_the_world_in_memory(tmp_path):
    """`ttd eval-segmentation DIR` (VOC reader, palette PNGs) and the world split in memory give
    the same per-class figures: the files hold the exact ground truth."""
    root = write_world_segmentation(tmp_path / "voc", seed=2, count=4, size=64)
    results = []
    for extra in ([str(root)], ["--count", "4", "--size", "64"]):
        target = tmp_path / f"r{len(results)}.json"
        result = CliRunner().invoke(main, ["eval-segmentation", *extra, "--device", "cpu", "--json", str(target)])
        assert result.exit_code == 0, result.output
        results.append(json.loads(target.read_text()))
    assert results[0]["classes"] == results[1]["classes"]
    assert results[0]["miou"] == results[1]["miou"] and 0 < results[0]["miou"] < 1
    assert set(results[0]["classes"]) == {"background", *SHAPES}
    assert "mean" in result.output and "background" in result.output


def test_world_split_labelled_by_colour():
    from ttd.data.world import COLOURS

    dataset = world_segmentation_samples(2, 3, 64, labelling="colours")
    assert dataset.classes == ["background", *COLOURS]
    for index in range(3):
        labels = dataset.load(index)[1]
        for obj in make_sample(2, index).objects:
            assert (labels[obj.mask] == 1 + list(COLOURS).index(obj.colour)).all()
    with pytest.raises(ValueError, match="unknown world labelling 'sizes'"):
        world_segmentation_samples(2, 1, 64, labelling="sizes")
