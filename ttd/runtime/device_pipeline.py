"""The CUDA plumbing of the pipelined tagging path (issue 21, item 1): an upload stream fed from a
few pinned uint8 slots, the compute stream ordered after it by events, stage clocks read from
CUDA events, and batches whose results are waited on by their own event, never by a
device-wide synchronise.

On a CPU every piece degrades to the synchronous equivalent (no streams, no pinned memory,
perf_counter clocks), so the same code path runs, and is tested, on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ttd.runtime.backend import BatchScores


def stream_context(stream: torch.cuda.Stream | None):
    """`torch.cuda.stream(stream)` on a GPU; nothing on a CPU (stream None)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class StageClock:
    """Per-stage times of one batch. On a GPU, CUDA timing events recorded on the stream that runs
    the stage, read only once the batch's final event has completed (reading them earlier would
    block); on a CPU, where the work runs as it is issued, perf_counter."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.spans: list[tuple[str, object, object]] = []

    def mark(self, stream: torch.cuda.Stream | None = None):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def span(self, name: str, start, end) -> None:
        self.spans.append((name, start, end))

    def seconds(self) -> dict[str, float]:
        """{stage: seconds}; call after the batch's final event completed."""
        times: dict[str, float] = {}
        for name, start, end in self.spans:
            if self.cuda:
                end.synchronize()  # done already (the batch's event came later), or an upload-stream mark just behind it
            elapsed = start.elapsed_time(end) / 1000.0 if self.cuda else end - start
            times[name] = times.get(name, 0.0) + elapsed
        return times


ALIGN = 64


class UploadSlots:
    """uint8 batches cross to the device from a few pinned host slots on their own stream.

    A slot is rewritten only once its previous copy has completed (that copy's event, not a
    device synchronise), so up to `count` uploads are in flight while the compute stream works;
    the compute stream waits on the upload's event before it reads the batch. On a CPU the batch
    is used where it is."""

    def __init__(self, device: torch.device, count: int = 3) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.events: list[torch.cuda.Event | None] = [None] * count
        self.next = 0

    def staging(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A uint8 array of `shape` at the start of the slot the next `upload` uses (its previous
        copy waited for): images decoded or stacked there are not copied again by that upload
        (one host copy per batch, docs/gpu.md). None on a CPU, where nothing is staged."""
        if not self.cuda:
            return None
        slot = self.next
        if self.events[slot] is not None:
            self.events[slot].synchronize()
            self.events[slot] = None
        nbytes = int(np.prod(shape))
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.buffers[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return buffer[:nbytes].numpy().reshape(shape)

    def upload(self, arrays: list[np.ndarray], compute: torch.cuda.Stream | None) -> list[torch.Tensor]:
        """The arrays (uint8 images, float32 tag embeddings, ...) on the device, ready for `compute`."""
        if not self.cuda:
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        slot = self.next
        self.next = (slot + 1) % len(self.buffers)
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # its previous upload has left the host buffer
        offsets = np.cumsum([0] + [-(-a.nbytes // ALIGN) * ALIGN for a in arrays])  # each array 64-byte aligned
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < offsets[-1]:
            grown = torch.empty(max(int(offsets[-1]), 1), dtype=torch.uint8, pin_memory=True)
            if buffer is not None and arrays and _lies_at(arrays[0], buffer):
                grown[: arrays[0].nbytes].numpy()[:] = arrays[0].reshape(-1).view(np.uint8)  # staged, then outgrown
                arrays = [grown[: arrays[0].nbytes].numpy().view(arrays[0].dtype).reshape(arrays[0].shape),
                          *arrays[1:]]
            buffer = self.buffers[slot] = grown
        staged = []
        for array, offset in zip(arrays, offsets):
            array = np.ascontiguousarray(array)
            host = buffer[int(offset) : int(offset) + array.nbytes]
            if not (offset == 0 and _lies_at(array, buffer)):  # staged there already: no second copy
                np.copyto(host.numpy(), array.reshape(-1).view(np.uint8))
            staged.append(host.view(torch.from_numpy(array[:0]).dtype).view(array.shape))
        with torch.cuda.stream(self.stream):
            on_device = [h.to(self.device, non_blocking=True) for h in staged]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[slot] = event
        compute.wait_event(event)
        for tensor in on_device:
            tensor.record_stream(compute)  # allocated on the upload stream, freed after compute used it
        return on_device


def _lies_at(array: np.ndarray, buffer: torch.Tensor) -> bool:
    """Whether `array` is the memory at the start of `buffer` (a batch staged in its slot)."""
    return array.flags.c_contiguous and array.__array_interface__["data"][0] == buffer.data_ptr()


@dataclass
class InFlight:
    """A submitted batch: its outputs are being copied into pinned host buffers on the compute
    stream; `wait` blocks on this batch's event only, so the next batch keeps computing."""

    host: dict[str, torch.Tensor]
    done: torch.cuda.Event | None
    clock: StageClock
    started: float = field(default_factory=time.perf_counter)

    def wait(self) -> BatchScores:
        if self.done is not None:
            self.done.synchronize()
        arrays = {name: tensor.numpy() for name, tensor in self.host.items()}
        return BatchScores(arrays["scores"], arrays.get("top"), arrays.get("cosines"), self.clock.seconds())


def to_host(outputs: dict[str, torch.Tensor], compute: torch.cuda.Stream | None) -> dict[str, torch.Tensor]:
    """Device outputs -> host tensors: on a GPU pinned buffers filled asynchronously on `compute`."""
    if compute is None:
        return {name: tensor.cpu() for name, tensor in outputs.items()}
    host = {}
    for name, tensor in outputs.items():
        host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host[name].copy_(tensor, non_blocking=True)
    return host
