"""A graph run as one TorchScript trace: a forward is one native call that holds the GIL only to
enter and leave, where eager PyTorch takes the GIL back between every two operators — so any
busy Python thread beside it (a job's decoding or record stage) stalls each operator by up to
the interpreter's switch interval (measured: docs/benchmarks.md, P9 fourth round).

Tracing costs a few hundred milliseconds, so it pays only where a graph runs many times: a graph
is traced once it has spent TRACE_AFTER_S seconds in eager calls, and then only for shapes that
recur (MIN_CALLS); a short job or a one-off call never pays for it. The trace must compute exactly
what the graph computes: a shape's check runs it eagerly and traced CHECK_RUNS times, and only a
shape whose traced outputs were the eager ones bit for bit every time runs traced from then on; a
trace that cannot be made, or differs, leaves the graph eager (the records never change).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

# TorchScript's executor profiles a shape's first run and optimises the graph from the next one
# (and may fuse operators on a GPU): the check covers the runs after the first too
CHECK_RUNS = 3
TRACE_AFTER_S = 0.5  # eager seconds before tracing: a few times what a trace costs (world: ~0.2 s)
MIN_CALLS = 2  # a shape is traced from its second call on (a shape seen once may never come again)

Key = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


def _key(inputs: tuple[torch.Tensor, ...]) -> Key:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _identical(eager, traced) -> bool:
    eager, traced = _outputs(eager), _outputs(traced)
    return len(eager) == len(traced) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(eager, traced))


class TracedGraph:
    """`graph` (an nn.Module of tensors in, a tensor or a tuple of tensors out), traced on its
    first call and checked against itself per input shape (see the module's docstring)."""

    def __init__(self, graph: nn.Module, trace: Callable[..., torch.jit.ScriptModule] | None = None,
                 after_seconds: float = TRACE_AFTER_S, min_calls: int = MIN_CALLS,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.graph = graph
        self.after_seconds, self.min_calls, self._clock = after_seconds, min_calls, clock
        self._trace_with = trace or _trace
        self._trace: torch.jit.ScriptModule | None = None
        self._failed = False
        self._checked: dict[Key, bool] = {}  # input shape -> its trace gives the eager bits
        self._calls: dict[Key, int] = {}  # input shape -> calls before its check
        self._eager_s = 0.0  # seconds spent in eager calls (on a GPU: launching them)

    @property
    def traced_shapes(self) -> list[Key]:
        """The input shapes run traced (checked identical)."""
        return [key for key, same in self._checked.items() if same]

    def __getattr__(self, name: str):
        """The graph's own attributes (its model, what it accepts) read through the wrapper."""
        if name == "graph":  # not set yet (an object being built or unpickled)
            raise AttributeError(name)
        return getattr(self.graph, name)

    def __call__(self, *inputs: torch.Tensor):
        key = _key(inputs)
        same = self._checked.get(key)
        if same:
            return self._trace(*inputs)  # type: ignore[misc]
        if same is not None or self._failed:
            return self.graph(*inputs)
        started = self._clock()
        eager = self.graph(*inputs)
        self._eager_s += self._clock() - started
        self._calls[key] = self._calls.get(key, 0) + 1
        if self._calls[key] < self.min_calls or self._eager_s < self.after_seconds:
            return eager
        if self._trace is None:
            try:
                self._trace = self._trace_with(self.graph, inputs)
            except Exception:  # noqa: BLE001 - a graph the tracer cannot follow stays eager
                self._failed = True
                return eager
        try:
            self._checked[key] = all(_identical(eager, self._trace(*inputs)) for _ in range(CHECK_RUNS))
        except Exception:  # noqa: BLE001 - a shape the trace cannot run stays eager
            self._checked[key] = False
        return eager


def _trace(graph: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    # traced outside inference mode (the tracer records through autograd's dispatch), from copies
    # of the inputs: an inference-mode tensor cannot be used there
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice and tracer hints: the check decides
        example = tuple(t.clone() for t in inputs)
        return torch.jit.trace(graph, example, check_trace=False)
