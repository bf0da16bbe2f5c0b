"""The CUDA plumbing of the pipelined tagging path: an upload stream fed from a
few pinned uint8 slots, the compute stream ordered after it by events, stage clocks read from
CUDA events, and batches whose results are waited on by their own event, never by a
device-wide synchronise.

On a CPU every piece degrades to the synchronous equivalent (no streams, no pinned memory,
perf_counter clocks), so the same code path runs, and is tested, on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import time
import weakref
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
        self.host: dict[str, float] = {}

    def mark(self, stream: torch.cuda.Stream | None = None):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def span(self, name: str, start, end) -> None:
        self.spans.append((name, start, end))

    def add(self, name: str, seconds: float) -> None:
        """A stage timed on the host (perf_counter), e.g. staging a batch into its pinned slot."""
        self.host[name] = self.host.get(name, 0.0) + seconds

    def seconds(self) -> dict[str, float]:
        """{stage: seconds}; call after the batch's final event completed."""
        times: dict[str, float] = dict(self.host)
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

    def upload(self, arrays: list[np.ndarray], compute: torch.cuda.Stream | None,
               clock: StageClock | None = None) -> list[torch.Tensor]:
        """The arrays (uint8 images, float32 tag embeddings, ...) on the device, ready for `compute`.
        `clock` gets two stages: "stage", the host's copying into the pinned slot (perf_counter),
        and "upload", the transfer alone (events on the upload stream, after the staging). A first
        array that is a tensor already (images decoded on the device, docs/gpu.md "GPU decoding")
        is used where it is, `compute` waiting for the stream that made it."""
        if arrays and isinstance(arrays[0], torch.Tensor):
            images = arrays[0].to(self.device)
            if self.cuda and compute is not None:
                compute.wait_stream(torch.cuda.current_stream(self.device))
                images.record_stream(compute)
            return [images, *self.upload(list(arrays[1:]), compute, clock)]
        staging = time.perf_counter()
        if not self.cuda:
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
            if clock is not None:
                clock.add("stage", time.perf_counter() - staging)
                now = clock.mark()
                clock.span("upload", now, now)  # nothing crosses: the arrays are used where they are
            return tensors
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
        if clock is not None:
            clock.add("stage", time.perf_counter() - staging)
            start = clock.mark(self.stream)
        with torch.cuda.stream(self.stream):
            on_device = [h.to(self.device, non_blocking=True) for h in staged]
            event = torch.cuda.Event()
            event.record(self.stream)
        if clock is not None:
            clock.span("upload", start, clock.mark(self.stream))
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
    buffers: HostBuffers | None = None  # where `host` came from (reused pinned buffers), if anywhere

    def wait(self) -> BatchScores:
        if self.done is not None:
            self.done.synchronize()
        numpy = self.buffers.as_numpy if self.buffers is not None else torch.Tensor.numpy
        arrays = {name: numpy(tensor) for name, tensor in self.host.items()}
        return BatchScores(arrays["scores"], arrays.get("top"), arrays.get("cosines"), self.clock.seconds())


class HostBuffers:
    """Host buffers for a batch's outputs, reused instead of allocated per batch (pinning memory
    is a slow driver call). A buffer is handed out again only once nothing holds what it gave
    last: the tensor `take` returned and the numpy arrays `as_numpy` made of it (BatchScores),
    with any view of those (a TagResult's row); so however many batches a caller keeps, none is
    overwritten, and when every buffer is busy a new one is made."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffers: dict[str, list[list]] = {}  # name -> [[uint8 storage, [weakrefs of its holders]]]

    @staticmethod
    def _free(entry: list) -> bool:
        return all(ref() is None for ref in entry[1])

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = int(np.prod(shape))
        nbytes = max(1, count * torch.empty((), dtype=dtype).element_size())
        entries = self.buffers.setdefault(name, [])
        entry = next((e for e in entries if self._free(e) and e[0].numel() >= nbytes), None)
        if entry is None:
            entry = next((e for e in entries if self._free(e)), None)  # a free one too small: replaced
            if entry is None:
                entry = [None, []]
                entries.append(entry)
            entry[0] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        view = entry[0][:nbytes].view(dtype)[:count].view(shape)
        entry[1] = [weakref.ref(view)]
        return view

    def as_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        """`tensor.numpy()`, its buffer kept busy while the array (or a view of it) lives."""
        array = tensor.numpy()
        for entries in self.buffers.values():
            for entry in entries:
                if entry[0].data_ptr() == tensor.data_ptr():
                    entry[1].append(weakref.ref(array))
        return array


def to_host(outputs: dict[str, torch.Tensor], compute: torch.cuda.Stream | None,
            buffers: HostBuffers | None = None) -> dict[str, torch.Tensor]:
    """Device outputs -> host tensors: on a GPU pinned buffers (reused from `buffers`) filled
    asynchronously on `compute`."""
    if compute is None:
        return {name: tensor.cpu() for name, tensor in outputs.items()}
    host = {}
    for name, tensor in outputs.items():
        host[name] = buffers.take(name, tuple(tensor.shape), tensor.dtype) if buffers is not None else \
            torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host[name].copy_(tensor, non_blocking=True)
    return host
