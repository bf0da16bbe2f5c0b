"""The one job runner behind `ttd tag` and `ttd segment`, every mode: items stream in, are cut
into batches and decoded ahead (ttd/jobs/decoding.py), a mode's step turns each batch into records
on the model, and one exactly-once writer (ttd/jobs/outputs.py) writes them in input order;
`resume` continues a killed run and `shard`/`num_shards` split a job over machines.

A mode is a `Step` (ttd/jobs/stream_job.py: the centre crop, captions or a vocabulary;
ttd/jobs/segment_job.py: whole images, caption masks or classes). The local engine (`run_job`)
and Ray (ttd/jobs/ray_executor.py) are the two executors of the same steps, so their records are
the same. Each record carries `index`, the item's position in the input stream: shard outputs
concatenate into the whole job's output and sort back into input order by it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from ttd.data.inputs import InputError, Item
from ttd.data.items import check_shard, count_items, select_shard
from ttd.jobs.core_share import CoreShare
from ttd.jobs.decoding import DecodingPool, Positioned, decoded_batches, default_decode_workers, usable_cores
from ttd.jobs.jsonl_output import error_kind, partial_path
from ttd.jobs.outputs import open_output
from ttd.runtime.tagger import Tagger


class Step(Protocol):
    """What a mode makes of a batch of items. Steps are plain picklable settings: Ray actors get
    the step itself and bind it to their own Tagger. Optional, looked up by name: `destination(tagger)`
    (where decoded batches land), `ahead(item)` (each item as it is read, a few batches before
    its records: `announced`) and `arrived(ran)` (wait, computing nothing, for a batch the device
    still computes: the record stage calls it before it takes a core)."""

    def description(self) -> dict:
        """The settings that make its records (a resumed run must match them)."""

    def bound(self, tagger: Tagger, progress: bool) -> Step:
        """The step ready for `tagger` (vocabulary or class embeddings encoded once)."""

    def decoder(self, tagger: Tagger) -> Callable[[list[Item]], list]:
        """A picklable function: items -> their decoded images, or the error of each (decoding workers)."""

    def run(self, tagger: Tagger, batch: Positioned, outcomes: list) -> Any:
        """The model's part of a batch (this thread)."""

    def records(self, tagger: Tagger, ran: Any) -> list[dict]:
        """The batch's records, with `index`, in input order (host work: may run in a second thread)."""


@dataclass
class JobOptions:
    """How a job runs; apart from shard, num_shards and the output, none of it changes a record."""

    batch_size: int = 32
    decode_workers: int | None = None  # None: ttd.jobs.decoding.default_decode_workers()
    prefetch: int = 2
    resume: bool = False
    shard: int = 0
    num_shards: int = 1
    output_format: str = "auto"
    rows_per_file: int = 10_000
    progress: bool = True
    total: int | None = None  # items in the whole input, if known (progress bar ETA)
    decoding_pool: DecodingPool | None = None  # persistent decoding processes to use instead of starting some


@dataclass
class JobSummary:
    """End-of-job figures: items in the output, how many this run tagged, errors by kind, rate."""

    output: Path
    items: int = 0
    resumed: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    already_complete: bool = False
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over batches (STAGES)

    @property
    def this_run(self) -> int:
        return self.items - self.resumed

    @property
    def images_per_second(self) -> float:
        return self.this_run / self.seconds if self.seconds > 0 else 0.0

    def add(self, records: list[dict]) -> None:
        self.items += len(records)
        self.errors.update(error_kind(str(r["error"])) for r in records if "error" in r)

    def profile(self) -> str:
        """One line of the stage times: where a job's time goes."""
        known = [name for name in STAGES if name in self.stages]
        return "stages (s): " + ", ".join(f"{name} {self.stages[name]:.3f}" for name in known) + \
            f"; wall {self.seconds:.3f}"

    def line(self) -> str:
        if self.already_complete:
            return f"{self.output} is already complete ({self.items} records); nothing to do"
        errors = sum(self.errors.values())
        kinds = ", ".join(f"{kind} {count}" for kind, count in self.errors.most_common())
        resumed = f", {self.resumed} from the interrupted run" if self.resumed else ""
        return (f"wrote {_count(self.items, 'record')} to {self.output} ({_count(errors, 'error')})"
                f"{f'; errors by kind: {kinds}' if kinds else ''}; "
                f"{_count(self.this_run, 'item')} this run{resumed} at {self.images_per_second:.1f} images/s")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def add_stages(total: dict[str, float], times: dict[str, float]) -> None:
    for name, seconds in times.items():
        total[name] = total.get(name, 0.0) + seconds


