"""Reading images safely and turning them into model input.

Every failure is an `ImageError` whose message names the file and the problem, so a caller can
record it for that item and carry on with the rest of a batch.
"""

from __future__ import annotations

import io
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ttd.errors import InputError, TTDError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "nearest": Image.Resampling.NEAREST}


class ImageError(TTDError, ValueError):
    """An image could not be used; the message says which and why."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: scale to 8 bits instead of clipping to white
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low if high > low else 1.0) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, RGB


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file read: an uncompressed 4-channel image of `max_pixels` pixels plus
    1 MiB of headers and metadata. Anything larger cannot be a usable image."""
    return max_pixels * 4 + (1 << 20)


def read_image_file(path: Path, label: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. FIFOs, devices (/dev/zero) and
    sockets are refused before opening them: reading one would hang or exhaust memory."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except OSError as error:
        raise ImageError(f"{label}: cannot read ({error.strerror})") from error
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{label}: is a directory, not an image")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{label}: not a regular file (a FIFO, device or socket); only image files are read")
    if info.st_size > limit:
        raise ImageError(f"{label}: {info.st_size:,} bytes exceeds the limit of {limit:,} for an image file")
    try:
        with path.open("rb") as f:
            # the stat size + 1 (asking for limit + 1 would allocate that much for every image);
            # reading on past it catches a file that grew after the check
            data = f.read(info.st_size + 1)
            if len(data) > info.st_size:
                data += f.read(limit + 1 - len(data))
    except OSError as error:
        raise ImageError(f"{label}: cannot read ({error.strerror})") from error
    if len(data) > limit:  # grew after the check
        raise ImageError(f"{label}: more than {limit:,} bytes, the limit for an image file")
    return data


ORIENTATION_TAG = 0x0112  # EXIF orientation: 5-8 turn the image by 90°
ORIGINAL_SIZE = "ttd_original_size"  # Image.info key: (width, height) as displayed, before draft decoding


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as its file displays it (decode_image may have decoded it smaller)."""
    return tuple(image.info.get(ORIGINAL_SIZE, image.size))


def decode_image(data: bytes | Path | str, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB image, applying EXIF orientation.

    `min_side`: the caller only needs the shorter side at this size, so a JPEG is decoded
    straight to a 1/2, 1/4 or 1/8 scale that keeps the shorter side ≥ 2 × min_side (libjpeg's
    DCT scaling, as Pillow's `thumbnail` does): a 4000-pixel photo for a 224-pixel model
    decodes ~10x faster, and the resize that follows still reduces by ≥ 2x."""
    label = name or (str(data) if not isinstance(data, bytes) else "<bytes>")
    if not isinstance(data, bytes):
        data = read_image_file(Path(data), label, max_file_bytes(max_pixels))
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        # no `with`: closing would void the image, and an upright RGB image is returned as decoded
        # (exif_transpose and convert would each copy it); the in-memory buffer needs no closing
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        _check_pixels(label, width, height, max_pixels)
        if min_side is not None and min(width, height) >= 4 * min_side:
            scale = 2 * min_side / min(width, height)
            image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        orientation = image.getexif().get(ORIENTATION_TAG)
        turned = ImageOps.exif_transpose(image) if orientation in range(2, 9) else image
        decoded = turned if turned.mode == "RGB" else _to_rgb(turned)
        # the displayed size before any DCT reduction: where masks of this image are laid
        swapped = orientation in (5, 6, 7, 8)
        decoded.info[ORIGINAL_SIZE] = (height, width) if swapped else (width, height)
        return decoded
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"{label}: decompression bomb refused ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise _undecodable(label, error) from error


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{label}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
                         "(possible decompression bomb; raise --max-pixels if the image is genuine)")


def _undecodable(label: str, error: Exception) -> ImageError:
    reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "it", str(error))  # Pillow names its buffer
    return ImageError(f"{label}: cannot decode image ({type(error).__name__}: {reason})")


def header_size(data: bytes, label: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The upright (width, height) of encoded image bytes from their header alone (EXIF orientation
    5-8 swaps them), refused as `decode_image` refuses it when over `max_pixels` or unreadable:
    what a batch decoded elsewhere (on the device, ttd/runtime/device_decode.py) is checked by."""
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            _check_pixels(label, width, height, max_pixels)
            orientation = image.getexif().get(ORIENTATION_TAG)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise _undecodable(label, error) from error
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def resize_center_crop(image: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """open_clip's eval transform without torch: shorter side to `size`, centre crop; uint8 [size, size, 3]."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), RESAMPLING[interpolation])
    if (new_w, new_h) != (size, size):  # a square image is already its own crop: no copy
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class Preprocess:
    """The one preprocessing of every caller (`ttd tag`, the served tagger, training sources,
    evaluation, export gates): decode safely → shorter side to `size` → centre crop → uint8
    [size, size, 3]. A Tagger builds it from its model config (`Tagger.preprocess`), so the
    interpolation is always the model's own; it is picklable, so decoding workers get it whole."""

    size: int
    interpolation: str = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLING:
            raise InputError(f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(RESAMPLING)}")

    @classmethod
    def for_model(cls, config) -> Preprocess:
        """The preprocessing of a ModelConfig (its image size and interpolation)."""
        return cls(config.image_size, config.interpolation)

    def __call__(self, source: bytes | Path | str | Image.Image | np.ndarray, name: str | None = None) -> np.ndarray:
        """A file path, encoded bytes, a PIL image or an RGB uint8 array -> uint8 [size, size, 3]."""
        return self.with_size(source, name)[0]

    def with_size(self, source: bytes | Path | str | Image.Image | np.ndarray,
                  name: str | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """(uint8 [size, size, 3], the source's own (width, height)): masks go back onto the latter."""
        if isinstance(source, np.ndarray):
            source = Image.fromarray(source)
        image = source if isinstance(source, Image.Image) else decode_image(source, name, self.max_pixels, self.size)
        if 0 in image.size:
            raise ImageError(f"{name or 'image'}: {image.width}×{image.height} pixels: nothing to tag")
        return resize_center_crop(image, self.size, self.interpolation), original_size(image)


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W], normalised: the `pixel_values` of every graph."""
    # channels-first uint8 copy first, then in-place arithmetic on contiguous memory (~10x faster
    # than the same formula on the transposed float view; the values are identical)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(mean, np.float32)[None, :, None, None]
    x /= np.asarray(std, np.float32)[None, :, None, None]
    return x
