"""JPEG decoding on the device (docs/gpu.md, "GPU decoding"): everything but the nvJPEG call,
run on CPU tensors from torchvision.io.decode_jpeg on the CPU: EXIF orientation, the resize and
crop geometry, and the agreement gate with the PIL path on world images and real photos."""

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ttd.data.world import make_sample
from ttd.model.tags import candidate_tags
from ttd.runtime import load_tagger
from ttd.runtime.device_decode import GATE, agreement, compare_decisions, decode_batch, exif_orientation, upright
from ttd.runtime.tagger import TagResult


def jpeg(image: Image.Image, orientation: int | None = None, quality: int = 90) -> bytes:
    buffer, options = io.BytesIO(), {}
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        options["exif"] = exif
    image.save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def photos() -> list[Image.Image]:
    spec = importlib.util.find_spec("skimage")
    folder = Path(spec.origin).parent / "data" if spec and spec.origin else None
    names = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg")
    if folder is None or not all((folder / n).is_file() for n in names):
        pytest.skip("scikit-image's bundled photos are missing: pip install -e '.[dev]'")
    return [Image.open(folder / n).convert("RGB") for n in names]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pil_turns_it(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = jpeg(Image.fromarray(pixels), orientation, quality=100)
    assert exif_orientation(data) == orientation
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    from torchvision.io import decode_jpeg

    decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # the same libjpeg as PIL here
    assert np.array_equal(upright(decoded, orientation).permute(1, 2, 0).numpy(), expected)


def test_decoded_batch_has_the_pil_paths_geometry():
    """Shorter side to the model's size with PIL's rounding, the centre crop, orientation applied:
    close to the PIL path's pixels (another resampler, so not equal); a PNG is left to PIL."""
    from ttd.runtime.images import Preprocess

    photo = photos()[0].resize((1024, 768))
    preprocess = Preprocess(224, "bicubic")
    datas = [jpeg(photo), jpeg(photo.transpose(Image.Transpose.ROTATE_90), orientation=6), b"\x89PNG\r\n\x1a\n..."]
    batch, sizes, left_over = decode_batch(datas, 224, "bicubic", device="cpu")
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == torch.uint8
    assert sizes[:2] == [(1024, 768), (1024, 768)] and left_over == [2]  # the turned photo is upright again
    for n in range(2):
        expected = preprocess(datas[n]).astype(int)
        got = batch[n].numpy().astype(int)
        assert np.abs(got - expected).mean() < 2.0 and np.percentile(np.abs(got - expected), 99) <= 16
    assert not batch[2].any()


def test_the_gate_passes_on_world_images_and_real_photos():
    """≥ 99 % of tag decisions alike on world JPEGs (their captions' tags) and on photos a package
    ships, made 500×375 and 1024×768 JPEGs, some with EXIF turns (a world vocabulary)."""
    tagger = load_tagger("torch", device="cpu")
    world = [make_sample(7, i, 256) for i in range(32)]
    tag_lists = [candidate_tags(s.caption) for s in world]
    on_world = agreement(tagger, [jpeg(Image.fromarray(s.image)) for s in world], tag_lists, device="cpu")
    assert on_world.images == 32 and on_world.decisions == sum(map(len, tag_lists))
    assert on_world.passed and on_world.share >= GATE
    vocabulary = sorted({t for tags in tag_lists for t in tags})
    datas = [jpeg(p.resize(size), orientation) for p in photos() for size in ((500, 375), (1024, 768))
             for orientation in (None, 6, 3)]
    on_photos = agreement(tagger, datas, [vocabulary] * len(datas), device="cpu")
    assert on_photos.images == 36 and on_photos.passed, on_photos


def test_agreement_counts_every_tag_decision():
    def result(tags, selected):
        return TagResult(tags, np.zeros(len(tags)), selected)

    tags = [f"t{i}" for i in range(50)]
    reference = [result(tags, ["t1", "t2"]), result(tags, [])]
    same = compare_decisions(reference, [result(tags, ["t2", "t1"]), result(tags, [])])
    assert (same.decisions, same.agreeing, same.passed) == (100, 100, True)
    one_off = compare_decisions(reference, [result(tags, ["t1"]), result(tags, [])])  # 99 of 100: at the gate
    assert one_off.share == 0.99 and one_off.passed
    two_off = compare_decisions(reference, [result(tags, ["t1", "t3"]), result(tags, [])])
    assert two_off.share == 0.98 and not two_off.passed
    assert not compare_decisions([], []).passed  # nothing compared proves nothing
