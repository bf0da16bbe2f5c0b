"""Whole-image inference (docs/architecture.md §3.5): tag-head maps in the original image's geometry.

A model sees S×S pixels. Two ways to cover an image of any size:

- `crop="center"` (fast; what `ttd tag` feeds the model): one window, the centre crop of the
  image resized to shorter side S. Pixels outside the crop are unscored (mask logit −30).
- `crop="whole"`: for each scale the image is resized to shorter side scale·S and S×S windows
  slide over it with `stride` (the last window of a row or column flush with the edge, so every
  pixel is covered); smaller than S, the image is padded with the mean colour.

Every window runs through the runtime Tagger (its backend's image encoder and tag head, its flip
TTA): the tag head's masks are the one primitive, so every backend segments the same way. Each
window's mask logits w·cos + b are upsampled bilinearly to its pixels, overlapping windows are
averaged, scales are averaged on the finest scale's canvas, and `ScoreMaps` resizes the canvas
back to the image's own width and height on demand (one class at a time, so a large image never
holds K full-size float maps).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ttd.errors import InputError
from ttd.model.contract import score_row
from ttd.model.scoring import combine_windows
from ttd.runtime.images import RESAMPLING
from ttd.runtime.tagger import Tagger

UNSCORED_LOGIT = -30.0  # sigmoid ≈ 1e-13: a pixel no window saw is in no mask
CROPS = ("whole", "center")
MAX_WINDOWS = 4096  # per image and scale: beyond this a typo in --scales or --stride, not a request


@dataclass(frozen=True)
class ScalePlan:
    """One scale of an image: its resized size and the top-left corners of its S×S windows."""

    scale: float
    width: int
    height: int
    windows: tuple[tuple[int, int], ...]  # (left, top) in the resized image


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride` pixels, the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side `short_side` — the rounding of ttd.runtime.images.resize_center_crop."""
    ratio = short_side / min(width, height)
    return max(short_side, round(width * ratio)), max(short_side, round(height * ratio))


def center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the original image of the centre crop a model of input `size`
    sees (ttd.runtime.images.resize_center_crop)."""
    new_w, new_h = resized_size(width, height, size)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def check_crop(crop: str) -> None:
    if crop not in CROPS:
        raise InputError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")


def plan_scale(width: int, height: int, size: int, scale: float, stride: int, crop: str = "whole") -> ScalePlan:
    """The windows of one scale of a width×height image for a model of input size `size`."""
    check_crop(crop)
    if not (scale > 0 and np.isfinite(scale)):
        raise InputError(f"scale {scale!r} must be a finite number > 0")
    if stride < 1:
        raise InputError(f"stride {stride} must be at least 1 pixel")
    new_w, new_h = resized_size(width, height, max(1, round(size * scale)))
    if crop == "center":
        return ScalePlan(scale, new_w, new_h, (((new_w - size) // 2 if new_w > size else 0,
                                                (new_h - size) // 2 if new_h > size else 0),))
    xs, ys = window_starts(new_w, size, stride), window_starts(new_h, size, stride)
    if len(xs) * len(ys) > MAX_WINDOWS:
        raise InputError(f"{width}x{height} at scale {scale} needs {len(xs) * len(ys)} windows of {size} px at "
                         f"stride {stride}, more than {MAX_WINDOWS}; use a larger stride or smaller scale")
    return ScalePlan(scale, new_w, new_h, tuple((x, y) for y in ys for x in xs))


def crop_windows(resized: np.ndarray, plan: ScalePlan, size: int, fill: tuple[int, int, int],
                 out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [N, S, S, 3] windows of a resized image (padded with `fill` where it is smaller than S),
    written into `out` when given (a slice of the batch's window array: no copy afterwards)."""
    windows = np.empty((len(plan.windows), size, size, 3), np.uint8) if out is None else out
    for n, (left, top) in enumerate(plan.windows):
        part = resized[top : top + size, left : left + size]
        if part.shape[:2] != (size, size):
            windows[n] = np.asarray(fill, np.uint8)
        windows[n, : part.shape[0], : part.shape[1]] = part
    return windows


