"""The cores a job's threads compute on: the thread that runs the model keeps one.

A job runs the model in one thread and its helpers (the decoding thread, the record stage) in
others. Where there are fewer cores than busy threads, the OS shares them out evenly: three busy
threads on two cores each get two thirds of one, and the model's thread — the job's pace — loses
a third of its core whenever both helpers work at once. So a helper computes only on a core the
model does not need: every core but the model's while the model runs, every core while it waits
(for its next batch, or for room in the record queue); a helper that finds no core free waits for
one instead of preempting the model. Nothing is preempted either way: helpers already computing
when the model starts finish their piece of work (a batch's decoding or records). Records never
depend on it, only when each thread computes. Measured: docs/benchmarks.md, P9 fifth round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

Result = TypeVar("Result")


class CoreShare:
    """`cores` shared by one model thread (`model()`) and any number of helper threads (`helper()`)."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._changed = threading.Condition()
        self._helpers = 0  # helpers computing now
        self._model_busy = False
        self._closed = False

    @contextmanager
    def model(self) -> Iterator[None]:
        """The model's thread computes: it needs a core of its own, and never waits for one."""
        with self._changed:
            self._model_busy = True
        try:
            yield
        finally:
            with self._changed:
                self._model_busy = False
                self._changed.notify_all()

    @contextmanager
    def helper(self) -> Iterator[None]:
        """A helper computes, once a core the model does not need is free."""
        with self._changed:
            self._changed.wait_for(self._admits)
            self._helpers += 1
        try:
            yield
        finally:
            with self._changed:
                self._helpers -= 1
                self._changed.notify_all()

    def _admits(self) -> bool:
        """Whether a waiting helper may compute now (called under the share's lock)."""
        return self._closed or self._helpers < self.cores - self._model_busy

    def close(self) -> None:
        """The job is ending (finished, failed or interrupted): no helper waits for a core any more,
        so none holds up the job's end behind a record stage that is stuck or still draining."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def helping(self, work: Callable[..., Result], *args) -> Result:
        """`work(*args)` as a helper (for an executor's `submit`)."""
        with self.helper():
            return work(*args)