def refuse_input_as_output(output: Path, items: list[Item], inputs: Sequence[Path] = ()) -> None:
    """ValueError when `output` (or its .partial) is one of the job's inputs: writing it would destroy it."""
    for target in (output, partial_path(output)):
        if not target.exists():
            continue
        candidates = [*inputs, *(item.path for item in items if item.path.name == target.name)]
        for path in candidates:
            if path.exists() and os.path.samefile(path, target):
                raise InputError(f"output {target} is an input of this job ({path}); choose another output file")


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


def refuse_no_items(count: int, output: Path) -> None:
    """Before the output is replaced: a job whose input held no item at all is an error, and the
    previous output stays as it was."""
    if count == 0:
        raise InputError(f"the input holds no item (an empty captions file, or image arguments that name no image); "
                         f"{output} is left as it was")


def job_total(inputs: Sequence[Path]) -> int | None:
    """Items of a JSONL/CSV captions file among `inputs` (the progress bar's ETA), else None."""
    return next((total for p in inputs if (total := count_items(Path(p))) is not None), None)


# The stage timers of a job. decode: seconds spent decoding (summed over workers); decode_wait: the
# model's thread waiting for a decoded batch (the decoding thread's own wait for a core included,
# ttd/jobs/core_share.py); submit: the model's thread handing a batch to the
# backend (on a CPU, where nothing is asynchronous, that is the model's work itself); upload,
# encode, head, download: the backend's own clocks (CUDA events on a GPU, perf_counter on a CPU;
# "upload" is the transfer alone, "stage" the host's copying into the pinned slot before it);
# wait: the record stage waiting for a batch's results; host: building records; write: the writer;
# main_cpu: the CPU seconds of the thread that feeds the model (time.thread_time), the figure that
# limits a GPU job when the device waits on Python (docs/gpu.md); record_cpu: the record stage's
# own CPU seconds (its thread's; within main_cpu where the backend runs it in the model's thread):
# with main_cpu, what bounds a pipelined job on a core each (docs/benchmarks.md, P9).
STAGES = ("decode", "decode_wait", "submit", "stage", "upload", "encode", "head", "download", "wait", "host", "write",
          "main_cpu", "record_cpu")

def announced(items: Iterable[tuple[int, Item]], step: Step) -> Iterator[tuple[int, Item]]:
    """The items, each shown to the step's `ahead` (if it has one) as it is read: decoding reads a
    few batches ahead of the record stage, which may use what is coming (ttd/runtime/texts_ahead.py)."""
    ahead = getattr(step, "ahead", None)
    if ahead is None:
        yield from items
        return
    for entry in items:
        ahead(entry[1])
        yield entry


def _thread_safe(tagger: Tagger) -> bool:
    """Whether the backend's graphs may run from two threads at once (a TensorRT execution context may not)."""
    from ttd.runtime.backends import REGISTRY

    entry = REGISTRY.get(getattr(tagger.backend, "name", ""))
    return entry is not None and entry.thread_safe


