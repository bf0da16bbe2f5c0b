"""The persistent decoding pool: torch-free workers, images through shared
memory, one pool reused by several jobs with the records of decoding in a thread."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttd.data.items import open_items
from ttd.data.world import make_sample
from ttd.jobs import decoding
from ttd.jobs.decoding import DecodingPool, default_decode_workers
from ttd.jobs.stream_job import tag_stream


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pool")
    rows = []
    for i in range(14):
        sample = make_sample(2, i, 96)
        Image.fromarray(sample.image).save(folder / f"{i:03d}.jpg", quality=90)
        rows.append({"image": f"{i:03d}.jpg" if i != 5 else "gone.jpg", "caption": sample.caption})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_default_workers_leave_two_cores_and_small_machines_decode_in_a_thread(monkeypatch):
    """Counted on the cores this process may use (its affinity), not the machine's: a 64-core host
    that gives a job 4 cores gets 2 workers, not 62."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    for cores, workers in ((2, 0), (3, 0), (4, 2), (16, 14)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_decode_workers() == workers


def test_one_pool_serves_several_jobs_through_shared_memory_without_torch(captions, tmp_path):
    from ttd.runtime import load_tagger

    tagger = load_tagger("torch", device="cpu")
    threaded = tag_stream(tagger, open_items(captions), tmp_path / "thread.jsonl", batch_size=4, progress=False,
                          decode_workers=0)
    assert threaded.items == 14
    want = (tmp_path / "thread.jsonl").read_bytes()
    with DecodingPool(2) as pool:
        pids = None
        for run in range(2):
            out = tmp_path / f"pool{run}.jsonl"
            summary = tag_stream(tagger, open_items(captions), out, batch_size=4, progress=False, decoding_pool=pool)
            assert out.read_bytes() == want
            assert summary.stages["decode"] > 0
            assert pool.row_shape == (64, 64, 3) and len([s for s in pool.slots if s is not None]) >= 2
            started = set(pool.executor._processes)
            assert pids is None or started == pids  # the same processes: started once, reused
            pids = started
        modules = [pool.executor.submit(decoding.loaded_modules).result() for _ in range(4)]
        assert all("ttd.jobs.decode_items" in m and "PIL.Image" in m for m in modules)
        assert not any("torch" in m for m in modules)
        names = [slot.block.name for slot in pool.slots if slot is not None]
    assert not pool.alive
    for name in names:  # the blocks are gone with the pool
        assert not Path("/dev/shm", name.lstrip("/")).exists()


def test_the_decoding_thread_works_on_the_next_batch_while_the_model_runs_this_one():
    """workers = 0 (the small-machine default): batch 2 is decoding while batch 1 is handed out."""
    import threading

    from ttd.data.inputs import Item

    seen, started = [], threading.Event()

    def prepare(items):
        seen.append(items[0].image)
        if len(seen) == 2:
            started.set()
        return [item.image for item in items]

    items = [(i, Item(f"{i}.png", Path(f"{i}.png"), None)) for i in range(6)]
    batches = decoding.decoded_batches(items, 2, 0, prepare, prefetch=2)
    first = next(batches)
    assert [p for p, _ in first[0]] == [0, 1]
    assert started.wait(5.0) and seen == ["0.png", "2.png"]  # before the consumer asked for it
    rest = [outcomes for _, outcomes in batches]
    assert rest == [["2.png", "3.png"], ["4.png", "5.png"]]


def _read_raw(items):
    """A worker's decode that reads its files as they are (here: a FIFO with no writer, which hangs)."""
    return [item.path.read_bytes() for item in items]


def test_a_timeout_while_waiting_for_workers_ends_the_job_and_is_not_a_worker_failure(tmp_path):
    """A step limit (SIGALRM) raised while the job waits on a hung decode must reach the caller at
    once: not be taken for a dead worker (then decoding would go on in this process without
    limit), and not wait for the hung worker on the way out (docs/gpu.md, the GPU check)."""
    import signal
    import threading
    import time
    import warnings

    from ttd.data.inputs import Item

    fifo = tmp_path / "stalled.png"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a decode that hangs

    def release():  # the safety net that keeps a red run from hanging the suite
        descriptor = os.open(fifo, os.O_WRONLY)
        os.close(descriptor)

    prepare = _read_raw
    items = [(0, Item("stalled.png", fifo, None))]

    def alarm(signum, frame):
        raise TimeoutError("the step ran past its limit")

    previous = signal.signal(signal.SIGALRM, alarm)
    safety = threading.Timer(20.0, release)
    safety.start()
    try:
        with DecodingPool(1) as pool, warnings.catch_warnings():
            warnings.simplefilter("error")  # a "decoding workers failed" warning fails the test
            pool.executor.submit(decoding.loaded_modules).result()  # the worker is up
            started = time.perf_counter()
            signal.alarm(2)
            with pytest.raises(TimeoutError):
                list(decoding.decoded_batches(items, 1, 1, prepare, pool=pool))
            waited = time.perf_counter() - started
            assert not pool.alive  # its hung worker was terminated, not waited for
        assert waited < 10.0
        assert safety.is_alive()  # ended by the timeout, not by the safety net's release
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if safety.is_alive():
            safety.cancel()


def test_a_pool_batch_lands_in_the_backends_upload_slot_and_is_not_copied_again(captions, tmp_path):
    """One host copy per batch: the pool's images are copied out of shared memory once, into the
    memory the backend stages uploads from (a pinned slot on a GPU; here plain arrays in its place),
    and that very memory is what the backend is handed: no np.stack, no second staging copy."""
    from ttd.runtime import load_tagger

    tagger = load_tagger("torch", device="cpu")
    want_path = tmp_path / "thread.jsonl"
    tag_stream(tagger, open_items(captions), want_path, batch_size=2, progress=False, decode_workers=0)
    slots = []

    def staging(shape):  # the stand-in for UploadSlots.staging's pinned memory (a CUDA allocation)
        slots.append(np.empty(shape, np.uint8))
        return slots[-1]

    handed = []
    submit = tagger.backend.submit

    def recording_submit(images, *rest, **options):
        handed.append(images)
        return submit(images, *rest, **options)

    tagger.backend.staging, tagger.backend.submit = staging, recording_submit
    with DecodingPool(1) as pool:
        out = tmp_path / "pool.jsonl"
        tag_stream(tagger, open_items(captions), out, batch_size=2, progress=False, decoding_pool=pool)
    assert out.read_bytes() == want_path.read_bytes()
    # every host copy of an image batch is a staging call, one per batch: 0-1 and 2-3 were sent
    # before the pool knew the image shape, so they travel pickled and are stacked once; 4-5 ...
    # 12-13 are copied out of shared memory once, and that very memory (for 4-5, whose item 5 is
    # missing, the row of item 4 in it) is what the backend is handed
    assert [len(images) for images in handed] == [2, 2, 1, 2, 2, 2, 2]
    assert [slot.shape[0] for slot in slots] == [2] * 7
    for images, slot in zip(handed, slots, strict=True):
        assert images.base is slot or images is slot
