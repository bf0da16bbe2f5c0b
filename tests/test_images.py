import io

import numpy as np
import pytest
from PIL import Image

from ttd.images import ImageError, decode_image, normalize, resize_center_crop


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_modes_are_converted_to_rgb():
    grey = decode_image(png_bytes(Image.new("L", (4, 4), 128)))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)
    rgba = decode_image(png_bytes(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    cmyk = decode_image(png_bytes(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 200
    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert decode_image(png_bytes(sixteen)).getpixel((0, 0)) == (128, 128, 128)


def test_bad_files_raise_image_errors_naming_the_file(tmp_path):
    with pytest.raises(ImageError, match="missing.png: file not found"):
        decode_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: empty file"):
        decode_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match="notes.jpg: cannot decode image"):
        decode_image(text)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(Image.effect_noise((64, 64), 50))[:300])
    with pytest.raises(ImageError, match="truncated.png: cannot decode image"):
        decode_image(truncated)


def test_decompression_bomb_is_refused_before_decoding():
    huge = png_bytes(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageError, match="9,000,000 pixels exceeds the limit of 1,000,000"):
        decode_image(huge, "bomb.png", max_pixels=1_000_000)


def test_resize_center_crop_and_normalize():
    image = Image.fromarray(np.arange(200 * 100 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8))
    crop = resize_center_crop(image, 50)
    assert crop.shape == (50, 50, 3) and crop.dtype == np.uint8
    x = normalize(np.full((1, 2, 2, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (1, 3, 2, 2) and np.allclose(x, 2.0)