@dataclass
class WindowFeatures:
    """An image encoded window by window: what every tag set of that image is scored against."""

    width: int  # the original image's
    height: int
    plans: list[ScalePlan]
    patch_views: list[np.ndarray]  # per scale: [N, V, D, h, w] (V = 2 under flip TTA, mirrored back)
    canvas_image: np.ndarray  # uint8 [Hc, Wc, 3]: the image on the finest scale's canvas (for PAMR)
    crop: str


def default_stride(size: int) -> int:
    """Two thirds of the window: every pixel away from the edges is seen by at least two windows."""
    return max(1, (2 * size) // 3)


@dataclass(frozen=True)
class Windowing:
    """How images are cut into a model's windows (picklable: decoding workers cut them as they
    decode, so the thread that feeds the model only stacks them)."""

    size: int  # the model's input size S
    interpolation: str  # ttd.runtime.images.RESAMPLING key
    fill: tuple[int, int, int]  # padding colour: the normalisation mean
    crop: str = "whole"
    scales: tuple[float, ...] = (1.0,)
    stride: int | None = None  # None: default_stride(size)

    @classmethod
    def of(cls, tagger: Tagger, crop: str = "whole", scales: tuple[float, ...] = (1.0,),
           stride: int | None = None) -> Windowing:
        """The windowing of `tagger`'s model, checked (an unknown crop or no scale is refused here)."""
        config = tagger.config
        if not scales:
            raise InputError("give at least one scale")
        check_crop(crop)
        if crop == "center" and len(scales) > 1:
            raise InputError("--crop center sees one window; multi-scale needs --crop whole")
        return cls(config.image_size, config.interpolation, tuple(int(round(255 * m)) for m in config.mean), crop,
                   tuple(scales), stride)

    def plans(self, width: int, height: int) -> list[ScalePlan]:
        stride = default_stride(self.size) if self.stride is None else self.stride
        return [plan_scale(width, height, self.size, scale, stride, self.crop) for scale in self.scales]

    def cut(self, image: Image.Image) -> WindowedImage:
        """The image's windows, every scale's in order (InputError for an image that would need too many)."""
        width, height = image.size
        plans = self.plans(width, height)
        windows = np.empty((sum(len(plan.windows) for plan in plans), self.size, self.size, 3), np.uint8)
        canvas, filled = None, 0
        for plan in plans:
            resized = image if (plan.width, plan.height) == (width, height) else \
                image.resize((plan.width, plan.height), RESAMPLING[self.interpolation])
            pixels = np.asarray(resized, dtype=np.uint8)
            if canvas is None or plan.width * plan.height > canvas.shape[0] * canvas.shape[1]:
                canvas = pixels
            crop_windows(pixels, plan, self.size, self.fill, windows[filled : filled + len(plan.windows)])
            filled += len(plan.windows)
        return WindowedImage(width, height, plans, windows, canvas, self.crop)


@dataclass
class WindowedImage:
    """An image cut into the encoder's windows (uint8 [N, S, S, 3], scale by scale), with what its
    maps need afterwards."""

    width: int
    height: int
    plans: list[ScalePlan]
    windows: np.ndarray
    canvas_image: np.ndarray  # uint8 [Hc, Wc, 3]: the image on the finest scale's canvas
    crop: str


def encode_windows(tagger: Tagger, image: Image.Image, crop: str = "whole", scales: tuple[float, ...] = (1.0,),
                   stride: int | None = None, batch_size: int = 16) -> WindowFeatures:
    """Encode an RGB image window by window with the Tagger's backend (and its flip TTA)."""
    return encode_windows_of(tagger, [image], crop, scales, stride, batch_size)[0]


def encode_windows_of(tagger: Tagger, images: list[Image.Image], crop: str = "whole",
                      scales: tuple[float, ...] = (1.0,), stride: int | None = None,
                      batch_size: int = 16) -> list[WindowFeatures]:
    """Encode the windows of several images together: `batch_size` windows per encoder call,
    whichever images they come from (a batch job's small images share calls)."""
    windowing = Windowing.of(tagger, crop, scales, stride)
    return encode_windowed(tagger, [windowing.cut(image) for image in images], batch_size)


def encode_windowed(tagger: Tagger, images: list[WindowedImage], batch_size: int) -> list[WindowFeatures]:
    """`encode_windows_of` of images already cut (Windowing.cut): their windows stacked once (an
    image that is one window is copied once, as `ttd tag` copies its centre crop) and encoded
    `batch_size` at a time."""
    stacked = images[0].windows if len(images) == 1 else np.concatenate([image.windows for image in images])
    parts = [tagger.encode_images(stacked[i : i + batch_size])[1] for i in range(0, len(stacked), batch_size)]
    views = parts[0] if len(parts) == 1 else np.concatenate(parts)
    features, start = [], 0
    for image in images:
        per_scale = []
        for plan in image.plans:
            per_scale.append(views[start : start + len(plan.windows)])
            start += len(plan.windows)
        features.append(WindowFeatures(image.width, image.height, image.plans, per_scale, image.canvas_image,
                                       image.crop))
    return features


@functools.lru_cache(maxsize=256)
def _axis_weights(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling along one axis, half-pixel centres (align_corners=False, no antialiasing).
    The source position scale·(i + ½) − ½ is rounded to float32 once, as the fused multiply-add of
    torch's `F.interpolate` kernel does, so the runtime without torch (docs/edge.md) writes the
    same masks (a position rounded twice moves λ by ~1e-5 on large upsamplings). Returns (i0, i1, λ0, λ1)."""
    scale = np.float64(np.float32(source) / np.float32(target))
    centres = (np.arange(target, dtype=np.float32) + np.float32(0.5)).astype(np.float64)
    position = np.maximum((scale * centres - 0.5).astype(np.float32), np.float32(0))
    low = position.astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    frac = (position - low).astype(np.float32)
    weights = low, high, (np.float32(1) - frac).astype(np.float32), frac
    for array in weights:  # shared by every call with these sizes (cached): never written
        array.flags.writeable = False
    return weights


def bilinear_resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 maps [C, H, W] resized to [C, height, width] bilinearly (half-pixel centres)."""
    maps = np.asarray(maps, np.float32)
    if maps.shape[-2:] == (height, width):
        return maps
    w0, w1, wl0, wl1 = _axis_weights(maps.shape[-1], width)
    rows = maps[..., w0] * wl0 + maps[..., w1] * wl1  # [C, H, width]
    h0, h1, hl0, hl1 = _axis_weights(maps.shape[-2], height)
    return rows[..., h0, :] * hl0[:, None] + rows[..., h1, :] * hl1[:, None]


def _stitch(plan: ScalePlan, logits: np.ndarray, size: int) -> np.ndarray:
    """Window logits [N, K, h, w] -> canvas logits [K, H', W'] of the scale (overlaps averaged)."""
    if len(plan.windows) == 1 and plan.windows[0] == (0, 0) and (plan.width, plan.height) == (size, size):
        return _resize_maps(logits[0], size, size)  # one window that is the canvas: its upsampled maps
    k = logits.shape[1]
    total = np.zeros((k, plan.height, plan.width), np.float32)
    count = np.zeros((plan.height, plan.width), np.float32)
    for n, (left, top) in enumerate(plan.windows):
        up = bilinear_resize(logits[n], size, size)
        h, w = min(size, plan.height - top), min(size, plan.width - left)
        total[:, top : top + h, left : left + w] += up[:, :h, :w]
        count[top : top + h, left : left + w] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.float32(UNSCORED_LOGIT)).astype(np.float32)


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    return bilinear_resize(maps, height, width)


@dataclass
class WindowMaps:
    """The tag head's cosine maps of an image's windows, per scale [N, K, h, w], with what turns
    them into canvas logits: kept low-resolution until a tag's map is asked for (docs/architecture.md:
    masks at the image's size are built only when asked for)."""

    plans: list[ScalePlan]
    cosines: list[np.ndarray]
    weight: float
    bias: float
    size: int
    canvas: tuple[int, int]  # (height, width) of the finest scale's canvas

    def canvas_logits(self, tags: slice | list[int]) -> np.ndarray:
        """w·cos + b of the chosen tags [K', Hc, Wc] on the canvas: windows stitched, scales averaged."""
        height, width = self.canvas
        total = None
        for plan, cosines in zip(self.plans, self.cosines):
            logits = (self.weight * cosines[:, tags] + self.bias).astype(np.float32)
            part = _resize_maps(_stitch(plan, logits, self.size), height, width)
            total = part if total is None else total + part
        return total / len(self.plans) if len(self.plans) > 1 else total


class ScoreMaps:
    """Mask logits of K tags over a whole image, at canvas resolution, with their image-level
    scores; every accessor answers in the original image's geometry (height × width). The canvas
    logits of a tag are made when first asked for (`windows`), or given whole (`logits`)."""

    def __init__(self, tags: list[str], scores: np.ndarray, logits: np.ndarray | None, width: int, height: int,
                 windows: WindowMaps | None = None) -> None:
        self.tags, self.scores, self.width, self.height = tags, scores, width, height
        self._logits, self._windows = logits, windows  # scores [K]: the Tagger's score, best over windows and scales

    @property
    def logits(self) -> np.ndarray:
        """[K, Hc, Wc] w·cos + b on the canvas, every tag."""
        if self._logits is None:
            self._logits = self._windows.canvas_logits(slice(None))
        return self._logits

    def _canvas(self, tags: list[int]) -> np.ndarray:
        return self._logits[tags] if self._logits is not None else self._windows.canvas_logits(tags)

    def mask_logits(self, k: int) -> np.ndarray:
        """float32 [H, W]: tag k's mask logit at every pixel of the original image."""
        return self.masks_logits([k])[0]

    def masks_logits(self, tags: list[int]) -> np.ndarray:
        """float32 [K', H, W]: `mask_logits` of several tags at once (the same values: every step is per pixel)."""
        return _resize_maps(self._canvas(list(tags)), self.height, self.width)

    def probabilities(self, k: int) -> np.ndarray:
        """float32 [H, W]: M_k = sigmoid(w·cos + b) at every pixel of the original image."""
        return 1.0 / (1.0 + np.exp(-self.mask_logits(k)))

    def binary_mask(self, k: int, threshold: float = 0.5) -> np.ndarray:
        """bool [H, W]: M_k ≥ θ."""
        return self.binary_masks([k], threshold)[0]

    def binary_masks(self, tags: list[int], threshold: float = 0.5) -> np.ndarray:
        """bool [K', H, W]: M_k ≥ θ of several tags, their maps made together."""
        if not tags:
            return np.zeros((0, self.height, self.width), np.bool_)
        return self.masks_logits(tags) >= _logit(threshold)

    def label_map(self, threshold: float = 0.5) -> np.ndarray:
        """uint16 [H, W]: 0 where every mask is below θ (the constant background channel), else
        1 + the index of the tag with the highest mask (docs/architecture.md §3.5)."""
        best = np.full((self.height, self.width), -np.inf, np.float32)
        labels = np.zeros((self.height, self.width), np.uint16)
        self.logits  # every class is needed: stitched together, once
        for k in range(len(self.tags)):
            logits = self.mask_logits(k)
            better = logits > best
            best[better] = logits[better]
            labels[better] = k + 1
        labels[best < _logit(threshold)] = 0
        return labels


def _logit(p: float) -> float:
    if not 0 < p < 1:
        raise InputError(f"mask threshold {p!r} must be strictly between 0 and 1")
    return float(np.log(p / (1 - p)))


def score_maps(tagger: Tagger, features: WindowFeatures, tags: list[str], tag_embeds: np.ndarray) -> ScoreMaps:
    """The tag head over every window of `features` for `tags` (embeddings [K, D]), as maps of the
    whole image. Scores: the Tagger's, combined over windows and scales by
    ttd.model.scoring.combine_windows (the best pixel of the image; minmax over its best cosines)."""
    return score_maps_of(tagger, [features], [list(tags)], [tag_embeds])[0]


def score_maps_of(tagger: Tagger, features: list[WindowFeatures], tag_lists: list[list[str]],
                  tag_embeds: list[np.ndarray]) -> list[ScoreMaps]:
    """`score_maps` of several images at once: every window of every image and scale in one tag-head
    request (each window its own image's tags, padded, with the validity mask that makes padding
    exact; the Tagger splits it to the head's memory budget), instead of a call per image and scale."""
    from ttd.runtime.backend import HeadRequest

    size = tagger.config.image_size
    width = max(1, max((len(t) for t in tag_lists), default=1))
    views, rows, owners = [], [], []
    for n, feature in enumerate(features):
        for scale, part in enumerate(feature.patch_views):
            views.append(part)
            rows.append(tag_embeds[n])
            owners.extend([(n, scale)] * len(part))
    views_all = np.concatenate(views)
    embeds = np.zeros((len(views_all), width, tagger.config.embed_dim), np.float32)
    valid = np.zeros((len(views_all), width), np.bool_)
    start = 0
    for part, own in zip(views, rows):
        embeds[start : start + len(part), : len(own)] = own
        valid[start : start + len(part), : len(own)] = True
        start += len(part)
    negatives = tagger.negative_embeds
    request = HeadRequest(embeds, valid, negatives[None], np.array([[tagger.config.negative_margin]], np.float32), True)
    outputs = tagger.score_views(views_all, request)
    starts = np.cumsum([0] + [sum(len(part) for part in f.patch_views) for f in features])
    combined = _combined_scores(outputs.tag_scores, starts, valid)
    results = []
    for n, feature in enumerate(features):
        k, start, cosines = len(tag_lists[n]), starts[n], []
        for part in feature.patch_views:
            cosines.append(outputs.tag_cosines[start : start + len(part), :k])
            start += len(part)
        windows = WindowMaps(feature.plans, cosines, tagger.mask_weight, tagger.mask_bias, size,
                             feature.canvas_image.shape[:2])
        scores = score_row(combined[n][:, :k], tagger.score_method).astype(np.float32)
        results.append(ScoreMaps(list(tag_lists[n]), scores, None, feature.width, feature.height, windows))
    return results


def _combined_scores(tag_scores: np.ndarray, starts: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    """Each image's [len(SCORE_ROWS), K] out of the request's window scores (image n: windows
    starts[n]..starts[n+1]); the images with as many windows combined in one call (combine_windows
    over padded tags with their validity: the same numbers as image by image)."""
    counts = np.diff(starts)
    combined: list = [None] * len(counts)
    for count in np.unique(counts):
        images = np.flatnonzero(counts == count)
        windows = starts[images][:, None] + np.arange(count)  # [n, W] rows of the request
        together = combine_windows(tag_scores[windows], valid[starts[images]])
        for n, scores in zip(images, together):
            combined[n] = scores
    return combined


def refine_maps(maps: ScoreMaps, image: np.ndarray, iterations: int = 10) -> ScoreMaps:
    """The maps after PAMR (ttd/segment/pamr.py) on `image` (uint8 [Hc, Wc, 3], the canvas image)."""
    from ttd.segment.pamr import pamr

    probs = 1.0 / (1.0 + np.exp(-maps.logits.astype(np.float64)))
    refined = pamr(image, probs.astype(np.float32), iterations=iterations)
    refined = np.clip(refined.astype(np.float64), 1e-7, 1 - 1e-7)
    return ScoreMaps(maps.tags, maps.scores, np.log(refined / (1 - refined)).astype(np.float32), maps.width,
                     maps.height)
