"""Decoding ahead of the model with a bounded queue: worker processes (or, with none, one thread
of this process) decode and resize the next batches while the runtime runs the current one, and
at most `prefetch` batches are in flight, so memory stays bounded however long the input stream is.

Batches come out full (batch_size items, the last one excepted) and in input order.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice

from ttd.data.inputs import Item

Positioned = list[tuple[int, Item]]


def default_decode_workers() -> int:
    """Decoding processes: none on small machines (the main process decodes), else cores − 1, at most 8.

    Processes, not threads: with threads, Python-level decoding work holds the GIL and starves
    the thread that feeds the GPU (measured on an H200 host: 8 threads ran no faster than one)."""
    cores = os.cpu_count() or 1
    return 0 if cores < 4 else min(8, cores - 1)


def decoded_batches(items: Iterable[tuple[int, Item]], batch_size: int, workers: int, prepare: Callable[[list[Item]], list],
                    prefetch: int = 2) -> Iterator[tuple[Positioned, list]]:
    """(batch of (position, item), outcomes): each outcome is (uint8 image, tags or None, the image's own size) or the
    error message of that item, as `prepare` (e.g. ttd.jobs.tag_job.prepare_items with its settings bound)
    after the items).

    Each batch is split over `workers` spawned processes (spawn: the parent may hold CUDA state);
    workers = 0 decodes in one thread of this process instead (Pillow releases the GIL while it
    decodes and resizes, so the thread overlaps the model's native kernels; on a 2-core machine
    it is what the second core does; spawned processes would cost seconds of start-up). Up to
    `prefetch` batches are decoded ahead. A worker that dies (e.g. killed for memory) costs no
    item: the pool is dropped and the batches in flight are decoded here."""
    stream = iter(items)
    pool: Executor | None = (ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) if workers > 0
                             else ThreadPoolExecutor(1, thread_name_prefix="ttd-decode"))
    pending: deque[tuple[Positioned, list[Future]]] = deque()

    def submit(batch: Positioned) -> list[Future]:
        chunk = [item for _, item in batch]
        if pool is None:
            return []
        step = max(1, -(-len(chunk) // max(workers, 1)))
        return [pool.submit(prepare, chunk[i : i + step]) for i in range(0, len(chunk), step)]

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

    try:
        while True:
            while failure is None and len(pending) < (prefetch if pool is not None else 1):
                batch = read_batch()
                if not batch:
                    break
                pending.append((batch, submit(batch)))
            if not pending:
                if failure is not None:
                    raise failure
                return
            batch, futures = pending.popleft()
            chunk = [item for _, item in batch]
            if pool is None or not futures:
                yield batch, prepare(chunk)
                continue
            try:
                outcomes = [outcome for future in futures for outcome in future.result()]
            except Exception as error:  # noqa: BLE001 - a dead worker: decode here from now on
                warnings.warn(f"decoding workers failed ({type(error).__name__}: {error}); decoding in this process")
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
                outcomes = prepare(chunk)
            yield batch, outcomes
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
