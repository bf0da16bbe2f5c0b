"""Decoding ahead of the model with a bounded queue: worker processes (or, with none, one thread
of this process) decode and resize the next batches while the runtime runs the current one, and
at most `prefetch` batches are in flight, so memory stays bounded however long the input stream is.

Batches come out full (batch_size items, the last one excepted) and in input order.

The processes are a `DecodingPool`: started once, reused by every job given it (a job given
none and asked for workers starts its own and ends it). Its workers import no torch (they run
ttd.jobs.decode_items: Pillow and numpy), and hand decoded images back through shared memory
(one block per batch in flight), so only the items' small metadata is pickled.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from multiprocessing import shared_memory

import numpy as np

from ttd.data.inputs import Item
from ttd.errors import InputError
from ttd.jobs.core_share import CoreShare

Positioned = list[tuple[int, Item]]
# (shape) -> a uint8 array of that shape for a decoded batch to land in (None: a fresh one); the
# torch backend on a GPU gives its next pinned upload slot (ttd/runtime/device_pipeline.py)
Destination = Callable[[tuple[int, ...]], "np.ndarray | None"]


def usable_cores() -> int:
    """The CPUs this process may run on (os.sched_getaffinity where the OS has it), not the machine's."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def default_decode_workers() -> int:
    """Decoding processes: none on small machines (the main process decodes, in one thread), else
    cores − 2 (the main process feeds the device, the record stage builds and writes records).

    Processes, not threads: with threads, Python-level decoding work holds the GIL and starves
    the thread that feeds the GPU (measured on an H200 host: 8 threads ran no faster than one)."""
    cores = usable_cores()  # the cores this process may run on (a container's or a scheduler's share)
    return 0 if cores < 4 else cores - 2


# ---------------------------------------------------------------------------------------------
# what runs in a worker process (nothing here may import torch)

_ATTACHED: dict[str, shared_memory.SharedMemory] = {}  # per worker process: blocks it has mapped


def _block(name: str) -> shared_memory.SharedMemory:
    """The pool's shared block `name`, mapped once per worker process (a block is reused for
    every batch that passes through it; mapping it per batch would cost a system call each)."""
    if name not in _ATTACHED:
        _ATTACHED[name] = shared_memory.SharedMemory(name)
    return _ATTACHED[name]


def decode_into(prepare: Callable[[list[Item]], list], items: list[Item], block: str | None, first_row: int,
                row_shape: tuple[int, ...] | None) -> tuple[float, list]:
    """(seconds, outcomes) of `prepare(items)` in a worker: each decoded image of `row_shape` is
    written into rows first_row.. of the shared block and replaced by the marker `None`."""
    started = time.perf_counter()
    outcomes = prepare(items)
    if block is not None:
        rows = np.ndarray((first_row + len(items), *row_shape), np.uint8, buffer=_block(block).buf)
        for offset, outcome in enumerate(outcomes):
            if isinstance(outcome, tuple) and isinstance(outcome[0], np.ndarray) and outcome[0].shape == row_shape:
                rows[first_row + offset] = outcome[0]
                outcomes[offset] = (None, *outcome[1:])
    return time.perf_counter() - started, outcomes


def loaded_modules() -> list[str]:
    """The modules a worker has imported (what a test checks: no torch)."""
    import sys

    return sorted(sys.modules)


def _timed(prepare: Callable[[list[Item]], list], items: list[Item]) -> tuple[float, list]:
    started = time.perf_counter()
    outcomes = prepare(items)
    return time.perf_counter() - started, outcomes


# ---------------------------------------------------------------------------------------------
# the pool, in the main process


@dataclass
class _Slot:
    block: shared_memory.SharedMemory
    rows: int


