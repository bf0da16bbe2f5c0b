"""Whole-image inference and `ttd segment`: masks in the input image's geometry for
non-square and large images, sliding windows that cover every pixel, flip TTA and multi-scale,
and the same numbers as the evaluation path where the image is the model's own size."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttd.cli import main
from ttd.data.world import make_sample
from ttd.evaluation.evaluate import _caption_masks
from ttd.segment.pamr import pamr
from ttd.runtime import load_tagger, torch_tagger
from ttd.segment.segmentation import SegmentOptions, segment_caption, segment_classes
from ttd.model.tags import candidate_tags
from ttd.segment import whole_image
from ttd.segment.whole_image import center_crop_box, encode_windows, plan_scale, score_maps, window_starts


@pytest.fixture(scope="module")
def default_tagger():
    return load_tagger("torch", device="cpu")


@pytest.fixture()
def tiny_tagger(tiny_model):
    return torch_tagger(tiny_model, device="cpu")


def world_image(width: int, height: int, index: int = 0) -> Image.Image:
    return Image.fromarray(make_sample(2, index, size=max(width, height)).image).resize((width, height))


def test_windows_cover_every_pixel_and_end_flush():
    assert window_starts(64, 64, 42) == [0]
    assert window_starts(100, 64, 42) == [0, 36]
    assert window_starts(200, 64, 42) == [0, 42, 84, 126, 136]
    plan = plan_scale(640, 480, 224, 1.0, 149)  # shorter side -> 224: 299 x 224
    assert (plan.width, plan.height) == (299, 224)
    assert plan.windows == ((0, 0), (75, 0))
    large = plan_scale(3000, 1000, 224, 2.0, 149)  # 1344 x 448
    covered = np.zeros((large.height, large.width), int)
    for left, top in large.windows:
        covered[top : top + 224, left : left + 224] += 1
    assert (large.width, large.height) == (1344, 448) and covered.min() >= 1
    assert max(x for x, _ in large.windows) == 1344 - 224 and max(y for _, y in large.windows) == 448 - 224
    with pytest.raises(ValueError, match="stride 0 must be at least 1"):
        plan_scale(640, 480, 224, 1.0, 0)
    with pytest.raises(ValueError, match="more than 4096"):
        plan_scale(20000, 20000, 224, 8.0, 1)


@pytest.mark.parametrize("size", [(150, 90), (37, 203), (700, 260)])
def test_masks_and_label_maps_have_the_input_images_size(tiny_tagger, size):
    width, height = size
    image = world_image(width, height)
    options = SegmentOptions(scales=(1.0, 2.0) if width > 600 else (1.0,), stride=40)
    caption = segment_caption(tiny_tagger, image, "a red circle on grass", options)
    assert (caption.width, caption.height) == size
    assert [s.kind for s in caption.segments][0] == "caption"
    assert all(s.mask.shape == (height, width) and s.mask.dtype == bool for s in caption.segments)
    classes = segment_classes(tiny_tagger, image, ["circle", "square", "grass"], options)
    assert classes.label_map.shape == (height, width) and classes.label_map.max() <= 3
    for segment in classes.segments:  # one mask per class present, exactly its label-map pixels
        assert np.array_equal(segment.mask, classes.label_map == 1 + ["circle", "square", "grass"].index(segment.label))


def test_slide_multiscale_and_flip_shapes(tiny_model):
    flip = torch_tagger(tiny_model, device="cpu", flip_tta=True)
    image = world_image(300, 100)
    features = encode_windows(flip, image, "whole", scales=(1.0, 1.5), stride=32)
    # scale 1: 192 x 64 -> 5 windows in a row; scale 1.5: 288 x 96 -> 8 x 2 windows
    assert [(p.width, p.height, len(p.windows)) for p in features.plans] == [(192, 64, 5), (288, 96, 16)]
    assert [e.shape[:2] for e in features.patch_views] == [(5, 2), (16, 2)]  # two views: flip TTA
    assert features.canvas_image.shape == (96, 288, 3)  # the finest scale's canvas
    maps = score_maps(flip, features, ["circle", "grass"], flip.encode_tags(["circle", "grass"]))
    assert maps.logits.shape == (2, 96, 288) and maps.scores.shape == (2,)
    assert maps.probabilities(0).shape == (100, 300) and maps.label_map().shape == (100, 300)


def test_flip_tta_makes_whole_image_maps_mirror_equivariant(tiny_model):
    """With flip TTA the maps of a mirrored image are the mirrored maps (a window layout that is
    its own mirror: width = S + 2 · stride); without it they are not."""
    image = world_image(64 + 2 * 20, 64, index=3)
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gaps = {}
    for flip in (False, True):
        tagger = torch_tagger(tiny_model, device="cpu", flip_tta=flip)
        embeds = tagger.encode_tags(["circle", "red"])
        maps = [score_maps(tagger, encode_windows(tagger, im, "whole", stride=20), ["circle", "red"], embeds)
                for im in (image, mirrored)]
        gaps[flip] = np.abs(maps[0].logits[..., ::-1] - maps[1].logits).max()
    assert gaps[True] < 1e-4
    assert gaps[False] > 1e-2


def test_model_sized_image_gives_the_evaluations_masks_and_the_taggers_scores(default_tagger):
    """Whole-image inference of a 64 x 64 world image is one window: its caption mask is the
    evaluation's (ttd eval) pixel for pixel, its tag scores those of `ttd tag` (Tagger.tag)."""
    differing = 0
    for index in range(6):
        sample = make_sample(2, index)
        result = segment_caption(default_tagger, Image.fromarray(sample.image), sample.caption)
        _, views = default_tagger.encode_images(sample.image[None])
        expected = _caption_masks(default_tagger, views, default_tagger.encode_texts([sample.caption]), 64, 0.5)
        differing += int((expected[0] != result.segments[0].mask).sum())
        tagged = default_tagger.tag(sample.image[None], [candidate_tags(sample.caption)])[0]
        np.testing.assert_allclose([s for _, s in result.candidates], tagged.scores, atol=1e-6)
        assert result.selected == tagged.selected
    assert differing == 0


