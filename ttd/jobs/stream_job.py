"""`ttd tag --crop center`: each image's centre crop at the model's input size, tagged with its
caption's candidate tags or against a vocabulary; one step of the job runner (ttd/jobs/runner.py).

Record (ttd/jobs/tag_job.py): {"index", "image", "caption", "candidates": [{tag, score}],
"selected", ["masks": {tag: png}], ["rle_masks": {tag: rle}]}; in vocabulary mode "selected" and
"top" hold {tag, score}.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttd.data.inputs import Item
from ttd.jobs.coco import check_available as check_rle_available
from ttd.jobs.decoding import DecodingPool, Positioned
from ttd.jobs.mask_files import rle_masks as tag_rle_masks
from ttd.jobs.runner import JobOptions, JobSummary, run_job
from ttd.jobs.decode_items import jpegs_left_encoded, prepare_items
from ttd.jobs.device_decoding import DeviceDecoding
from ttd.jobs.input_identity import (captions_identity, images_identity, input_fingerprint,  # noqa: F401
                                     model_files, model_identity)
from ttd.jobs.tag_job import item_record, split_outcomes, warn_indistinct_tags, write_masks
from ttd.runtime.backend import BatchScores, Pending
from ttd.runtime.images import DEFAULT_MAX_PIXELS, Preprocess
from ttd.runtime.tagger import Tagger, TagResult


def _resolved(spec) -> str | None:
    """A path (or glob pattern) of the job as an absolute, normalised path: the same input given
    relative or absolute, or through a symbolic link, describes the same job on --resume."""
    if spec is None or "://" in str(spec) or str(spec).startswith("pipe:"):  # URLs of webdataset shards stay
        return None if spec is None else str(spec)
    return str(Path(os.path.abspath(Path(spec).expanduser())).resolve())


def _resolved_if_local(spec) -> str | None:
    """A checkpoint or export folder: resolved when it names something here (a hub name stays)."""
    return None if spec is None else _resolved(spec) if Path(spec).exists() else str(spec)


def tag_job_description(captions, images, backend, model, pretrained, checkpoint, export_dir, dense_mode, dtype,
                        threshold, score_method, flip_tta) -> dict:
    """What makes a tagging job's records: a resumed run must match it (batch size, workers may change).
    Paths are resolved (absolute), so a resume may name the inputs another way;
    a captions file must hold what it held."""
    # what the job read and with which model, for --resume to refuse changed ones (ttd/jobs/input_identity.py)
    inputs = {"captions": captions_identity(captions), "images": images_identity(images)}
    return {"captions": _resolved(captions), "inputs": inputs,
            "model_files": model_identity(model_files(checkpoint, export_dir, pretrained, model)),
            "images": [_resolved(i) for i in images],
            "backend": backend, "model": model, "pretrained": pretrained, "checkpoint": _resolved_if_local(checkpoint),
            "export_dir": _resolved_if_local(export_dir), "dense_mode": dense_mode, "dtype": dtype,
            "threshold": threshold, "score": score_method, "flip_tta": flip_tta}


@dataclass
class TaggedBatch:
    """A batch after the model: error records, and the Tagger's results of the items that decoded
    (plain path), or the batch still on the device (pipelined path: `pending`, in `keys` order)."""

    batch: Positioned
    records: dict[int, dict]
    results: dict[int, TagResult]
    image_sizes: dict[int, tuple[int, int]]  # each decoded image's own (width, height): masks are laid on it
    pending: Pending | None = None
    keys: list[int] = dataclasses.field(default_factory=list)
    tag_lists: list[list[str]] = dataclasses.field(default_factory=list)
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per stage, once recorded
    scores: BatchScores | None = None  # a pipelined batch's results, once they reached the host (`arrived`)


ROUNDING_SLACK = 2e-6  # a score outside the device's top k + slack ranks below the k-th even after rounding


def ranked_top(row: list[float], top: np.ndarray | None, top_k: int) -> list[int]:
    """Indices of the `top_k` highest scores rounded to 6 decimals, ties in vocabulary order:
    what sorting every {tag, score} gives, from the device's candidates when they provably
    hold the answer (every score outside them is more than the rounding below the k-th)."""
    if top_k <= 0:
        return []
    candidates: Iterable[int] = range(len(row))
    if top is not None and len(top) < len(row):
        kth = row[top[min(top_k, len(top)) - 1]]
        if row[top[-1]] < kth - ROUNDING_SLACK:
            candidates = top.tolist()
    return sorted(candidates, key=lambda i: (-round(row[i], 6), i))[:top_k]


def batch_images(images: list[np.ndarray], destination=None) -> np.ndarray:
    """The batch [B, S, S, 3] of decoded images with as few copies as possible: no copy when they
    are consecutive rows of one array (a decoding pool's batch, DecodingPool.collect), else one
    stack (into `destination`'s buffer when it gives one: a pinned upload slot on a GPU)."""
    first = images[0]
    base = first.base
    if isinstance(base, np.ndarray) and base.ndim == first.ndim + 1 and base.flags.c_contiguous \
            and base.shape[1:] == first.shape and all(image.base is base for image in images):
        origin, row = base.__array_interface__["data"][0], first.nbytes
        start, remainder = divmod(first.__array_interface__["data"][0] - origin, row)
        if remainder == 0 and all(image.__array_interface__["data"][0] == origin + (start + i) * row
                                  for i, image in enumerate(images)):
            return base[start : start + len(images)]
    shape = (len(images), *first.shape)
    out = destination(shape) if destination is not None else None
    if out is None or (isinstance(base, np.ndarray) and np.may_share_memory(out, base)):  # never stack onto itself
        return np.stack(images)
    return np.stack(images, out=out)


@dataclass
class CentreStep:
    """The centre-crop step: encoder and tag head together on the backend's device, one call per
    batch; the records (and masks, if asked for) built from the results."""

    vocabulary: list[str] | None = None
    masks_dir: Path | None = None
    top_k: int = 10
    rle_masks: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    vocabulary_embeds: np.ndarray | None = None
    pipelined: bool = True  # the batch stays on the device until the record stage needs it (same records)
    decoding: DeviceDecoding | None = None  # JPEGs decoded on the device behind the gate (`--decode device`)

    def description(self) -> dict:
        return {"vocabulary": self.vocabulary, "masks_dir": str(self.masks_dir) if self.masks_dir else None,
                "max_pixels": self.max_pixels, "top_k": self.top_k,
                **({"rle_masks": True} if self.rle_masks else {}),  # only when set: older partial outputs still resume
                **({"decode": "device"} if self.decoding is not None else {})}

    def preprocess(self, tagger: Tagger) -> Preprocess:
        """The Tagger's preprocessing with this job's size limit."""
        return dataclasses.replace(tagger.preprocess, max_pixels=self.max_pixels)

    @property
    def with_masks(self) -> bool:
        return self.masks_dir is not None or self.rle_masks

    def bound(self, tagger: Tagger, progress: bool = False) -> CentreStep:
        if self.rle_masks:
            check_rle_available()
        if self.vocabulary is None or self.vocabulary_embeds is not None:
            return self
        warn_indistinct_tags(tagger, self.vocabulary)
        return dataclasses.replace(self, vocabulary_embeds=tagger.encode_tags(self.vocabulary, progress))

    def destination(self, tagger: Tagger):
        """Where decoded batches land: the backend's next upload slot (pinned, on a GPU), so a
        batch takes one host copy on its way to the device (docs/gpu.md); None: anywhere."""
        if self.decoding is not None:
            return None  # the batch is put together on the device
        return getattr(tagger.backend, "staging", None) if self.pipelined else None

    def decoder(self, tagger: Tagger) -> Callable[[list[Item]], list]:
        decode = jpegs_left_encoded if self.decoding is not None else prepare_items
        return functools.partial(decode, vocabulary_mode=self.vocabulary is not None,
                                 preprocess=self.preprocess(tagger))

    def _device_decoded(self, tagger: Tagger, batch: Positioned, records: dict, prepared: dict) -> tuple[list, object]:
        """(the keys of the rows that decoded, their batch) of a batch whose JPEGs are still encoded;
        a JPEG that neither the device nor PIL decodes becomes its error record."""
        keys = sorted(prepared)
        images, errors = self.decoding.batch(tagger, [prepared[k] for k in keys], [batch[k][1].image for k in keys],
                                             self.preprocess(tagger), self.vocabulary_embeds)
        for n, error in errors.items():
            item = batch[keys[n]][1]
            records[keys[n]] = {"image": item.image, "caption": item.caption, "error": error}
            del prepared[keys[n]]
        return [k for n, k in enumerate(keys) if n not in errors], images

    def run(self, tagger: Tagger, batch: Positioned, outcomes: list) -> TaggedBatch:
        records, prepared = split_outcomes([item for _, item in batch], outcomes, self.vocabulary)
        results: dict[int, TagResult] = {}
        sizes = {k: prepared[k][2] for k in prepared}
        decoded = self._device_decoded(tagger, batch, records, prepared) if self.decoding and prepared else None
        if not prepared:
            return TaggedBatch(batch, records, results, sizes)
        keys, images = decoded or (sorted(prepared), None)
        if images is None:  # host arrays, into the next upload slot when pipelined (`destination`)
            images = batch_images([prepared[k][0] for k in keys], self.destination(tagger))
        if self.pipelined:
            tag_lists = [prepared[k][1] for k in keys]
            pending = tagger.submit(images, None if self.vocabulary is not None else tag_lists, self.vocabulary_embeds,
                                    self.with_masks, self.top_k if self.vocabulary is not None else 0)
            return TaggedBatch(batch, records, results, sizes, pending, keys, tag_lists)
        if not isinstance(images, np.ndarray):  # decoded on the device: the plain path takes host arrays
            images = images.cpu().numpy()
        if self.vocabulary is not None:
            tagged = tagger.tag_vocabulary(images, self.vocabulary, self.vocabulary_embeds, self.with_masks)
        else:
            tagged = tagger.tag(images, [prepared[k][1] for k in keys], self.with_masks)
        results = dict(zip(keys, tagged))
        return TaggedBatch(batch, records, results, sizes)

    def _whole_array_records(self, tagger: Tagger, tagged: TaggedBatch, scores: BatchScores) -> None:
        """Records of a batch from its score matrix, with no per-tag numpy scalar: the bytes
        `item_record` writes (scores rounded by Python's round, ties ranked in input order)."""
        chosen = scores.scores >= tagger.threshold  # float32 comparison, as Tagger.results makes it
        vocabulary = self.vocabulary
        for j, key in enumerate(tagged.keys):
            item = tagged.batch[key][1]
            tags = tagged.tag_lists[j]
            row = scores.scores[j, : len(tags)].tolist()
            picked = np.flatnonzero(chosen[j, : len(tags)]).tolist()
            if vocabulary is None:
                tagged.records[key] = {"image": item.image, "caption": item.caption,
                                       "candidates": [{"tag": t, "score": round(v, 6)} for t, v in zip(tags, row)],
                                       "selected": [tags[i] for i in picked]}
            else:
                top = ranked_top(row, None if scores.top is None else scores.top[j], self.top_k)
                tagged.records[key] = {"image": item.image,
                                       "selected": [{"tag": vocabulary[i], "score": round(row[i], 6)} for i in picked],
                                       "top": [{"tag": vocabulary[i], "score": round(row[i], 6)} for i in top]}

    def arrived(self, tagged: TaggedBatch) -> None:
        """Wait for a pipelined batch's results to reach the host (its event only: no CPU work; the
        record stage waits here before it takes a core, ttd/jobs/core_share.py)."""
        if tagged.pending is not None and tagged.scores is None:
            started = time.perf_counter()
            tagged.scores = tagged.pending.wait()
            tagged.stages = {**(tagged.scores.stages or {}), "wait": time.perf_counter() - started}

    def _received(self, tagger: Tagger, tagged: TaggedBatch) -> None:
        """A pipelined batch's records or results, once it arrived."""
        self.arrived(tagged)
        # the batch lets go of its results here: their host buffers are reused once nothing holds them
        scores, tagged.pending, tagged.scores = tagged.scores, None, None
        distinct = self.vocabulary is None or len(set(self.vocabulary)) == len(self.vocabulary)
        if self.with_masks or not distinct:  # masks are per tag anyway; a repeated tag is selected by name
            tagged.results = dict(zip(tagged.keys, tagger.results(scores.scores, scores.cosines, tagged.tag_lists)))
        else:
            self._whole_array_records(tagger, tagged, scores)

    def records(self, tagger: Tagger, tagged: TaggedBatch) -> list[dict]:
        if tagged.pending is not None:
            self._received(tagger, tagged)
        records, vocabulary_mode = tagged.records, self.vocabulary is not None
        for key, result in tagged.results.items():
            position, item = tagged.batch[key]
            record = item_record(item, result, vocabulary_mode, self.top_k, {})
            if self.masks_dir is not None:
                try:  # folders named by global position: shards writing one masks folder never collide
                    record = item_record(item, result, vocabulary_mode, self.top_k,
                                         write_masks(self.masks_dir, position, item, result, tagger.config.image_size,
                                                     tagged.image_sizes[key]))
                except (OSError, ValueError) as error:
                    record["error"] = f"cannot write masks: {error}"
            if self.rle_masks:
                record["rle_masks"] = tag_rle_masks(result, tagger.config.image_size, tagged.image_sizes[key])
            records[key] = record
        return [{"index": position, **records[offset]} for offset, (position, _) in enumerate(tagged.batch)]


def tag_stream(
    tagger: Tagger,
    items: Iterable[Item],
    output: Path,
    vocabulary: list[str] | None = None,
    batch_size: int = 32,
    masks_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    top_k: int = 10,
    progress: bool = True,
    decode_workers: int | None = None,
    vocabulary_embeds: np.ndarray | None = None,
    resume: bool = False,
    shard: int = 0,
    num_shards: int = 1,
    job: dict | None = None,
    total: int | None = None,
    prefetch: int = 2,
    inputs: Sequence[Path] = (),
    explicit_images: Sequence[Path] = (),
    rle_masks: bool = False,
    output_format: str = "auto",
    rows_per_file: int = 10_000,
    pipelined: bool = True,
    decoding_pool: DecodingPool | None = None,
) -> JobSummary:
    """Tag a stream of items into `output` (JSON lines or Parquet shards): the centre-crop step on
    the job runner (ttd/jobs/runner.py: `resume`, `shard`/`num_shards`, the refused outputs).
    `vocabulary`: tag every image against it (`vocabulary_embeds`: its embeddings, if cached);
    `rle_masks`: records hold their selected tags' masks as COCO RLE; `pipelined`: the batch stays
    on the device until the record stage waits for it (False: the plain path, same records);
    `decoding_pool`: persistent decoding processes to reuse (ttd/jobs/decoding.py)."""
    step = CentreStep(vocabulary, Path(masks_dir) if masks_dir else None, top_k, rle_masks, max_pixels,
                      vocabulary_embeds, pipelined)
    options = JobOptions(batch_size, decode_workers, prefetch, resume, shard, num_shards, output_format,
                         rows_per_file, progress, total, decoding_pool)
    return run_job(tagger, step, items, output, job, options, inputs, explicit_images)
