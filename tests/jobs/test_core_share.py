"""The model's thread keeps a core: a job's helpers (decoding thread, record stage) compute only on
the cores the model does not need (ttd/jobs/core_share.py), and the runner wires all three in."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from ttd.data.inputs import Item
from ttd.jobs.core_share import CoreShare

WAIT = 5.0  # seconds an event that must happen may take (a hung share fails instead of hanging the suite)
NOT_YET = 0.2  # seconds a helper that must wait is given to (wrongly) get in


@dataclass
class _Helper:
    entered: threading.Event  # set once the helper computes (got a core)
    leave: threading.Event  # set to end its work


@contextmanager
def _helper_thread(share: CoreShare) -> Iterator[_Helper]:
    """A helper thread that asks `share` for a core and keeps it until told to leave (or the block ends)."""
    helper = _Helper(threading.Event(), threading.Event())

    def work() -> None:
        with share.helper():
            helper.entered.set()
            helper.leave.wait(WAIT)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield helper
    finally:
        helper.leave.set()
        thread.join(WAIT)


def test_while_the_model_runs_helpers_share_the_other_cores():
    share = CoreShare(2)
    with share.model(), _helper_thread(share) as first:
        assert first.entered.wait(WAIT), "one helper computes beside the model on two cores"
        with _helper_thread(share) as second:
            assert not second.entered.wait(NOT_YET), "a second helper took the model's core"
            first.leave.set()
            assert second.entered.wait(WAIT), "the second helper gets the core the first one freed"


def test_while_the_model_waits_helpers_use_every_core():
    share = CoreShare(2)
    with _helper_thread(share) as first, _helper_thread(share) as second:
        assert first.entered.wait(WAIT) and second.entered.wait(WAIT), \
            "two helpers compute at once when the model does not"


def test_on_one_core_a_helper_waits_for_the_model_and_the_model_never_waits():
    share = CoreShare(1)
    with ExitStack() as stack:
        with share.model():
            helper = stack.enter_context(_helper_thread(share))
            assert not helper.entered.wait(NOT_YET), "a helper preempted the model on the only core"
        assert helper.entered.wait(WAIT), "the helper runs once the model stops"
        model_ran = threading.Event()

        def model() -> None:
            with share.model():
                model_ran.set()

        threading.Thread(target=model, daemon=True).start()
        assert model_ran.wait(WAIT), "the model waited for a helper"


class _WatchedShare(CoreShare):
    """The runner's share, each helper's admission seen as it is decided (under the share's lock)."""

    def __init__(self, cores: int) -> None:
        super().__init__(cores)
        self.most_beside_model = 0  # the most helpers computing at once after one was let in beside the model

    def _admits(self) -> bool:
        admitted = super()._admits()
        if admitted and self._model_busy:
            self.most_beside_model = max(self.most_beside_model, self._helpers + 1)
        return admitted


class _Recorder:
    """How many helpers compute at each moment; which thread awaited each batch's device work."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.helpers = 0
        self.beside_model = 0  # model calls that saw a helper compute beside them
        self.arrivals: list[tuple[int, str]] = []  # (first position of the batch, the thread that awaited it)

    def helping(self, seconds: float) -> None:
        with self.changed:
            self.helpers += 1
            self.changed.notify_all()
        time.sleep(seconds)  # holds no GIL: without the share every helper would compute at once
        with self.changed:
            self.helpers -= 1

    def model(self) -> None:
        """The model computes for 30 ms once a helper computes beside it (or 0.1 s passed: none had work)."""
        with self.changed:
            if self.changed.wait_for(lambda: self.helpers > 0, 0.1):
                self.beside_model += 1
        time.sleep(0.03)


class _BusyStep:
    """A step whose model, decoding and record work only say when they run."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def description(self) -> dict:
        return {}

    def bound(self, tagger, progress=False):
        return self

    def decoder(self, tagger):
        def decode(items: list[Item]) -> list:
            self.recorder.helping(0.02)
            return [item.image for item in items]
        return decode

    def run(self, tagger, batch, outcomes):
        self.recorder.model()
        return batch

    def arrived(self, batch) -> None:
        recorder = self.recorder
        with recorder.changed:
            recorder.arrivals.append((batch[0][0], threading.current_thread().name))

    def records(self, tagger, batch) -> list[dict]:
        self.recorder.helping(0.03)
        return [{"index": position, "image": item.image} for position, item in batch]


def _run_busy_job(tmp_path, monkeypatch, step: _BusyStep, cores: int, items: int, batch: int,
                  backend: str = "torch"):
    import ttd.jobs.runner as runner

    monkeypatch.setattr(runner, "usable_cores", lambda: cores)
    shares: list[_WatchedShare] = []
    monkeypatch.setattr(runner, "CoreShare", lambda n: shares.append(_WatchedShare(n)) or shares[-1])
    tagger = SimpleNamespace(backend=SimpleNamespace(name=backend))  # torch: the record stage is a thread
    listed = [Item(f"{i}.png", Path(tmp_path / f"{i}.png"), None) for i in range(items)]
    summary = runner.run_job(tagger, step, iter(listed), tmp_path / "out.jsonl", {},
                             runner.JobOptions(batch, 0, progress=False))
    assert summary.items == items
    assert [line.count('"index"') for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [1] * items
    return shares[0]


def test_a_job_never_lets_more_helpers_beside_the_model_than_the_cores_it_leaves(tmp_path, monkeypatch):
    recorder = _Recorder()
    share = _run_busy_job(tmp_path, monkeypatch, _BusyStep(recorder), cores=2, items=24, batch=2)
    assert recorder.beside_model >= 6, "helpers worked while the model computed (the job stays pipelined)"
    assert share.most_beside_model == 1, "two helpers computed beside the model on two cores"


@pytest.mark.parametrize("backend", ["torch", "tensorrt"])
def test_each_batch_is_awaited_once_before_its_records(tmp_path, monkeypatch, backend):
    """`arrived` runs once per batch, before its records and outside the core it would hold up: in the
    record stage's thread, or where the backend keeps records in the model's thread, in that one."""
    recorder = _Recorder()
    _run_busy_job(tmp_path, monkeypatch, _BusyStep(recorder), cores=2, items=12, batch=3, backend=backend)
    assert [position for position, _ in recorder.arrivals] == [0, 3, 6, 9]
    threads = {thread for _, thread in recorder.arrivals}
    assert threads == ({"ttd-records"} if backend == "torch" else {threading.current_thread().name})


@pytest.mark.parametrize("cores", [1, 2])
def test_a_job_finishes_on_any_number_of_cores(tmp_path, monkeypatch, cores):
    """With one core a helper computes only while the model waits: the job still ends."""

    class Quick(_BusyStep):
        def run(self, tagger, batch, outcomes):
            return batch

    share = _run_busy_job(tmp_path, monkeypatch, Quick(_Recorder()), cores=cores, items=10, batch=3)
    # the job closed its share: after its end no helper waits, even on one busy core
    with share.model(), _helper_thread(share) as helper:
        assert helper.entered.wait(WAIT), "the job left its share open"


def test_a_closed_share_lets_every_waiting_helper_go():
    """At a job's end (or an interrupt) no helper waits for a core behind a stuck record stage."""
    share = CoreShare(1)
    with share.model(), _helper_thread(share) as helper:
        assert not helper.entered.wait(NOT_YET)
        share.close()
        assert helper.entered.wait(WAIT), "a helper still waited after the job ended"


def test_the_record_stage_waits_for_the_device_before_it_takes_a_core():
    """A batch the device still computes is awaited (`arrived`) without a core: on one core, while
    the model computes, the record stage may wait on the device but not build records."""
    from ttd.jobs.runner import _RecordStage

    share, calls, arrived = CoreShare(1), [], threading.Event()

    def arrive(ran) -> None:
        calls.append(("arrived", ran))
        arrived.set()

    stage = _RecordStage(lambda ran: calls.append(("records", ran)), share=share, arrived=arrive)
    with share.model():
        stage.put(7)
        assert arrived.wait(WAIT), "waiting on the device needed a core"
        time.sleep(NOT_YET)
        assert calls == [("arrived", 7)], "records were built on the model's core"
    stage.close()
    assert calls == [("arrived", 7), ("records", 7)]
