"""COCO-style annotations with RLE masks (pycocotools), so labelling and training tools read the
masks of `ttd segment` directly.

RLE in JSON is pycocotools' compressed form: {"size": [height, width], "counts": "<ascii>"}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ttd.errors import InputError, RuntimeProblem


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as error:  # an optional extra of the package
        raise RuntimeProblem("COCO RLE masks need pycocotools: pip install 'ttd-toolkit[segment]' "
                           "(or pip install pycocotools)") from error
    return mask_api


def check_available() -> None:
    """Raise the install hint now (before a long job writes anything) if pycocotools is missing."""
    _mask_api()


def encode_rle(mask: np.ndarray) -> dict:
    """bool [H, W] -> {"size": [H, W], "counts": str} (compressed RLE, JSON-ready)."""
    if mask.ndim != 2:
        raise InputError(f"a mask must be 2-D [height, width], got shape {mask.shape}")
    rle = _mask_api().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """{"size", "counts"} (compressed string or uncompressed list) -> bool [H, W]."""
    api = _mask_api()
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"not an RLE mask (needs size [h, w] and counts): {str(rle)[:80]}") from error
    if isinstance(counts, list):  # uncompressed RLE, as COCO's iscrowd annotations store it
        compressed = api.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        compressed = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return api.decode(compressed).astype(bool)


def rle_area_and_box(rle: dict) -> tuple[int, list[float]]:
    """(pixel count, [x, y, width, height]) of an RLE mask."""
    api = _mask_api()
    compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(api.area(compressed)), [float(v) for v in api.toBbox(compressed)]


def coco_from_records(records: list[dict]) -> dict:
    """A COCO dataset dict (images, categories, annotations) from `ttd segment` records.

    One image per record without an error; one category per distinct label (tag, class or
    "caption"); one annotation per segment, with its RLE, area, bbox, score and kind, and for
    caption masks the caption text."""
    images, annotations, categories = [], [], {}
    for record in records:
        if "error" in record or "segments" not in record:
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": record["image"], "width": record["width"],
                       "height": record["height"], **({"caption": record["caption"]} if "caption" in record else {})})
        for segment in record["segments"]:
            name = "caption" if segment["kind"] == "caption" else segment["label"]
            if name not in categories:
                categories[name] = {"id": len(categories) + 1, "name": name, "supercategory": segment["kind"]}
            area, box = rle_area_and_box(segment["rle"])
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": categories[name]["id"],
                          "segmentation": segment["rle"], "area": area, "bbox": box, "iscrowd": 0,
                          "score": segment["score"], "kind": segment["kind"]}
            if segment["kind"] == "caption":
                annotation["caption"] = segment["label"]
            annotations.append(annotation)
    return {"info": {"description": "ttd segment", "version": "1.0"}, "images": images,
            "categories": list(categories.values()), "annotations": annotations}


def write_coco(records: list[dict], path: Path) -> dict:
    """Write the COCO JSON of `records` to `path` (via a temporary file: never half-written)."""
    data = coco_from_records(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)
    return data
