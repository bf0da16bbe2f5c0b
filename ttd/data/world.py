"""The synthetic world (docs/architecture.md §3.6): seeded images of coloured, textured shapes on textured
backgrounds, with captions that name some of the objects among distractor words, and exact
ground truth: the relevant tags of each caption and a mask per tag and per caption.

Captions are biased towards the most salient object, as web captions are: the largest object
is always named, smaller ones less often, so a contrastively trained CLIP learns to match the
caption mostly through one tag — the single tag bias that TTD removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ttd.errors import InputError
from ttd.model.tags import candidate_tags
from ttd.model.world_config import (  # noqa: F401 - the world's words, re-exported
    IMAGE_SIZE, SHAPES, COLOURS, BACKGROUNDS, ABSENT_THINGS, FILLER_WORDS, FUNCTION_WORDS, TAG_TEMPLATES, vocabulary, world_model_config,
)

@dataclass
class WorldObject:
    shape: str
    colour: str
    mask: np.ndarray  # visible pixels (after occlusion), bool [H, W]


@dataclass
class WorldSample:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    background: str
    objects: list[WorldObject]
    tag_masks: dict[str, np.ndarray] = field(default_factory=dict)  # every visible tag -> bool mask

    @property
    def relevant_tags(self) -> list[str]:
        """Candidate tags of the caption that name something visible."""
        return [t for t in candidate_tags(self.caption) if t in self.tag_masks]

    def caption_mask(self) -> np.ndarray:
        mask = np.zeros(self.image.shape[:2], dtype=bool)
        for tag in self.relevant_tags:
            mask |= self.tag_masks[tag]
        return mask


def _shape_mask(shape: str, size: float, cx: float, cy: float, angle: float, n: int) -> np.ndarray:
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    x, y = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    x, y = c * x + s * y, -s * x + c * y
    r = size / 2
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= r * 0.85) & (np.abs(y) <= r * 0.85)
    if shape == "triangle":
        return (y <= r * 0.8) & (y >= -r + 1.8 * np.abs(x))
    if shape == "star":
        theta, rho = np.arctan2(y, x), np.hypot(x, y)
        return rho <= r * (0.55 + 0.45 * np.cos(5 * theta) ** 2 * (np.cos(5 * theta) > 0))
    if shape == "cross":
        return ((np.abs(x) <= r * 0.3) & (np.abs(y) <= r)) | ((np.abs(y) <= r * 0.3) & (np.abs(x) <= r))
    if shape == "ring":
        rho2 = x * x + y * y
        return (rho2 <= r * r) & (rho2 >= (0.55 * r) ** 2)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= r
    if shape == "heart":
        u, v = x / r * 1.2, -y / r * 1.2 + 0.25
        return (u * u + v * v - 1) ** 3 - u * u * v**3 <= 0
    raise InputError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    noise = rng.normal(0, 1, (n, n)).astype(np.float32)
    if name == "grass":
        pattern = 18 * np.sin(xs * 1.3 + rng.uniform(0, 6)) + 14 * noise
    elif name == "water":
        pattern = 20 * np.sin(ys * 0.5 + 2 * np.sin(xs * 0.2) + rng.uniform(0, 6)) + 5 * noise
    elif name == "stone":
        coarse = rng.normal(0, 1, (n // 8, n // 8)).astype(np.float32)
        pattern = 25 * np.kron(coarse, np.ones((8, 8), dtype=np.float32)) + 8 * noise
    else:
        pattern = 10 * noise
    return base[None, None, :] + pattern[:, :, None]


def _texture(rng: np.random.Generator, n: int) -> np.ndarray:
    """Brightness modulation of an object: plain, striped or dotted."""
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    kind = rng.integers(3)
    if kind == 1:
        angle = rng.uniform(0, np.pi)
        return 1.0 - 0.3 * (np.sin((np.cos(angle) * xs + np.sin(angle) * ys) * 1.2) > 0)
    if kind == 2:
        return 1.0 - 0.3 * ((np.sin(xs * 1.1) * np.sin(ys * 1.1)) > 0.5)
    return np.ones((n, n), dtype=np.float32)


def _caption(rng: np.random.Generator, sample_objects: list[WorldObject], background: str) -> str:
    """Name the most salient object always, others with a probability that grows with their area."""
    areas = np.array([o.mask.sum() for o in sample_objects], dtype=np.float32)
    order = np.argsort(-areas)
    named = [sample_objects[order[0]]]
    for i in order[1:]:
        if areas[i] > 0 and rng.random() < 0.15 + 0.45 * areas[i] / areas[order[0]]:
            named.append(sample_objects[i])
    rng.shuffle(named[1:])
    phrases = []
    for obj in named:
        colour = f"{obj.colour} " if rng.random() < 0.8 else ""
        adjective = f"{rng.choice(('small', 'big', 'bright', 'nice', 'beautiful'))} " if rng.random() < 0.3 else ""
        phrases.append(f"{adjective}{colour}{obj.shape}")
    style = rng.random()
    if style < 0.15:  # tag-list style, like alt-text keywords
        words = phrases + ([background] if rng.random() < 0.5 else [])
        words += [str(w) for w in rng.choice(ABSENT_THINGS + FILLER_WORDS, size=int(rng.integers(0, 3)), replace=False)]
        rng.shuffle(words)
        return ", ".join(words)
    det = "a" if rng.random() < 0.7 else "the"
    text = f"{det} {phrases[0]}"
    joiners = ("and a", "with a", "next to a", "near a", "beside a", "above a", "below a")
    for phrase in phrases[1:]:
        text += f" {rng.choice(joiners)} {phrase}"
    if rng.random() < 0.5:
        text += f" {rng.choice(('floating', 'resting', 'lying', 'shown', 'drawn'))}"
    if rng.random() < 0.5:
        text += f" on {background}"
    if rng.random() < 0.5:
        text += f" near a {rng.choice(ABSENT_THINGS)}"
    if rng.random() < 0.4:
        text = f"{rng.choice(('photo', 'picture', 'view', 'image', 'scene'))} of {text}"
    if rng.random() < 0.2:
        text += " today"
    return text


def make_sample(seed: int, index: int, size: int = IMAGE_SIZE) -> WorldSample:
    """Sample `index` of the world with `seed`: the same pair on every machine."""
    rng = np.random.default_rng([seed, index])
    background = str(rng.choice(list(BACKGROUNDS)))
    image = _background(rng, background, size)
    n_objects = int(rng.integers(1, 6))
    shapes = rng.choice(SHAPES, size=n_objects, replace=False)
    owner = np.full((size, size), -1, dtype=np.int32)
    colours = []
    for k, shape in enumerate(shapes):
        # log-uniform sizes: a few large salient objects, many small ones
        diameter = float(np.exp(rng.uniform(np.log(9), np.log(40))))
        cx, cy = rng.uniform(diameter / 3, size - diameter / 3, size=2)
        mask = _shape_mask(str(shape), diameter, cx, cy, rng.uniform(0, 2 * np.pi), size)
        colour = str(rng.choice(list(COLOURS)))
        rgb = np.array(COLOURS[colour], dtype=np.float32) * rng.uniform(0.85, 1.1)
        shaded = rgb[None, None, :] * _texture(rng, size)[:, :, None]
        image[mask] = shaded[mask]
        owner[mask] = k
        colours.append(colour)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    objects = [WorldObject(str(s), c, owner == k) for k, (s, c) in enumerate(zip(shapes, colours))]
    objects = [o for o in objects if o.mask.sum() >= 4]
    if not objects:  # fully occluded: draw again with the next index of a private stream
        return make_sample(seed, index + 10_000_019, size)
    tag_masks: dict[str, np.ndarray] = {background: owner < 0}
    for obj in objects:
        for tag in (obj.shape, obj.colour):
            tag_masks[tag] = tag_masks.get(tag, np.zeros_like(obj.mask)) | obj.mask
    return WorldSample(image, _caption(rng, objects, background), background, objects, tag_masks)
