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
