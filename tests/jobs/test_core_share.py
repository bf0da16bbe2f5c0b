"""The model's thread keeps a core: a job's helpers (decoding thread, record stage) compute only on
the cores the model does not need (ttd/jobs/core_share.py), and the runner wires all three in."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ttd.data.inputs import Item
from ttd.jobs.core_share import CoreShare

WAIT = 5.0  # seconds an event that must happen may take (a hung share fails instead of hanging the suite)
NOT_YET = 0.2  # seconds a helper that must wait is given to (wrongly) get in


def _helper_thread(share: CoreShare, entered: threading.Event, leave: threading.Event) -> threading.Thread:
    def work() -> None:
        with share.helper():
            entered.set()
            leave.wait(WAIT)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_while_the_model_runs_helpers_share_the_other_cores():
    share = CoreShare(2)
    first, second = threading.Event(), threading.Event()
    first_leaves, second_leaves = threading.Event(), threading.Event()
    with share.model():
        a = _helper_thread(share, first, first_leaves)
        assert first.wait(WAIT), "one helper computes beside the model on two cores"
        b = _helper_thread(share, second, second_leaves)
        assert not second.wait(NOT_YET), "a second helper took the model's core"
        first_leaves.set()
        assert second.wait(WAIT), "the second helper gets the core the first one freed"
    second_leaves.set()
    a.join(WAIT), b.join(WAIT)


def test_while_the_model_waits_helpers_use_every_core():
    share = CoreShare(2)
    first, second, leave = threading.Event(), threading.Event(), threading.Event()
    threads = [_helper_thread(share, first, leave), _helper_thread(share, second, leave)]
    assert first.wait(WAIT) and second.wait(WAIT), "two helpers compute at once when the model does not"
    leave.set()
    for thread in threads:
        thread.join(WAIT)


def test_on_one_core_a_helper_waits_for_the_model_and_the_model_never_waits():
    share = CoreShare(1)
    entered, leave = threading.Event(), threading.Event()
    with share.model():
        thread = _helper_thread(share, entered, leave)
        assert not entered.wait(NOT_YET), "a helper preempted the model on the only core"
    assert entered.wait(WAIT), "the helper runs once the model stops"
    model_ran = threading.Event()

    def model() -> None:
        with share.model():
            model_ran.set()

    threading.Thread(target=model, daemon=True).start()
    assert model_ran.wait(WAIT), "the model waited for a helper"
    leave.set()
    thread.join(WAIT)


class _Recorder:
    """How many helpers compute at each moment, and the most that started computing while the
    model computed (a helper already computing when the model starts finishes its work: the share
    preempts nothing)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.helpers = 0
        self.model_busy = False
        self.most_beside_model = 0
        self.beside_model = 0  # model calls that saw a helper compute beside them

    def helping(self, seconds: float) -> None:
        with self.changed:
            self.helpers += 1
            if self.model_busy:
                self.most_beside_model = max(self.most_beside_model, self.helpers)
            self.changed.notify_all()
        time.sleep(seconds)  # holds no GIL: without the share every helper would compute at once
        with self.changed:
            self.helpers -= 1

    def model(self) -> None:
        """The model computes for 30 ms once a helper computes beside it (or 0.1 s passed: none had work)."""
        with self.changed:
            self.model_busy = True
            if self.changed.wait_for(lambda: self.helpers > 0, 0.1):
                self.beside_model += 1
        time.sleep(0.03)
        with self.changed:
            self.model_busy = False


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

    def records(self, tagger, batch) -> list[dict]:
        self.recorder.helping(0.03)
        return [{"index": position, "image": item.image} for position, item in batch]


def test_a_job_never_runs_more_helpers_beside_the_model_than_the_cores_it_leaves(tmp_path, monkeypatch):
    import ttd.jobs.runner as runner

    monkeypatch.setattr(runner, "usable_cores", lambda: 2)
    recorder = _Recorder()
    items = [Item(f"{i}.png", Path(tmp_path / f"{i}.png"), None) for i in range(24)]
    tagger = SimpleNamespace(backend=SimpleNamespace(name="torch"))  # a backend whose record stage is a thread
    summary = runner.run_job(tagger, _BusyStep(recorder), iter(items), tmp_path / "out.jsonl", {},
                             runner.JobOptions(2, 0, progress=False))
    assert summary.items == 24
    assert recorder.beside_model >= 6, "helpers worked while the model computed (the job stays pipelined)"
    assert recorder.most_beside_model == 1, "two helpers computed beside the model on two cores"


@pytest.mark.parametrize("cores", [1, 2])
def test_a_job_finishes_on_any_number_of_cores(tmp_path, monkeypatch, cores):
    """With one core a helper computes only while the model waits: the job still ends."""
    import ttd.jobs.runner as runner

    monkeypatch.setattr(runner, "usable_cores", lambda: cores)
    recorder = _Recorder()

    class Quick(_BusyStep):
        def run(self, tagger, batch, outcomes):
            return batch

    items = [Item(f"{i}.png", Path(tmp_path / f"{i}.png"), None) for i in range(10)]
    tagger = SimpleNamespace(backend=SimpleNamespace(name="torch"))
    summary = runner.run_job(tagger, Quick(recorder), iter(items), tmp_path / "out.jsonl", {},
                             runner.JobOptions(3, 0, progress=False))
    assert summary.items == 10
    assert [line.count('"index"') for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [1] * 10


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