class _RecordStage:
    """A thread that builds and writes the records of a batch while this thread runs the model on
    the next one (native kernels release the GIL, so both cores work); a bounded queue between the
    two. It computes on a core the model does not need (`share`), and waits for a batch the device
    still computes (the step's optional `arrived`) before it takes one. `threaded=False` runs it in
    the caller's thread instead."""

    def __init__(self, work: Callable[[Any], None], threaded: bool = True, depth: int = 2,
                 share: CoreShare | None = None, arrived: Callable[[Any], None] | None = None) -> None:
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.work, self.arrived = work, arrived
        self.share = share or CoreShare(usable_cores())
        self.thread = threading.Thread(target=self._run, name="ttd-records", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def _run(self) -> None:
        while (ran := self.queue.get()) is not None:
            if self.error is None:
                try:
                    if self.arrived is not None:
                        self.arrived(ran)
                    with self.share.helper():
                        self.work(ran)
                except BaseException as error:  # noqa: BLE001 - handed to the main thread
                    self.error = error

    def put(self, ran: Any) -> None:
        if self.thread is None:
            if self.arrived is not None:
                self.arrived(ran)
            self.work(ran)
            return
        self._raise()
        self.queue.put(ran)

    def close(self) -> None:
        """Wait for the queued batches, then raise what the stage raised, if anything."""
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def open_job_output(output: Path, description: dict, options: JobOptions):
    """The writer and the summary of a job (shard and output format checked first)."""
    check_shard(options.shard, options.num_shards)
    writer = open_output(output, description, options.resume, options.output_format, options.rows_per_file)
    summary = JobSummary(Path(output), writer.done.lines, writer.done.lines, Counter(writer.done.errors))
    summary.already_complete = writer.complete
    return writer, summary


def step_destination(step: Step, tagger: Tagger):
    """Where a step wants its decoded batches to land (ttd.jobs.decoding.Destination), if anywhere."""
    destination = getattr(step, "destination", None)
    return destination(tagger) if destination is not None else None


def run_job(tagger: Tagger, step: Step, items: Iterable[Item], output: Path, job: dict | None = None,
            options: JobOptions = JobOptions(), inputs: Sequence[Path] = (),
            explicit_images: Sequence[Path] = ()) -> JobSummary:
    """Run `step` over a stream of items into `output`, exactly once per item even across kills.

    `job` describes what else makes the records (model, score, inputs); with the step's own
    description it is what a `resume` must match. `inputs` (captions, vocabulary files) and
    `explicit_images` are refused as the output: writing it would destroy them."""
    output = Path(output)
    check_shard(options.shard, options.num_shards)
    refuse_input_as_output(output, [Item(str(p), Path(p), None) for p in explicit_images if Path(p).is_file()], inputs)
    counted = CountedItems(refusing_output(items, output))
    description = {**(job or {}), "shard": options.shard, "num_shards": options.num_shards, **step.description()}
    step = step.bound(tagger, options.progress)  # before the output is touched: its errors lose nothing
    writer, summary = open_job_output(output, description, options)
    if summary.already_complete:
        writer.close()
        return summary
    total = job_total(inputs) if options.total is None else options.total
    mine = None if total is None else len(range(options.shard, total, options.num_shards))
    started = time.perf_counter()
    try:
        workers = default_decode_workers() if options.decode_workers is None else options.decode_workers
        with tqdm(total=mine, initial=summary.resumed, disable=not options.progress, unit="img", smoothing=0.1) as bar:
            decoding: dict[str, float] = {}  # this thread's stages; `recording`: the record stage's
            recording: dict[str, float] = {}
            mine_items = announced(select_shard(counted, options.shard, options.num_shards, skip=summary.resumed), step)
            share = CoreShare(usable_cores())  # the model's thread keeps a core (ttd/jobs/core_share.py)
            batches = decoded_batches(mine_items,
                                      options.batch_size, workers, step.decoder(tagger), options.prefetch,
                                      options.decoding_pool, decoding, step_destination(step, tagger), share)

            def write(ran: Any) -> None:
                started, cpu = time.perf_counter(), time.thread_time()
                records = step.records(tagger, ran)
                built = time.perf_counter()
                writer.write(records)
                own = getattr(ran, "stages", None) or {}
                add_stages(recording, {**own, "host": built - started,
                                       "write": time.perf_counter() - built, "record_cpu": time.thread_time() - cpu})
                summary.add(records)
                bar.update(len(records))

            arrived = getattr(step, "arrived", None)
            stage = _RecordStage(write, _thread_safe(tagger), share=share, arrived=arrived)
            main_started = time.thread_time()
            try:
                for batch, outcomes in batches:
                    submitted = time.perf_counter()
                    with share.model():
                        ran = step.run(tagger, batch, outcomes)
                    add_stages(decoding, {"submit": time.perf_counter() - submitted})
                    stage.put(ran)
            finally:
                add_stages(decoding, {"main_cpu": time.thread_time() - main_started})
                share.close()
                stage.close()
                add_stages(summary.stages, decoding)
                add_stages(summary.stages, recording)
        refuse_no_items(counted.count, output)
        writer.finish()
    finally:
        writer.close()
        summary.seconds = time.perf_counter() - started
    return summary
