"""`ttd tag` at scale: a streamed input, decoding overlapped with the model in a bounded queue,
exactly-once output that survives SIGKILL (`resume=True` continues it), and `shard`/`num_shards`
for schedulers that run many copies of the job (SLURM arrays, Kubernetes indexed jobs).

Each output line is the record of ttd.jobs.tag_job (or its error record) plus `index`, the item's
position in the input stream: shard outputs concatenate into the whole job's output and sort
back into input order by it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ttd.jobs.coco import check_available as check_rle_available
from ttd.jobs.decoding import decoded_batches
from ttd.runtime.images import DEFAULT_MAX_PIXELS
from ttd.data.inputs import InputError, Item
from ttd.data.items import check_shard, select_shard
from ttd.jobs.jsonl_output import error_kind, partial_path
from ttd.jobs.outputs import open_output
from ttd.runtime.tagger import Tagger, TagResult
from ttd.jobs.tag_job import (prepare_items, item_record, split_outcomes, write_masks, default_decode_workers, refuse_input_as_output,
                         warn_indistinct_tags)
from ttd.jobs.mask_files import rle_masks as tag_rle_masks


@dataclass
class JobSummary:
    """End-of-job figures: items in the output, how many this run tagged, errors by kind, rate."""

    output: Path
    items: int = 0
    resumed: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    already_complete: bool = False

    @property
    def this_run(self) -> int:
        return self.items - self.resumed

    @property
    def images_per_second(self) -> float:
        return self.this_run / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_complete:
            return f"{self.output} is already complete ({self.items} records); nothing to do"
        errors = sum(self.errors.values())
        kinds = ", ".join(f"{kind} {count}" for kind, count in self.errors.most_common())
        resumed = f", {self.resumed} from the interrupted run" if self.resumed else ""
        return (f"wrote {self.items} records to {self.output} ({errors} errors){f'; errors by kind: {kinds}' if kinds else ''}; "
                f"{self.this_run} items this run{resumed} at {self.images_per_second:.1f} images/s")


def count_lines(path: Path) -> int:
    """Non-empty lines of a file, counted in 1 MiB blocks (for the progress bar's ETA only)."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n") - block.count(b"\n\n")
            last = block[-1:]
    return lines + (last != b"\n")


def refusing_output(items: Iterable[Item], output: Path) -> Iterator[Item]:
    """The items, stopping the job at an item that is the output file itself (found in a folder)."""
    names = {output.name, partial_path(output).name}
    for item in items:
        if item.path.name in names:
            refuse_input_as_output(output, [item])
        yield item


class CountedItems:
    """The items of a stream, counted as they are read (the stream is never read ahead)."""

    def __init__(self, items: Iterable[Item]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Item]:
        for item in self.items:
            self.count += 1
            yield item


def refuse_no_items(counted: CountedItems, output: Path) -> None:
    """Before the output is replaced: a job whose input held no item at all is an error, and the
    previous output stays as it was (issue 23, item 14)."""
    if counted.count == 0:
        raise InputError(f"the input holds no item (an empty captions file, or image arguments that name no image); "
                         f"{output} is left as it was")


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
    Paths are resolved (absolute), so a resume may name the inputs another way (issue 23, item 20)."""
    return {"captions": _resolved(captions), "images": [_resolved(i) for i in images],
            "backend": backend, "model": model, "pretrained": pretrained, "checkpoint": _resolved_if_local(checkpoint),
            "export_dir": _resolved_if_local(export_dir), "dense_mode": dense_mode, "dtype": dtype,
            "threshold": threshold, "score": score_method, "flip_tta": flip_tta}


@dataclass
class TaggedBatch:
    """A batch after the model: error records, and the Tagger's results of the items that decoded."""

    batch: list[tuple[int, Item]]
    records: dict[int, dict]
    results: dict[int, TagResult]
    image_sizes: dict[int, tuple[int, int]]  # each decoded image's own (width, height): masks are laid on it


def tag_batch_results(tagger: Tagger, batch: list[tuple[int, Item]], outcomes: list, vocabulary: list[str] | None,
                      vocabulary_embeds: np.ndarray | None, with_masks: bool) -> TaggedBatch:
    """Stage 1: encoder and tag head together on the backend's device (one call for the batch)."""
    records, prepared = split_outcomes([item for _, item in batch], outcomes, vocabulary)
    results: dict[int, TagResult] = {}
    if prepared:
        keys = sorted(prepared)
        images = np.stack([prepared[k][0] for k in keys])
        if vocabulary is not None:
            tagged = tagger.tag_vocabulary(images, vocabulary, vocabulary_embeds, with_masks)
        else:
            tagged = tagger.tag(images, [prepared[k][1] for k in keys], with_masks)
        results = dict(zip(keys, tagged))
    return TaggedBatch(batch, records, results, {k: prepared[k][2] for k in prepared})


def batch_records(tagger: Tagger, tagged: TaggedBatch, vocabulary: list[str] | None, masks_dir: Path | None,
                  top_k: int, rle_masks: bool = False) -> list[dict]:
    """Stage 2: the records of the batch, in order (masks written or encoded if asked for)."""
    records = tagged.records
    for key, result in tagged.results.items():
        position, item = tagged.batch[key]
        record = item_record(item, result, vocabulary is not None, top_k, {})
        if masks_dir is not None:
            try:  # folders named by global position: shards writing one masks folder never collide
                record = item_record(item, result, vocabulary is not None, top_k,
                                     write_masks(masks_dir, position, item, result, tagger.config.image_size,
                                                 tagged.image_sizes[key]))
            except (OSError, ValueError) as error:
                record["error"] = f"cannot write masks: {error}"
        if rle_masks:
            record["rle_masks"] = tag_rle_masks(result, tagger.config.image_size, tagged.image_sizes[key])
        records[key] = record
    return [{"index": position, **records[offset]} for offset, (position, _) in enumerate(tagged.batch)]


def tag_batch(tagger: Tagger, batch: list[tuple[int, Item]], outcomes: list, vocabulary: list[str] | None,
              vocabulary_embeds: np.ndarray | None, masks_dir: Path | None, top_k: int,
              rle_masks: bool = False) -> list[dict]:
    """The records of one decoded batch, in order (error records for items that failed)."""
    tagged = tag_batch_results(tagger, batch, outcomes, vocabulary, vocabulary_embeds, masks_dir is not None or rle_masks)
    return batch_records(tagger, tagged, vocabulary, masks_dir, top_k, rle_masks)


# backends whose graphs may run from two threads at once (a TensorRT execution context may not;
# the triton backend gives each thread its own client)
THREAD_SAFE_BACKENDS = ("torch", "onnxruntime", "triton")


class _HeadStage:
    """A thread that runs stage 2 and writes the records while this thread runs the next batch
    (native kernels release the GIL, so both cores work); a bounded queue between the two.
    `threaded=False` runs stage 2 in the caller's thread instead."""

    def __init__(self, work, threaded: bool = True, depth: int = 2) -> None:
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.work = work
        self.thread = threading.Thread(target=self._run, name="ttd-tag-head", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def _run(self) -> None:
        while (encoded := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.work(encoded)
                except BaseException as error:  # noqa: BLE001 - handed to the main thread
                    self.error = error

    def put(self, encoded: TaggedBatch) -> None:
        if self.thread is None:
            self.work(encoded)
            return
        self._raise()
        self.queue.put(encoded)

    def close(self) -> None:
        """Wait for the queued batches, then raise what stage 2 raised, if anything."""
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


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
) -> JobSummary:
    """Tag a stream of items into `output` (JSON lines), exactly once per item even across kills.

    `resume`: continue `output.partial` of the same job (`job` describes it; a resume with
    another description is refused). `shard`/`num_shards`: tag only the items at positions
    p with p % num_shards == shard. `total`: items in the whole input, if known (progress ETA;
    default: the lines of a JSONL/CSV captions file among `inputs`). `inputs` (captions,
    vocabulary) and the images are refused as `output`: writing it would destroy them.
    `rle_masks`: records hold their selected tags' masks as COCO RLE. `output_format`: jsonl,
    parquet (a folder of shard files of `rows_per_file` records), or auto (by the name: .parquet).
    """
    output = Path(output)
    check_shard(shard, num_shards)
    refuse_input_as_output(output, [Item(str(p), Path(p), None) for p in explicit_images if Path(p).is_file()], inputs)
    items = CountedItems(refusing_output(items, output))
    if total is None:
        total = next((count_lines(Path(p)) - (Path(p).suffix.lower() == ".csv") for p in inputs
                      if Path(p).suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv") and Path(p).is_file()), None)
    description = {**(job or {}), "shard": shard, "num_shards": num_shards, "vocabulary": vocabulary,
                   "masks_dir": str(masks_dir) if masks_dir else None, "max_pixels": max_pixels, "top_k": top_k,
                   **({"rle_masks": True} if rle_masks else {})}  # only when set: older partial outputs still resume
    if rle_masks:
        check_rle_available()  # before anything is written
    writer = open_output(output, description, resume, output_format, rows_per_file)
    summary = JobSummary(Path(output), writer.done.lines, writer.done.lines, Counter(writer.done.errors))
    if writer.complete:
        summary.already_complete = True
        return summary
    if vocabulary is not None:
        warn_indistinct_tags(tagger, vocabulary)
        if vocabulary_embeds is None:
            vocabulary_embeds = tagger.encode_tags(vocabulary, progress)  # once, before the first batch
    workers = default_decode_workers() if decode_workers is None else decode_workers
    prepare = functools.partial(prepare_items, vocabulary_mode=vocabulary is not None,
                                preprocess=dataclasses.replace(tagger.preprocess, max_pixels=max_pixels))
    mine = None if total is None else len(range(shard, total, num_shards))
    started = time.perf_counter()
    try:
        with tqdm(total=mine, initial=summary.resumed, disable=not progress, unit="img", smoothing=0.1) as bar:
            batches = decoded_batches(select_shard(items, shard, num_shards, skip=summary.resumed), batch_size,
                                      workers, prepare, prefetch)

            with_masks = masks_dir is not None or rle_masks

            def write(tagged: TaggedBatch) -> None:
                records = batch_records(tagger, tagged, vocabulary, masks_dir, top_k, rle_masks)
                writer.write(records)
                summary.items += len(records)
                summary.errors.update(error_kind(str(r["error"])) for r in records if "error" in r)
                bar.update(len(records))

            head = _HeadStage(write, threaded=getattr(tagger.backend, "name", None) in THREAD_SAFE_BACKENDS)
            try:
                for batch, outcomes in batches:
                    head.put(tag_batch_results(tagger, batch, outcomes, vocabulary, vocabulary_embeds, with_masks))
            finally:
                head.close()
        refuse_no_items(items, output)
        writer.finish()
    finally:
        writer.close()
        summary.seconds = time.perf_counter() - started
    return summary
