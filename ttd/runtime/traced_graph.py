"""A graph run as one TorchScript trace: a forward is one native call that holds the GIL only to
enter and leave, where eager PyTorch takes the GIL back between every two operators — so any
busy Python thread beside it (a job's decoding or record stage) stalls each operator by up to
the interpreter's switch interval (measured: docs/benchmarks.md, P9 fourth round).

Tracing a shape costs a few hundred milliseconds, so it pays only where that shape runs many
times: a shape is traced at its own inputs once its eager calls have taken TRACE_AFTER_S seconds
(and it has recurred: MIN_CALLS), so tracing never costs more than a fraction of the time already
spent, and a short job or a one-off call never pays for it.

The trace must compute exactly what the graph computes: a shape's trace is run CHECK_RUNS times
beside its eager call, and is used from then on only if its outputs were the eager ones bit for
bit every time; a trace that cannot be made, or differs, leaves that shape eager (the records
never change).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

# TorchScript's executor profiles a shape's first run and optimises the graph from the next one
# (and may fuse operators on a GPU): the check covers the runs after the first too
CHECK_RUNS = 3
TRACE_AFTER_S = 0.5  # a shape's eager seconds before it is traced: about twice a trace and its check (world: ~0.25 s)
MIN_CALLS = 2  # a shape is traced at its second call at the earliest (one seen once may never come again)

Key = tuple


def _key(inputs: tuple[torch.Tensor, ...]) -> Key:
    """The inputs' shapes, dtypes and devices, and the grad mode (a trace checked without grad is
    not the eager graph under autograd)."""
    return (*((tuple(t.shape), t.dtype, t.device) for t in inputs), torch.is_grad_enabled())


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _identical(eager, traced) -> bool:
    eager, traced = _outputs(eager), _outputs(traced)
    return len(eager) == len(traced) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(eager, traced))


class TracedGraph:
    """`graph` (an nn.Module of tensors in, a tensor or a tuple of tensors out), each recurring
    input shape traced and checked against the eager graph on its own (see the module's
    docstring). May be called from several threads: a shape is traced and checked once, under a lock."""

    def __init__(self, graph: nn.Module, trace: Callable[..., torch.jit.ScriptModule] | None = None,
                 after_seconds: float = TRACE_AFTER_S, min_calls: int = MIN_CALLS,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.graph = graph
        self.after_seconds, self.min_calls, self._clock = after_seconds, min_calls, clock
        self._trace_with = trace or _trace
        self._lock = threading.Lock()
        self._traces: dict[Key, torch.jit.ScriptModule | None] = {}  # shape -> its checked trace, or None: eager
        self._calls: dict[Key, int] = {}  # input shape -> calls before its check
        self._eager_s: dict[Key, float] = {}  # input shape -> seconds in its eager calls (on a GPU: launching them)

    @property
    def traced_shapes(self) -> list[Key]:
        """The input shapes run traced (checked identical)."""
        return [key for key, trace in self._traces.items() if trace is not None]

    def __getattr__(self, name: str):
        """The graph's own attributes (its model, what it accepts) read through the wrapper."""
        if name == "graph":  # not set yet (an object being built or unpickled)
            raise AttributeError(name)
        return getattr(self.graph, name)

    def __call__(self, *inputs: torch.Tensor):
        key = _key(inputs)
        if key in self._traces:
            trace = self._traces[key]
            return self.graph(*inputs) if trace is None else trace(*inputs)
        started = self._clock()
        eager = self.graph(*inputs)
        self._eager_s[key] = self._eager_s.get(key, 0.0) + self._clock() - started
        self._calls[key] = self._calls.get(key, 0) + 1
        if self._calls[key] >= self.min_calls and self._eager_s[key] >= self.after_seconds:
            with self._lock:
                if key not in self._traces:
                    self._traces[key] = self._checked_trace(inputs, eager)
        return eager

    def _checked_trace(self, inputs: tuple[torch.Tensor, ...], eager) -> torch.jit.ScriptModule | None:
        """The trace of the graph at these inputs if its runs give `eager`'s bits, else None."""
        try:
            trace = self._trace_with(self.graph, inputs)
            same = all(_identical(eager, trace(*inputs)) for _ in range(CHECK_RUNS))
        except Exception:  # noqa: BLE001 - a graph or shape the tracer cannot follow stays eager
            return None
        return trace if same else None


def _trace(graph: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    # traced outside inference mode (the tracer records through autograd's dispatch), from copies
    # of the inputs: an inference-mode tensor cannot be used there
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice and tracer hints: the check decides
        example = tuple(t.clone() for t in inputs)
        return torch.jit.trace(graph, example, check_trace=False)
