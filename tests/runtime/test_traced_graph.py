"""The torch backend's image encoder runs as a TorchScript trace, each input shape checked bit for
bit against the eager graph first (ttd/runtime/traced_graph.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ttd.runtime import load_tagger
from ttd.runtime.traced_graph import TracedGraph


def _encoder_and_calls():
    """The world model's eager image encoder graph and a list that grows at each eager forward."""
    graph = load_tagger("torch", device="cpu").backend.image_encoder.graph
    calls: list[int] = []
    graph.register_forward_hook(lambda module, inputs, outputs: calls.append(len(inputs[0])))
    return graph, calls


def _at_third_call(graph, **options) -> TracedGraph:
    """A TracedGraph that traces a shape at its third call, whatever the time spent."""
    return TracedGraph(graph, after_seconds=0.0, min_calls=3, **options)


def _pixels(n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(n).standard_normal((n, 3, 64, 64)).astype(np.float32))


def test_a_recurring_shape_runs_traced_with_the_eager_graphs_bits():
    graph, calls = _encoder_and_calls()
    traced = _at_third_call(graph)
    eager_calls = []
    with torch.inference_mode():
        for n in (4, 4, 4, 4, 4, 3, 3, 3, 3, 7):
            want = graph(_pixels(n))  # the reference: one eager call
            before = len(calls)
            got = traced(_pixels(n))
            eager_calls.append(len(calls) - before)
            assert all(torch.equal(a, b) for a, b in zip(want, got)) and got[1].shape == (n, 128, 8, 8)
    # a shape's first two calls run eagerly; the third runs eagerly (the answer) and is checked
    # against its own trace's runs (tracing runs the graph once); every later call of a checked
    # shape runs the trace alone; a shape seen once is never traced
    assert eager_calls == [1, 1, 2, 0, 0, 1, 1, 2, 0, 1]
    assert [key[0][0] for key in traced.traced_shapes] == [(4, 3, 64, 64), (3, 3, 64, 64)]


def test_the_wrapper_reads_the_graphs_own_attributes():
    graph, _ = _encoder_and_calls()
    assert TracedGraph(graph).model is graph.model


@pytest.mark.parametrize("first_wrong_run", [1, 2])  # at once; or after one right run (TorchScript optimises then)
def test_a_trace_that_differs_from_the_eager_graph_is_never_used(first_wrong_run):
    graph, _ = _encoder_and_calls()

    def trace_wrong_from_a_run(module, inputs):
        class Wrong(torch.nn.Module):
            runs = 0

            def forward(self, x):
                self.runs += 1
                image, patches = module(x)
                return image, patches if self.runs < first_wrong_run else patches * (1 + 1e-6)

        return Wrong()

    traced = _at_third_call(graph, trace=trace_wrong_from_a_run)
    with torch.inference_mode():
        want = graph(_pixels(2))
        got = [traced(_pixels(2)) for _ in range(5)]
    assert traced.traced_shapes == [] and len(traced._traces) == 1  # checked, and refused
    assert all(torch.equal(a, b) for one in got for a, b in zip(want, one))


def test_a_graph_the_tracer_cannot_follow_stays_eager():
    graph, calls = _encoder_and_calls()

    def failing_trace(module, inputs):
        raise RuntimeError("cannot trace")

    traced = _at_third_call(graph, trace=failing_trace)
    with torch.inference_mode():
        want = graph(_pixels(2))
        got = [traced(_pixels(2)) for _ in range(3)] + [traced(_pixels(5))]
    assert all(torch.equal(a, b) for one in got[:3] for a, b in zip(want, one)) and got[3][1].shape == (5, 128, 8, 8)
    assert traced.traced_shapes == [] and len(traced._traces) == 1 and len(calls) == 1 + 4


def test_a_shape_the_trace_cannot_run_stays_eager_and_the_others_keep_the_trace():
    graph, calls = _encoder_and_calls()

    def trace_failing_at_three(module, inputs):
        class Partial(torch.nn.Module):
            def forward(self, x):
                if len(x) == 3:
                    raise RuntimeError("shape baked into the trace")
                return module(x)

        return Partial()

    traced = _at_third_call(graph, trace=trace_failing_at_three)
    with torch.inference_mode():
        got = [traced(_pixels(n)) for n in (2, 2, 2, 3, 3, 3, 3, 2)]
    assert [key[0][0] for key in traced.traced_shapes] == [(2, 3, 64, 64)] and len(traced._traces) == 2
    assert [one[1].shape[0] for one in got] == [2, 2, 2, 3, 3, 3, 3, 2]


class _ShapeInTheTrace(torch.nn.Module):
    """A graph whose trace bakes a number read off its input's shape: each shape needs its own."""

    def forward(self, x):
        return x + float(x.shape[1])


def test_each_shape_runs_its_own_trace_even_when_two_threads_trace_at_once():
    started, inside, most = threading.Barrier(2), [0], [0]

    def slow_trace(module, inputs):  # holds the tracer long enough for a second thread to arrive
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        inside[0] -= 1
        return torch.jit.trace(module, inputs, check_trace=False)

    traced = TracedGraph(_ShapeInTheTrace(), trace=slow_trace, after_seconds=0.0, min_calls=1)
    answers: dict[int, list] = {2: [], 3: []}

    def calls(width):
        started.wait(timeout=10)  # both threads reach their first (tracing) call together
        answers[width] += [traced(torch.zeros(1, width)) for _ in range(3)]

    threads = [threading.Thread(target=calls, args=(w,)) for w in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert most[0] == 1  # one shape traced at a time
    assert sorted(key[0][0] for key in traced.traced_shapes) == [(1, 2), (1, 3)]
    for width, got in answers.items():
        assert all(torch.equal(one, torch.full((1, width), float(width))) for one in got), width


def test_a_shape_checked_without_grad_runs_eagerly_under_autograd():
    traced = TracedGraph(_ShapeInTheTrace(), after_seconds=0.0, min_calls=1)
    with torch.no_grad():
        traced(torch.zeros(1, 2))
    with torch.enable_grad():
        x = torch.zeros(1, 2, requires_grad=True)
        traced(x).sum().backward()  # the eager graph under autograd: a gradient flows
    assert x.grad is not None and [key[-1] for key in traced.traced_shapes] == [False, True]


def test_a_shape_is_traced_only_after_it_has_spent_its_time_eagerly():
    """Tracing pays only over many calls: a shape is traced once its own eager calls took `after_seconds`."""
    graph, _ = _encoder_and_calls()
    ticks = iter(range(10_000))
    traced = TracedGraph(graph, after_seconds=0.5, clock=lambda: next(ticks) / 16)  # each call: 1/16 s
    with torch.inference_mode():
        for call in range(1, 12):
            traced(_pixels(2))
            traced(_pixels(3)) if call <= 4 else None  # another shape's time does not count for this one
            shapes = [key[0][0][0] for key in traced.traced_shapes]
            assert shapes == ([2] if call >= 8 else []), call  # 8 calls x 1/16 s reach 0.5 s


def test_the_torch_backend_encodes_images_and_texts_through_checked_traces():
    tagger = load_tagger("torch", device="cpu")
    encoder = tagger.backend.image_encoder
    assert isinstance(encoder, TracedGraph) and isinstance(tagger.backend.text_encoder, TracedGraph)
    encoder.after_seconds = 0.0  # the world encoder is fast: trace it at once
    images = np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    runs = [tagger.encode_images(images) for _ in range(3)]
    assert [key[0][0] for key in encoder.traced_shapes] == [(6, 3, 64, 64)]
    assert all(np.array_equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