def test_center_crop_scores_the_crop_only(default_tagger):
    """--crop center: the scores are those of the centre crop `ttd tag` sees; outside the crop
    every pixel is background, and the crop box is where resize_center_crop takes it."""
    from ttd.runtime.images import resize_center_crop

    image = world_image(160, 64, index=5)
    left, top, right, bottom = center_crop_box(160, 64, 64)
    assert (left, top, right, bottom) == (48.0, 0.0, 112.0, 64.0)
    result = segment_classes(default_tagger, image, ["circle", "square", "star"], SegmentOptions(crop="center",
                                                                                                 mask_threshold=0.01))
    assert result.label_map.shape == (64, 160)
    assert (result.label_map[:, :47] == 0).all() and (result.label_map[:, 113:] == 0).all()
    assert (result.label_map[:, 49:111] > 0).all()  # θ = 0.01: every scored pixel is some class
    crop = resize_center_crop(image, 64, "bilinear")
    scores = default_tagger.tag(crop[None], [["circle", "square", "star"]])[0].scores
    np.testing.assert_allclose([s for _, s in result.candidates], scores, atol=1e-6)


def test_large_image_finds_what_the_centre_crop_misses(default_tagger):
    """A wide image whose objects lie outside the centre crop: whole-image inference labels the
    largest object with its colour where it is; the centre crop cannot see it."""
    from ttd.data.world import COLOURS

    colours = list(COLOURS)
    found = {"whole": [], "center": []}
    for index in (7, 10, 12):
        sample = make_sample(2, index)
        canvas = np.zeros((64, 256, 3), np.uint8)
        canvas[:] = sample.image[:8, :8].mean(axis=(0, 1)).astype(np.uint8)  # the sample's background colour
        canvas[:, :64] = sample.image
        obj = max(sample.objects, key=lambda o: o.mask.sum())
        truth = np.zeros((64, 256), bool)
        truth[:, :64] = obj.mask
        for crop in found:
            result = segment_classes(default_tagger, Image.fromarray(canvas), colours,
                                     SegmentOptions(crop=crop, stride=32, mask_threshold=0.01))
            found[crop].append(float((result.label_map[truth] == 1 + colours.index(obj.colour)).mean()))
    assert found["center"] == [0.0, 0.0, 0.0]
    assert min(found["whole"]) > 0.9


def test_pamr_keeps_constants_and_sharpens_a_blurred_edge():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    blurred = np.clip((np.arange(32) - 8) / 16, 0, 1).astype(np.float32)[None, None].repeat(32, 1)
    constant = np.full((1, 32, 32), 0.3, np.float32)
    refined = pamr(image, np.concatenate([blurred, constant]), iterations=10)
    assert np.abs(refined[1] - 0.3).max() < 1e-6
    assert refined.min() >= 0 and refined.max() <= 1
    truth = np.zeros((32, 32), bool)
    truth[:, 16:] = True
    error_before = np.abs(blurred[0] - truth).mean()
    error_after = np.abs(refined[0] - truth).mean()
    assert error_after < 0.6 * error_before  # 0.125 -> 0.068; plain neighbour averaging blurs (> 0.125)
    with pytest.raises(ValueError, match="differ in size"):
        pamr(image[:16], blurred)


