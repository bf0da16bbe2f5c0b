"""A graph run as one TorchScript trace: a forward is one native call that holds the GIL only to
enter and leave, where eager PyTorch takes the GIL back between every two operators — so any
busy Python thread beside it (a job's decoding or record stage) stalls each operator by up to
the interpreter's switch interval (measured: docs/benchmarks.md, P9 fourth round).

The trace must compute exactly what the graph computes: a shape's first TRACE_AFTER - 1 calls run
eagerly (a short job or a one-off call never pays for tracing), the next one runs eagerly and
traced CHECK_RUNS times, and only a shape whose traced outputs were the eager ones bit for bit
every time runs traced from then on; a trace that cannot be made, or differs, leaves the graph
eager (the records never change).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

# TorchScript's executor profiles a shape's first run and optimises the graph from the next one
# (and may fuse operators on a GPU): the check covers the runs after the first too
CHECK_RUNS = 3
TRACE_AFTER = 3  # a shape is traced at its third call: it recurs

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

    def __init__(self, graph: nn.Module, trace: Callable[..., torch.jit.ScriptModule] | None = None) -> None:
        self.graph = graph
        self._trace_with = trace or _trace
        self._trace: torch.jit.ScriptModule | None = None
        self._failed = False
        self._checked: dict[Key, bool] = {}  # input shape -> its trace gives the eager bits
        self._calls: dict[Key, int] = {}  # input shape -> calls before its check

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
        eager = self.graph(*inputs)
        self._calls[key] = self._calls.get(key, 0) + 1
        if self._calls[key] < TRACE_AFTER:
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
