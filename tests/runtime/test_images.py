import io

import numpy as np
import pytest
from PIL import Image

from ttd.runtime.images import ImageError, Preprocess, decode_image, normalize, resize_center_crop


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
    """A PNG whose header claims 9000 x 9000 pixels but carries almost no data: only a check made on
    the header, before any decoding, can name the size (decoding would fail as truncated)."""
    import struct
    import zlib

    def forged(width: int, height: int) -> bytes:
        small = png_bytes(Image.new("L", (4, 4)))
        at = small.index(b"IHDR")
        header = bytearray(small[at : at + 17])
        header[4:12] = struct.pack(">II", width, height)
        return small[:at] + bytes(header) + struct.pack(">I", zlib.crc32(bytes(header))) + small[at + 21 :]

    assert len(forged(9_000, 9_000)) < 200
    with pytest.raises(ImageError, match="9000x9000 = 81,000,000 pixels exceeds the limit of 1,000,000"):
        decode_image(forged(9_000, 9_000), "bomb.png", max_pixels=1_000_000)
    # beyond twice PIL's own limit, PIL refuses at open: still before decoding, still an ImageError
    with pytest.raises(ImageError, match="bomb.png: decompression bomb refused"):
        decode_image(forged(30_000, 30_000), "bomb.png")


def test_resize_center_crop_takes_the_centre_and_keeps_channels():
    # a horizontal ramp (red = column) with constant green and blue: a corner crop, a transposed
    # array or swapped channels all give other numbers
    width, height = 200, 100
    ramp = np.tile(np.arange(width, dtype=np.uint8)[None, :], (height, 1))
    rgb = np.stack([ramp, np.full_like(ramp, 100), np.full_like(ramp, 200)], axis=-1)
    crop = resize_center_crop(Image.fromarray(rgb), 50, "bilinear")
    assert crop.shape == (50, 50, 3) and crop.dtype == np.uint8
    # resized to 100 x 50 (every column ~2 source columns), the centre crop keeps columns 25..74 -> ~50..149
    assert abs(int(crop[:, 0, 0].mean()) - 51) <= 2 and abs(int(crop[:, -1, 0].mean()) - 149) <= 2
    assert (crop[:, :, 1] == 100).all() and (crop[:, :, 2] == 200).all()
    assert (np.diff(crop[25, :, 0].astype(int)) > 0).all()  # still a left-to-right ramp: not transposed


def test_normalize_applies_each_channels_mean_and_std():
    pixels = np.zeros((2, 2, 3, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 51, 102, 204  # 0.2, 0.4, 0.8
    pixels[1] = 255
    x = normalize(pixels, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    assert x.shape == (2, 3, 2, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.8 - 0.3) / 0.125], rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 1, 2], [(1 - 0.1) / 0.5, (1 - 0.2) / 0.25, (1 - 0.3) / 0.125], rtol=1e-6)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_twice_the_side_needed():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (960, 1280, 3), dtype=np.uint8))
    photo = photo.resize((160, 120)).resize((1280, 960))  # smooth content, like a photo
    jpeg = png_bytes(photo, "JPEG")
    assert decode_image(jpeg).size == (1280, 960)
    assert decode_image(jpeg, min_side=112).size == (320, 240)  # 1/4: shorter side 240 >= 2 x 112
    assert decode_image(jpeg, min_side=60).size == (160, 120)  # 1/8: 120 >= 2 x 60
    assert decode_image(jpeg, min_side=64).size == (320, 240)  # 1/8 would leave 120 < 2 x 64
    assert decode_image(png_bytes(photo), min_side=64).size == (1280, 960)  # PNG has no reduced decoding
    # what the model sees is the full decode's picture: within a few grey levels
    full = Preprocess(64, "bicubic")(decode_image(jpeg))
    reduced = Preprocess(64, "bicubic")(jpeg)
    assert np.abs(full.astype(int) - reduced.astype(int)).mean() < 2.0


@pytest.mark.parametrize("orientation", [None, 1, 3, 6, 8])
def test_exif_orientation_is_applied_and_the_displayed_size_recorded(tmp_path, orientation):
    """An upright photo comes back as stored; a turned one (EXIF 2-8) as displayed, with the size
    masks are laid on swapped for 5-8."""
    from ttd.runtime.images import original_size

    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :20] = 255  # a white block in the top-left corner as stored
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    decoded = decode_image(path)
    expected = np.asarray({None: lambda im: im, 1: lambda im: im,
                           3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
                           6: lambda im: im.transpose(Image.Transpose.ROTATE_270),
                           8: lambda im: im.transpose(Image.Transpose.ROTATE_90)}[orientation](Image.open(path).convert("RGB")))
    assert decoded.mode == "RGB" and decoded.size == (expected.shape[1], expected.shape[0])
    assert np.array_equal(np.asarray(decoded), expected)
    assert original_size(decoded) == ((40, 60) if orientation in (6, 8) else (60, 40))
    assert np.asarray(decoded).mean() > 0  # the returned image holds its pixels (nothing closed behind it)


def test_an_image_file_is_read_whole_and_one_over_the_limit_refused(tmp_path):
    from ttd.runtime.images import read_image_file

    path = tmp_path / "a.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert read_image_file(path, "a.bin", 1024) == bytes(range(256)) * 4
    with pytest.raises(ImageError, match=r"a.bin: 1,024 bytes exceeds the limit of 1,023"):
        read_image_file(path, "a.bin", 1023)
