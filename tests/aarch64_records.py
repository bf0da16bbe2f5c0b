"""What tests/runtime/test_aarch64.py runs on both CPUs: the embedded default model through the
public API (which the suite holds equal to `ttd tag`'s records), in captions and vocabulary modes,
without and with masks. Writes OUT.json (selections and scores) and OUT.npz (the masks).

    python tests/aarch64_records.py EXAMPLES_DIR OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

VOCABULARY = ("circle", "heart", "red", "square", "grass", "dog", "star", "blue")


def records(examples: Path, backend: str = "torch") -> tuple[dict, dict[str, np.ndarray]]:
    """{mode: [{"selected", "scores"} per image]} and {"mode/index/tag": bool mask} for the examples."""
    import ttd

    tagger = ttd.load(backend=backend, threads=1)
    rows = [json.loads(line) for line in (examples / "annotations.jsonl").read_text().splitlines()]
    images = [str(examples / row["image"]) for row in rows]
    captions = [row["caption"] for row in rows]
    import platform

    out: dict = {"backend": tagger.backend, "machine": platform.machine()}
    masks: dict[str, np.ndarray] = {}
    for with_masks in (False, True):
        for mode, results in (("captions", tagger.tag(images, captions, masks=with_masks)),
                              ("vocabulary", tagger.tag_vocabulary(images, list(VOCABULARY), masks=with_masks))):
            key = f"{mode}{'+masks' if with_masks else ''}"
            out[key] = [{"selected": r.selected, "scores": r.scores} for r in results]
            for index, result in enumerate(results):
                for tag, mask in (result.masks or {}).items():
                    masks[f"{key}/{index}/{tag}"] = np.asarray(mask, np.bool_)
    return out, masks


if __name__ == "__main__":
    examples, target = Path(sys.argv[1]), Path(sys.argv[2])
    found, found_masks = records(examples)
    found["torch_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "onnx"))
    Path(f"{target}.json").write_text(json.dumps(found))
    np.savez_compressed(f"{target}.npz", **found_masks)
