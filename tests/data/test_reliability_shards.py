"""Webdataset captions are read as strictly as JSONL ones, and an undecodable sample is named by
its shard and key, never by Python's repr of a buffer (docs/reliability.md)."""

import io
import tarfile

import pytest
from PIL import Image

from ttd.data.items import stream_shards
from ttd.data.sources import ShardSource
from ttd.data.world import make_sample
from ttd.runtime.images import ImageError, Preprocess, decode_image


def test_a_non_utf8_caption_and_an_undecodable_image_are_named(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(make_sample(3, 0).image).save(buffer, "PNG")
    samples = {"0000": (buffer.getvalue(), b"a red square"), "0001": (buffer.getvalue(), b"a r\xe9d square"),
               "0002": (b"not an image", b"a red square")}
    with tarfile.open(tmp_path / "000.tar", "w") as tar:
        for key, (image, caption) in samples.items():
            for ext, data in (("png", image), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    items = list(stream_shards(str(tmp_path / "000.tar")))
    # before: "a r\ufffdd square", tagged as if U+FFFD were a word (a JSONL file refuses the same bytes)
    assert items[0].error is None and items[0].caption == "a red square"
    assert items[1].error == f"{tmp_path / '000.tar'}#0001: caption is not valid UTF-8 (byte 3)"
    source = ShardSource(str(tmp_path / "000.tar"), Preprocess(64))
    with pytest.raises(ImageError, match=r"^sample 0001: caption is not valid UTF-8 \(byte 3\)$"):
        source.get(1)
    with pytest.raises(ImageError) as error:
        source.get(2)
    assert str(error.value).startswith("sample 0002: cannot decode image") and "BytesIO" not in str(error.value)
    with pytest.raises(ImageError) as error:
        decode_image(b"garbage", "000.tar#0002")
    assert "BytesIO" not in str(error.value) and "cannot identify image file it" in str(error.value)


def test_a_captions_folder_is_named_as_a_folder(tmp_path):
    from ttd.data.inputs import InputError
    from ttd.data.items import read_captions
    from ttd.data.items import stream_captions

    (tmp_path / "captions").mkdir()
    for read in (read_captions, lambda p: list(stream_captions(p))):
        with pytest.raises(InputError, match=r"captions file .*captions is a folder: give the file itself"):
            read(tmp_path / "captions")  # was: "does not exist"
        with pytest.raises(InputError, match=r"captions file .*nope.jsonl does not exist$"):
            read(tmp_path / "nope.jsonl")


def _noise_shards(folder, samples_per_shard=15, shards=2, side=240):
    """Shards of incompressible PNGs (random noise, ~170 kB each); returns (pattern, the images' bytes)."""
    import numpy as np

    rng = np.random.default_rng(0)
    encoded = []
    for s in range(shards):
        with tarfile.open(folder / f"{s:03d}.tar", "w") as tar:
            for k in range(samples_per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
                encoded.append(buffer.getvalue())
                caption = make_sample(5, len(encoded)).caption.encode()
                for ext, data in (("png", encoded[-1]), ("txt", caption)):
                    info = tarfile.TarInfo(f"{s}{k:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{000..{shards - 1:03d}}}.tar"), encoded


def test_pairs_read_from_shards_hold_one_image_at_a_time(tmp_path):
    """A calibration over shards held up to --max-pairs images' bytes (read_pairs kept every
    sample's bytes): the images are read again from the shards as the fit takes them."""
    import hashlib
    import tracemalloc

    from ttd.data.items import read_pairs
    from ttd.errors import InputError

    pattern, encoded = _noise_shards(tmp_path)
    total = sum(map(len, encoded))
    assert total > 4_000_000
    import webdataset  # noqa: F401 - imported before tracing: its modules are not what is measured

    tracemalloc.start()
    try:
        images, texts = read_pairs(pattern, 1000, skipped := [])
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        digests = [hashlib.sha256(data).hexdigest() for data in images]  # as a fit takes them: one by one
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(texts) == len(images) == len(encoded) and skipped == []
    assert digests == [hashlib.sha256(data).hexdigest() for data in encoded]  # every image, in order
    assert held < total / 20, (held, total)  # before: every image's bytes (4.9 MB of 5.1)
    assert peak < total / 5, (peak, total)  # a sample or a few at a time, never the set
    # --max-pairs: only the first pairs, and the second read stops there
    images, texts = read_pairs(pattern, 4, [])
    assert len(images) == 4 and [hashlib.sha256(d).hexdigest() for d in images] == digests[:4]
    # shards changed between the two reads: refused, never another image beside a caption
    images, texts = read_pairs(pattern, 1000, [])
    (tmp_path / "001.tar").unlink()
    with pytest.raises(InputError, match=r"changed while they were read"):
        list(images)
