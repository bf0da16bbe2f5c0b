"""JPEGs of a `ttd tag` job decoded on the device (`--decode device`; docs/gpu.md, "GPU decoding").

The decoding workers leave JPEGs encoded (ttd.jobs.decode_items.jpegs_left_encoded: bytes, tags,
size from the header) and prepare anything else with PIL as usual. The model's thread decodes a
batch's JPEGs with ttd.runtime.device_decode (nvJPEG on a GPU) straight into the batch on the
device. The first batch holding JPEGs is also decoded by PIL and tagged both ways: device
decoding is kept only if the agreement gate passes (≥ GATE of the tag decisions alike), and that
batch's records are PIL's either way; otherwise every JPEG goes through PIL for the rest of the
job, and the job says so. A JPEG the device cannot decode (CMYK, progressive on some nvJPEG
versions, a broken file) is decoded by PIL, so an error record names the same problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ttd.runtime.device_decode import Agreement, compare_decisions, decode_batch
from ttd.runtime.images import ImageError, Preprocess
from ttd.runtime.tagger import Tagger

Row = tuple[Any, list[str], tuple[int, int]]  # (uint8 image or JPEG bytes, tags, the image's own size)


@dataclass
class DeviceDecoding:
    """Device decoding for one job: where, what the gate found, whom to tell."""

    device: str  # a torch device: "cuda", "cuda:1" (the job's); "cpu" in tests (everything but nvJPEG)
    say: Callable[[str], None] | None = None
    gate: Agreement | None = None  # None until a batch with JPEGs has been compared

    @property
    def active(self) -> bool:
        return self.gate is None or self.gate.passed

    def batch(self, tagger: Tagger, rows: list[Row], names: list[str], preprocess: Preprocess,
              vocabulary_embeds: np.ndarray | None) -> tuple[Any, dict[int, str]]:
        """(the batch uint8 [B', S, S, 3] of the rows that decoded, in order: a tensor on the device
        while device decoding is on, else a host array; the errors of the others by row, as PIL
        names them). `preprocess`: the job's (its size limit)."""
        import torch

        jpegs = [n for n, row in enumerate(rows) if isinstance(row[0], bytes)]
        errors: dict[int, str] = {}
        pil: dict[int, np.ndarray] = {n: row[0] for n, row in enumerate(rows) if n not in jpegs}

        def by_pil(n: int) -> None:
            try:
                pil[n] = preprocess(rows[n][0], names[n])
            except ImageError as error:
                errors[n] = str(error)

        on_device: dict[int, Any] = {}
        if jpegs and self.active:
            decoded, _, left_over = decode_batch([rows[n][0] for n in jpegs], preprocess.size,
                                                 preprocess.interpolation, self.device)
            on_device = {n: decoded[i] for i, n in enumerate(jpegs) if i not in set(left_over)}
        if self.gate is None or not self.gate.passed:  # PIL's batch: while judging, and after a failed gate
            for n in jpegs:
                by_pil(n)
            judged = [n for n in sorted(on_device) if n in pil]
            if self.gate is None and judged:
                self._judge(tagger, [rows[n][1] for n in judged], np.stack([pil[n] for n in judged]),
                            np.stack([on_device[n].cpu().numpy() for n in judged]), vocabulary_embeds)
            return _stack([pil[n] for n in sorted(pil)], preprocess.size), errors
        for n in jpegs:
            if n not in on_device:  # what the device cannot decode, PIL does (or names the problem)
                by_pil(n)
        keep = sorted(set(on_device) | set(pil))
        out = torch.empty((len(keep), preprocess.size, preprocess.size, 3), dtype=torch.uint8, device=self.device)
        for i, n in enumerate(keep):
            out[i] = on_device[n] if n in on_device else torch.tensor(pil[n], device=self.device)
        return out, errors

    def _judge(self, tagger: Tagger, tags: list[list[str]], reference: np.ndarray, candidate: np.ndarray,
               vocabulary_embeds: np.ndarray | None) -> None:
        """The gate: the same JPEGs tagged from PIL's pixels and from the device's."""
        from ttd.runtime.device_decode import GATE

        if vocabulary_embeds is not None:
            tagged = [tagger.tag_vocabulary(images, tags[0], vocabulary_embeds) for images in (reference, candidate)]
        else:
            tagged = [tagger.tag(images, tags) for images in (reference, candidate)]
        self.gate = compare_decisions(*tagged)
        verdict = "on" if self.gate.passed else f"off (below the gate's {GATE:.0%}): PIL decodes every JPEG"
        if self.say is not None:
            self.say(f"--decode device: {self.gate.share:.2%} of {self.gate.decisions} tag decisions on "
                     f"{self.gate.images} JPEGs as PIL's; device decoding {verdict}")


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
