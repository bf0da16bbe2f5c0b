"""Semantic-segmentation data in the PASCAL VOC layout, and the world's segmentation split in it.

    ROOT/JPEGImages/<id>.jpg (or .png)      the images
    ROOT/SegmentationClass/<id>.png         label maps: palette (or 8-bit grey) PNGs whose pixel
                                            values are class indices; 255 = ignore (VOC's borders)
    ROOT/ImageSets/Segmentation/<split>.txt the ids of a split (optional: else every label map)
    ROOT/classes.txt                        class names, one a line, line i = label i (optional:
                                            else PASCAL VOC's 21); label 0 is the background

PASCAL Context, COCO-Object, ADE20K or Cityscapes converted to this layout (with a background
class 0) evaluate the same way. The world split has exact ground truth: label 0 is the
background, label 1 + i the shape SHAPES[i] (or the colour, labelling "colours") wherever an
object of that shape (colour) is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ttd.errors import InputError, TTDError
from ttd.runtime.images import ImageError, decode_image

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IGNORE_INDEX = 255
PALETTE_SIZE = 256


class VOCError(TTDError, ValueError):
    """A segmentation folder or one of its files is unusable; the message names it and why."""


@dataclass
class SegmentationSet:
    """Images with label maps and the class names of the labels (0 = background)."""

    classes: list[str]
    names: list[str]
    source: str
    _images: list[Path | np.ndarray]
    _labels: list[Path | np.ndarray]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, label map uint8 [H, W] of the same size)."""
        image, labels = self._images[index], self._labels[index]
        if isinstance(image, np.ndarray):
            return Image.fromarray(image), labels
        try:
            picture = decode_image(image)
        except ImageError as error:
            raise VOCError(str(error)) from error
        return picture, read_label_map(labels, picture.size)


def read_label_map(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A label PNG as uint8 class indices; it must be single-channel and the image's size."""
    try:
        with Image.open(path) as png:
            png.load()
            if png.mode not in ("P", "L"):
                raise VOCError(f"{path}: label map has mode {png.mode}; expected a palette or 8-bit grey PNG "
                               "whose values are class indices")
            labels = np.asarray(png, dtype=np.uint8)
    except OSError as error:
        raise VOCError(f"{path}: cannot read label map ({error})") from error
    if (labels.shape[1], labels.shape[0]) != size:
        raise VOCError(f"{path}: label map is {labels.shape[1]}x{labels.shape[0]}, its image {size[0]}x{size[1]}")
    return labels


def read_classes(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if len(names) < 2:
        raise VOCError(f"{path}: needs the background and at least one class, one a line")
    return names


def read_voc(root: Path, split: str = "val", classes_file: Path | None = None) -> SegmentationSet:
    """The samples of a VOC-style folder (file checks are per sample, when loaded)."""
    root = Path(root)
    images_dir, labels_dir = root / "JPEGImages", root / "SegmentationClass"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise VOCError(f"{root}: no {folder.name}/ folder (expected the VOC layout: JPEGImages/, "
                           "SegmentationClass/, ImageSets/Segmentation/<split>.txt)")
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if split_file.is_file():
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    elif (root / "ImageSets").exists():
        raise VOCError(f"{split_file} does not exist (choose another --split)")
    else:
        ids = sorted(p.stem for p in labels_dir.glob("*.png"))
    if not ids:
        raise VOCError(f"{root}: no samples in split {split!r}")
    classes_file = classes_file or (root / "classes.txt")
    classes = read_classes(classes_file) if classes_file.is_file() else list(VOC_CLASSES)
    images, labels = [], []
    for sample_id in ids:
        found = [images_dir / f"{sample_id}{s}" for s in IMAGE_SUFFIXES if (images_dir / f"{sample_id}{s}").is_file()]
        if not found:
            raise VOCError(f"{images_dir}: no image for id {sample_id!r} (.jpg, .jpeg or .png)")
        label_path = labels_dir / f"{sample_id}.png"
        if not label_path.is_file():
            raise VOCError(f"{labels_dir}: no label map {sample_id}.png")
        images.append(found[0])
        labels.append(label_path)
    return SegmentationSet(classes, ids, str(root), images, labels)


def palette() -> list[int]:
    """The PASCAL VOC colour map (index 0 black), flattened for PIL's putpalette: label maps
    written as palette PNGs open in every VOC-style tool with the usual colours."""
    colours = []
    for index in range(PALETTE_SIZE):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours += [r, g, b]
    return colours


WORLD_LABELLINGS = ("shapes", "colours")


def _world_names(labelling: str) -> tuple[str, ...]:
    from ttd.data.world import COLOURS, SHAPES

    if labelling not in WORLD_LABELLINGS:
        raise InputError(f"unknown world labelling {labelling!r}; choose one of {', '.join(WORLD_LABELLINGS)}")
    return SHAPES if labelling == "shapes" else tuple(COLOURS)


def world_label_map(sample, labelling: str = "shapes") -> np.ndarray:
    """uint8 labels of a world sample: 0 background, 1 + the index of each visible object's shape
    (or colour) in SHAPES (or COLOURS) on its pixels."""
    names = _world_names(labelling)
    labels = np.zeros(sample.image.shape[:2], np.uint8)
    for obj in sample.objects:
        labels[obj.mask] = 1 + names.index(obj.shape if labelling == "shapes" else obj.colour)
    return labels


def world_classes(labelling: str = "shapes") -> list[str]:
    return ["background", *_world_names(labelling)]


def world_segmentation_samples(seed: int = 2, count: int = 200, size: int = 64, start: int = 0,
                               labelling: str = "shapes") -> SegmentationSet:
    """The world's segmentation split in memory (the same samples `write_world_segmentation` writes),
    labelled by shape (8 classes) or colour (6 classes), 0 the background."""
    from ttd.data.world import make_sample

    classes = world_classes(labelling)
    samples = [make_sample(seed, index, size) for index in range(start, start + count)]
    return SegmentationSet(classes, [f"{i:06d}" for i in range(start, start + count)],
                           f"world seed {seed}, {count} samples of {size} px, {labelling}", [s.image for s in samples],
                           [world_label_map(s, labelling) for s in samples])


def write_world_segmentation(out: Path, seed: int = 2, count: int = 200, size: int = 64, start: int = 0,
                             labelling: str = "shapes") -> Path:
    """Write the world's segmentation split as a VOC-style folder (into a new or empty folder)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; choose a new folder (or delete this one)")
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    dataset = world_segmentation_samples(seed, count, size, start, labelling)
    for name, image, labels in zip(dataset.names, dataset._images, dataset._labels):
        Image.fromarray(image).save(out / "JPEGImages" / f"{name}.png")  # lossless: exact pixels
        png = Image.fromarray(labels, "P")
        png.putpalette(palette())
        png.save(out / "SegmentationClass" / f"{name}.png")
    (out / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in dataset.names))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in dataset.classes))
    return out
