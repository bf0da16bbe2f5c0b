"""JPEG decoding on the device, behind an agreement gate (docs/gpu.md, "GPU decoding").

PIL decoding on the host is the exact reference and stays the default. A data-centre GPU eats
images faster than a host's cores can decode and resize them, so JPEGs can instead be decoded by
nvJPEG (`torchvision.io.decode_jpeg(device="cuda")`), then turned upright by their EXIF
orientation, resized (shorter side to the model's size, antialiased, the model's interpolation)
and centre-cropped with torch ops on the device, landing as the uint8 [B, S, S, 3] batch the
pipelined job uploads anyway. The result is close to PIL's, not equal (another resampler, no
DCT-domain reduction), so it is used only where `agreement` with the PIL path on the job's own
kind of images reaches GATE of the tag decisions.

The same ops run on CPU tensors (`torchvision.io.decode_jpeg` on the CPU, device "cpu"), which is
how everything but the device call itself is tested on a machine without a GPU. torch and
torchvision are imported inside the functions: the runtime imports no torch until it is used.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from ttd.errors import InputError
from ttd.runtime.images import ORIENTATION_TAG

GATE = 0.99  # share of tag decisions (selected or not) the device path must share with PIL's


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side `size`: the rounding of ttd.runtime.images.resize_center_crop."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8; 1 upright) of encoded image bytes, read from the header only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError):
        return 1
    return value if value in range(1, 9) else 1


def upright(image, orientation: int):
    """A [C, H, W] tensor turned as PIL's ImageOps.exif_transpose turns the image (EXIF 2-8)."""
    import torch

    if orientation == 2:  # mirrored
        return image.flip(-1)
    if orientation == 3:  # rotated 180
        return image.flip(-1).flip(-2)
    if orientation == 4:  # mirrored vertically
        return image.flip(-2)
    if orientation == 5:  # transposed (PIL TRANSPOSE)
        return image.transpose(-1, -2)
    if orientation == 6:  # PIL ROTATE_270: a quarter turn clockwise
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:  # PIL TRANSVERSE
        return torch.rot90(image, 2, dims=(-2, -1)).transpose(-1, -2)
    if orientation == 8:  # PIL ROTATE_90: a quarter turn anticlockwise
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def resize_center_crop(image, size: int, interpolation: str = "bicubic"):
    """uint8 [3, H, W] -> uint8 [size, size, 3]: shorter side to `size` with the rounding of
    ttd.runtime.images.resize_center_crop, antialiased (as PIL's resampling filters widen when
    they shrink), then the centre crop."""
    import torch
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    new_w, new_h = resized_shape(width, height, size)
    if (new_w, new_h) != (width, height):
        mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(interpolation)
        if mode is None:
            raise InputError(f"device decoding resizes with bicubic or bilinear, not {interpolation!r}")
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=mode, antialias=True,
                                align_corners=False)[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image[:, top : top + size, left : left + size].permute(1, 2, 0)


def decode_batch(datas: list[bytes], size: int, interpolation: str = "bicubic", device: str = "cuda"):
    """(uint8 [B, size, size, 3] on `device`, each image's upright (width, height), indices that
    need the PIL path): JPEG bytes decoded with torchvision.io.decode_jpeg on `device` (nvJPEG on
    a GPU), upright, resized and cropped there. Anything that is not a JPEG nvJPEG decodes (PNG,
    CMYK, a broken file) is left to the PIL path, by index; its row of the batch is zeros."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    batch = torch.zeros((len(datas), size, size, 3), dtype=torch.uint8, device=device)
    sizes: list[tuple[int, int] | None] = [None] * len(datas)
    jpegs = [n for n, data in enumerate(datas) if data[:3] == b"\xff\xd8\xff"]
    left_over = sorted(set(range(len(datas))) - set(jpegs))
    if not jpegs:
        return batch, sizes, left_over
    encoded = [torch.frombuffer(bytearray(datas[n]), dtype=torch.uint8) for n in jpegs]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one file nvJPEG refuses fails the batched call: one at a time
        decoded = []
        for tensor in encoded:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for n, image in zip(jpegs, decoded):
        if image is None:
            left_over.append(n)
            continue
        image = upright(image, exif_orientation(datas[n][:65536]))
        sizes[n] = (int(image.shape[-1]), int(image.shape[-2]))
        batch[n] = resize_center_crop(image, size, interpolation)
    return batch, sizes, sorted(left_over)


@dataclass(frozen=True)
class Agreement:
    """How the device path's tag decisions compare with the PIL path's on the same images."""

    decisions: int
    agreeing: int
    images: int

    @property
    def share(self) -> float:
        return self.agreeing / self.decisions if self.decisions else 1.0

    @property
    def passed(self) -> bool:
        return self.decisions > 0 and self.share >= GATE


def compare_decisions(reference: list, candidate: list) -> Agreement:
    """Agreement of two lists of TagResults (same images, same tags): a decision is one tag of one
    image, selected or not; it agrees when both paths decide it alike."""
    decisions = agreeing = 0
    for a, b in zip(reference, candidate, strict=True):
        chosen_a, chosen_b = set(a.selected), set(b.selected)
        for tag in a.tags:
            decisions += 1
            agreeing += (tag in chosen_a) == (tag in chosen_b)
    return Agreement(decisions, agreeing, len(reference))


def agreement(tagger, datas: list[bytes], tag_lists: list[list[str]], device: str = "cuda",
              batch_size: int = 64) -> Agreement:
    """The gate's measure: tag `datas` (encoded images) with `tag_lists` after PIL decoding (the
    Tagger's own preprocessing) and after device decoding, and compare every tag decision."""
    reference, candidate = [], []
    preprocess = tagger.preprocess
    for start in range(0, len(datas), batch_size):
        chunk, tags = datas[start : start + batch_size], tag_lists[start : start + batch_size]
        pil = np.stack([preprocess(data) for data in chunk])
        on_device, _, left_over = decode_batch(chunk, preprocess.size, preprocess.interpolation, device)
        images = on_device.cpu().numpy()
        images[left_over] = pil[left_over]  # what the device path hands to PIL is PIL's, exactly
        reference += tagger.tag(pil, tags)
        candidate += tagger.tag(images, tags)
    return compare_decisions(reference, candidate)