def test_segment_command_writes_records_coco_and_pngs(tmp_path):
    from pycocotools.coco import COCO

    for i, size in enumerate([(120, 64), (64, 200)]):
        world_image(*size, index=i).save(tmp_path / f"im{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    out, coco = tmp_path / "seg.jsonl", tmp_path / "seg.coco.json"
    result = CliRunner().invoke(main, ["segment", "--classes", "circle,square,grass", str(tmp_path / "im0.png"),
                                       str(tmp_path / "im1.png"), str(tmp_path / "bad.png"), "-o", str(out),
                                       "--coco", str(coco), "--masks-dir", str(tmp_path / "png"), "--device", "cpu",
                                       "--quiet", "--flip-tta", "--pamr"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r.get("width"), r.get("height")) for r in records] == [(120, 64), (64, 200), (None, None)]
    assert "cannot decode image" in records[2]["error"]
    data = COCO()
    data.dataset = json.loads(coco.read_text())
    data.createIndex()
    assert [(im["width"], im["height"]) for im in data.dataset["images"]] == [(120, 64), (64, 200)]
    label_map = np.asarray(Image.open(records[0]["label_map"]))
    assert label_map.shape == (64, 120)
    for annotation in data.dataset["annotations"]:
        image = data.imgs[annotation["image_id"]]
        mask = data.annToMask(annotation)
        assert mask.shape == (image["height"], image["width"]) and mask.sum() == annotation["area"] > 0
        if annotation["image_id"] == 1:  # the class masks are the label map's classes
            name = data.cats[annotation["category_id"]]["name"]
            assert np.array_equal(mask.astype(bool), label_map == 1 + ["circle", "square", "grass"].index(name))


def test_segment_command_refuses_unusable_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["segment", "--classes", "a", "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "--classes needs image files" in result.output
    result = runner.invoke(main, ["segment", "--captions", str(tmp_path / "c.jsonl"), "--classes", "a",
                                  "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "exactly one of" in result.output
    (tmp_path / "i.png").write_bytes(b"x")
    result = runner.invoke(main, ["segment", "--classes", "a", str(tmp_path / "i.png"), "--scales", "1,-2",
                                  "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "--scales '1,-2'" in result.output
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a thing\n")
    result = runner.invoke(main, ["segment", "--classes", "a", str(tmp_path / "i.png"), "--templates", str(templates),
                                  "-o", str(tmp_path / "o.jsonl"), "--device", "cpu"])
    assert result.exit_code == 2 and "must be text with one {} for the tag" in result.output


def test_prompt_templates_change_the_class_embeddings(default_tagger):
    from ttd.segment.segmentation import read_templates, with_templates

    other = with_templates(default_tagger, read_templates("# world prompts\nthe {}\n\na {}\n"))
    assert other.config.prompt_templates == ("the {}", "a {}")
    assert other.backend is default_tagger.backend
    mine, theirs = other.encode_tags(["circle"]), default_tagger.encode_tags(["circle"])
    assert 0.5 < float(mine[0] @ theirs[0]) < 1 - 1e-4


def test_onnxruntime_export_segments_like_torch(tmp_path_factory):
    """The same whole-image maps through an export in onnxruntime: segmentation runs on the
    backends' tag-head maps, not on a second implementation."""
    from export.pipeline import run_export
    from ttd.model.factory import load_model

    export = tmp_path_factory.mktemp("export")
    run_export(load_model(), export, check_count=8)
    image = world_image(150, 90, index=2)
    options = SegmentOptions(scales=(1.0, 1.5), stride=40)
    results = {}
    for backend in ("torch", "onnxruntime"):
        tagger = load_tagger(backend, export_dir=str(export), device="cpu", flip_tta=True)
        results[backend] = (segment_classes(tagger, image, ["circle", "square", "red", "grass"], options),
                            segment_caption(tagger, image, "a red circle on grass", options))
    (torch_classes, torch_caption), (ort_classes, ort_caption) = results["torch"], results["onnxruntime"]
    assert ort_classes.label_map.shape == (90, 150)
    assert (ort_classes.label_map == torch_classes.label_map).mean() > 0.999
    assert (ort_caption.segments[0].mask == torch_caption.segments[0].mask).mean() > 0.999
    np.testing.assert_allclose([s for _, s in ort_caption.candidates], [s for _, s in torch_caption.candidates],
                               atol=1e-3)


def test_tag_crop_whole_finds_tags_outside_the_centre_crop(tmp_path):
    """`ttd tag --crop whole`: an object at the left edge of a wide image, outside the centre
    crop, is tagged, and its mask comes back in the image's geometry; `--crop center` misses it."""
    from ttd.jobs.coco import decode_rle

    sample = make_sample(2, 10)
    obj = max(sample.objects, key=lambda o: o.mask.sum())
    canvas = np.zeros((64, 256, 3), np.uint8)
    canvas[:] = sample.image[:8, :8].mean(axis=(0, 1)).astype(np.uint8)
    canvas[:, :64] = sample.image
    Image.fromarray(canvas).save(tmp_path / "wide.png")
    caption = f"a {obj.colour} {obj.shape} near a tree"
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "wide.png", "caption": caption}) + "\n")
    records = {}
    for crop in ("center", "whole"):
        out = tmp_path / f"{crop}.jsonl"
        result = CliRunner().invoke(main, ["tag", "--captions", str(tmp_path / "c.jsonl"), "-o", str(out), "--crop",
                                           crop, "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        records[crop] = json.loads(out.read_text())
    assert obj.colour not in records["center"]["selected"]
    whole = records["whole"]
    assert obj.colour in whole["selected"] and (whole["width"], whole["height"]) == (256, 64)
    mask = decode_rle(next(s for s in whole["segments"] if s["label"] == obj.colour)["rle"])
    assert mask.shape == (64, 256)  # (where the base model's sigmoid masks fire is its calibration, not tested here)
    result = CliRunner().invoke(main, ["tag", "--vocabulary", str(tmp_path / "c.jsonl"), str(tmp_path / "wide.png"),
                                       "-o", str(tmp_path / "v.jsonl"), "--crop", "whole"])
    assert result.exit_code == 2 and "ttd segment --classes" in result.output


def test_whole_image_batch_runs_the_head_once_per_request_and_builds_only_the_records_masks(tmp_path):
    """A batch of whole images: the tag head over every window of every image in one request for
    the tags and one for the captions (not two per image), canvas maps only for the masks a record
    holds (the caption's and the selected tags'), and the per-image path's records."""
    from ttd.data.inputs import Item
    from ttd.jobs.segment_job import WholeImageStep
    from ttd.segment.whole_image import WindowMaps

    tagger = load_tagger("torch", device="cpu")
    samples = [make_sample(3, i) for i in range(6)]
    images = [Image.fromarray(s.image) for s in samples]
    batch = [(i, Item(f"{i}.png", tmp_path / f"{i}.png", s.caption)) for i, s in enumerate(samples)]
    for image, (_, item) in zip(images, batch):
        image.save(item.path)
    step = WholeImageStep(None, SegmentOptions(batch_size=8))
    heads, canvases, combined = [], [], []
    score_tags = tagger.backend.score_tags
    tagger.backend.score_tags = lambda views, request: heads.append(len(views)) or score_tags(views, request)
    canvas = WindowMaps.canvas_logits
    WindowMaps.canvas_logits = lambda self, tags: canvases.append(tags) or canvas(self, tags)
    combine = whole_image.combine_windows
    whole_image.combine_windows = lambda scores, valid=None: combined.append(scores.shape[:2]) or combine(scores, valid)
    try:
        records = step.records(tagger, step.run(tagger, batch, step.decoder(tagger)([item for _, item in batch])))
    finally:
        WindowMaps.canvas_logits = canvas
        tagger.backend.score_tags = score_tags
        whole_image.combine_windows = combine
    assert heads == [6, 6]  # one window per image: tags, then captions
    assert combined == [(6, 1), (6, 1)]  # the six images' windows combined together, per request
    # a record's masks: its caption's, then its selected tags' together (one canvas call each)
    tag_masks = [[c["tag"] for c in r["candidates"]].index(s["label"]) for r in records for s in r["segments"][1:]]
    assert sorted(k for tags in canvases for k in tags) == sorted([0] * len(records) + tag_masks)
    assert len(canvases) == len(records) + sum(len(r["segments"]) > 1 for r in records)
    for sample, image, record in zip(samples, images, records):
        alone = segment_caption(tagger, image, sample.caption)
        assert [c["tag"] for c in record["candidates"]] == [t for t, _ in alone.candidates]
        np.testing.assert_allclose([c["score"] for c in record["candidates"]], [s for _, s in alone.candidates],
                                   atol=2e-6)
        assert record["selected"] == alone.selected


def test_an_image_that_needs_too_many_windows_is_an_error_record_and_the_others_are_segmented(tmp_path):
    """Images are cut into windows where they are decoded: one that would need more windows than
    allowed is that item's error, not the job's."""
    Image.new("RGB", (64, 8000), (90, 120, 200)).save(tmp_path / "big.png")  # a strip: 7,937 windows down it at stride 1
    world_image(64, 64, index=1).save(tmp_path / "small.png")
    out = tmp_path / "seg.jsonl"
    result = CliRunner().invoke(main, ["segment", "--classes", "circle,square", str(tmp_path / "big.png"),
                                       str(tmp_path / "small.png"), "--stride", "1", "-o", str(out), "--device", "cpu",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    big, small = [json.loads(line) for line in out.read_text().splitlines()]
    assert big["image"].endswith("big.png") and "needs 7937 windows of 64 px at stride 1" in big["error"]
    assert "error" not in small and (small["width"], small["height"]) == (64, 64) and small["candidates"]