class DecodingPool:
    """`workers` spawned decoding processes, started once and reused by every job given this pool.

    Spawned, not forked: the parent may hold CUDA state. The owner closes it (or uses it as a
    context manager); it serves one job at a time (jobs in turn, not at once: they would share
    its blocks). Images come back through a ring of shared-memory blocks, one per batch in
    flight; each batch's images are copied out of its block before the block is reused."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise InputError("a decoding pool needs at least one worker (0: decode in a thread of the job)")
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"))
        self.slots: list[_Slot] = []
        self.row_shape: tuple[int, ...] | None = None

    def __enter__(self) -> DecodingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self.executor is not None

    def close(self, wait: bool = True) -> None:
        """Stop the workers and free the blocks. wait=False does not wait for a decode in progress
        (a job aborted by a timeout or an interrupt): the workers are terminated instead."""
        if self.executor is not None:
            processes = list((getattr(self.executor, "_processes", None) or {}).values())
            self.executor.shutdown(wait=wait, cancel_futures=True)
            if not wait:
                for process in processes:
                    process.terminate()
            self.executor = None
        for slot in self.slots:
            slot.block.close()
            slot.block.unlink()
        self.slots = []

    def _slot(self, index: int, rows: int) -> _Slot | None:
        """Shared block `index` of the ring, large enough for `rows` images (once the image shape is known)."""
        if self.row_shape is None:
            return None
        while len(self.slots) <= index:
            self.slots.append(None)  # type: ignore[arg-type]
        slot = self.slots[index]
        if slot is None or slot.rows < rows:
            if slot is not None:
                slot.block.close()
                slot.block.unlink()
            size = max(1, rows * int(np.prod(self.row_shape)))
            slot = self.slots[index] = _Slot(shared_memory.SharedMemory(create=True, size=size), rows)
        return slot

    def submit(self, prepare: Callable[[list[Item]], list], chunk: list[Item], ring: int) -> tuple[_Slot | None, list[Future]]:
        """Decode `chunk` split over the workers, into the ring's block `ring`."""
        slot = self._slot(ring, len(chunk))
        step = max(1, -(-len(chunk) // self.workers))
        name = slot.block.name if slot is not None else None
        return slot, [self.executor.submit(decode_into, prepare, chunk[i : i + step], name, i, self.row_shape)
                      for i in range(0, len(chunk), step)]

    def collect(self, slot: _Slot | None, futures: list[Future], count: int,
                destination: Destination | None = None) -> tuple[float, list]:
        """(decoding seconds summed over the workers, outcomes) of a submitted chunk, its images
        copied out of the block in one copy into one batch array (`destination`'s, e.g. a pinned
        upload slot, when it gives one): each image is a row of that array, so the batch needs no
        other copy on its way to the device (ttd.jobs.stream_job.batch_images)."""
        seconds, outcomes = 0.0, []
        for future in futures:
            spent, part = future.result()
            seconds += spent
            outcomes.extend(part)
        images = None
        if slot is not None:
            shape = (count, *self.row_shape)
            images = destination(shape) if destination is not None else None
            images = np.empty(shape, np.uint8) if images is None else images
            np.copyto(images, np.ndarray(shape, np.uint8, buffer=slot.block.buf))
        for offset, outcome in enumerate(outcomes):
            if isinstance(outcome, tuple) and outcome[0] is None:
                outcomes[offset] = (images[offset], *outcome[1:])
            elif self.row_shape is None and isinstance(outcome, tuple) and isinstance(outcome[0], np.ndarray) \
                    and outcome[0].dtype == np.uint8:
                self.row_shape = outcome[0].shape  # the first batch travels pickled; later ones share memory
        return seconds, outcomes


def decoded_batches(items: Iterable[tuple[int, Item]], batch_size: int, workers: int, prepare: Callable[[list[Item]], list],
                    prefetch: int = 2, pool: DecodingPool | None = None,
                    stages: dict[str, float] | None = None,
                    destination: Destination | None = None,
                    share: CoreShare | None = None) -> Iterator[tuple[Positioned, list]]:
    """(batch of (position, item), outcomes): each outcome is (uint8 image, tags or None, the image's own size) or the
    error message of that item, as `prepare` (e.g. ttd.jobs.decode_items.prepare_items with its settings bound)
    after the items).

    Decoded by `pool` if given, else by a pool of `workers` processes started for this call;
    workers = 0 decodes in one thread of this process instead (Pillow releases the GIL while it
    decodes and resizes, so the thread overlaps the model's native kernels; on a 2-core machine
    it is what the second core does; spawned processes would cost seconds of start-up). Up to
    `prefetch` batches are decoded ahead. A worker that dies (e.g. killed for memory) costs no
    item: the pool is dropped and the batches in flight are decoded here. `stages` (if given)
    accumulates "decode" (seconds spent decoding, summed over workers) and "decode_wait" (seconds
    this thread waited for a decoded batch). `destination`: where a pool's batch lands (see
    DecodingPool.collect); the images of a batch are valid until the next batch is asked for.
    `share`: the cores the decoding thread shares with the model's (ttd/jobs/core_share.py)."""
    stream = iter(items)
    if pool is not None and not pool.alive:  # a pool broken by an earlier job's dead worker
        pool = None
    own_pool = pool is None and workers > 0
    if own_pool:
        pool = DecodingPool(workers)
    thread: Executor | None = ThreadPoolExecutor(1, thread_name_prefix="ttd-decode") if pool is None else None
    pending: deque[tuple[Positioned, _Slot | None, list[Future]]] = deque()
    ring = 0
    stages = {} if stages is None else stages

    def submit(batch: Positioned) -> tuple[_Slot | None, list[Future]]:
        nonlocal ring
        chunk = [item for _, item in batch]
        if pool is not None:
            ring = (ring + 1) % (prefetch + 1)  # a block is reused only after its batch was collected
            return pool.submit(prepare, chunk, ring)
        if thread is not None:
            return None, [thread.submit(share.helping, _timed, prepare, chunk) if share is not None
                          else thread.submit(_timed, prepare, chunk)]
        return None, []

    failure: Exception | None = None  # the input stream's error: raised after the batches read before it

    def read_batch() -> Positioned:
        nonlocal failure
        batch: Positioned = []
        try:
            for entry in islice(stream, batch_size):
                batch.append(entry)
        except Exception as error:  # noqa: BLE001 - re-raised once the batches before it are out
            failure = error
        return batch

    def add(name: str, seconds: float) -> None:
        stages[name] = stages.get(name, 0.0) + seconds

    aborted = False
    try:
        while True:
            while failure is None and len(pending) < (prefetch if pool is not None or thread is not None else 1):
                batch = read_batch()
                if not batch:
                    break
                pending.append((batch, *submit(batch)))
            if not pending:
                if failure is not None:
                    raise failure
                return
            batch, slot, futures = pending[0]
            chunk = [item for _, item in batch]
            waited = time.perf_counter()
            if not futures:
                seconds, outcomes = _timed(prepare, chunk)
            elif pool is None:
                seconds, outcomes = futures[0].result()
            else:
                try:
                    seconds, outcomes = pool.collect(slot, futures, len(chunk), destination)
                except BrokenProcessPool as error:  # a dead worker: decode here from now on
                    # only a dead worker: a timeout or interrupt raised while this thread waits
                    # (e.g. benchmarks/gpu_check.py's step limit) must end the job, not be taken
                    # for a worker failure and decode on without limit (docs/gpu.md)
                    warnings.warn(f"decoding workers failed ({type(error).__name__}: {error}); decoding in this process")
                    pool.close()
                    pool = None
                    pending = deque((b, None, []) for b, _, _ in pending)
                    seconds, outcomes = _timed(prepare, chunk)
            pending.popleft()
            add("decode_wait", time.perf_counter() - waited)
            add("decode", seconds)
            yield batch, outcomes
    except GeneratorExit:  # the consumer stopped early: an orderly end
        raise
    except BaseException:
        aborted = True  # raised here (a timeout, an interrupt, an input error): nothing waits on a worker
        raise
    finally:
        if thread is not None:
            thread.shutdown(wait=not aborted, cancel_futures=True)
        if pool is not None and aborted and any(not f.done() for _, _, futures in pending for f in futures):
            pool.close(wait=False)  # a decode in progress may hang (a stalled mount): end the workers
        elif own_pool and pool is not None:
            pool.close()
        elif pool is not None:  # a job that stops early: its batches in flight must not write into the next job's blocks
            for _, _, futures in pending:
                for future in futures:
                    if not future.cancel():
                        future.exception()
