"""The PyTorch backend: runs the contract graphs of ttd/model/graphs.py on cuda (if present) or CPU.

On a GPU it takes the usual fast path: bf16/fp16 weights (the tag head stays fp32), attention
through `scaled_dot_product_attention` (open_clip's MultiheadAttention dispatches to it at
inference), pinned host buffers with non-blocking copies, and optionally `torch.compile` of the
fixed-shape image encoder (with CUDA graphs on a GPU). Compiled batches are padded to the next
power of two so that a job's last, smaller batch does not trigger a new compilation. Otherwise
the image encoder, and always the text encoder, run as TorchScript traces that are used only
where they give the eager graph's bits (ttd/runtime/traced_graph.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ttd.errors import InputError
from ttd.model.config import canonical_precision
from ttd.model.clip import TTDModel
from ttd.model.contract import ImageEmbeddings, TagHeadOutputs
from ttd.model.graphs import ImageEncoderGraph, TagHeadGraph, TextEncoderGraph
from ttd.runtime.backend import HeadRequest, ImagePreprocessing
from ttd.runtime.device_pipeline import HostBuffers, InFlight, StageClock, UploadSlots, stream_context, to_host
from ttd.runtime.tagger import TEXT_ROWS
from ttd.runtime.traced_graph import TracedGraph

CONSTANT_BYTES = 8 << 20  # request arrays shared by every image up to this size stay on the device
TOP_SLACK = 32  # extra top-k candidates handed back: records rank by scores rounded to 6 decimals

DEVICE_TEXT_ROWS = 256  # texts per text-encoder call on a GPU (ttd/runtime/tagger.py TEXT_ROWS)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # ttd.model.config.PRECISIONS names


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(device)


def padded_batch(n: int) -> int:
    """The batch a compiled encoder runs for n images: the next power of two (few shapes, few compilations)."""
    return 1 << max(0, n - 1).bit_length()


class TorchBackend:
    name = "torch"

    def __init__(self, model: TTDModel, device: str | None = None, dtype: str = "fp32",
                 compile: bool = False) -> None:
        self.device = pick_device(device)
        self.dtype = DTYPES[canonical_precision(dtype, tuple(DTYPES))]
        self.compiled = compile
        model = model.to(self.device, self.dtype).eval()
        self.image_encoder: Callable = ImageEncoderGraph(model)
        if not compile:  # one native call per batch (ttd/runtime/traced_graph.py)
            self.image_encoder = TracedGraph(self.image_encoder)
        else:
            # reduce-overhead = CUDA graphs on a GPU; on a CPU it is plain inductor code
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.image_encoder = torch.compile(self.image_encoder, mode=mode, dynamic=False)
        text_encoder = TextEncoderGraph(model)
        self.text_prefix = text_encoder.accepts_prefix  # ids cut after the end token (tagger.py PREFIX_STEP)
        self.text_encoder = TracedGraph(text_encoder)
        self.text_rows = DEVICE_TEXT_ROWS if self.device.type == "cuda" else TEXT_ROWS
        self.tag_head = TagHeadGraph(model.config.tau, model.mask_weight.item(), model.mask_bias.item())
        self._normalisation: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._constants: dict[tuple, torch.Tensor] = {}  # negatives, margin, a vocabulary: uploaded once
        self._slots: UploadSlots | None = None  # the pipelined path's upload slots, made on first use
        self._compute: torch.cuda.Stream | None = None
        self._outputs = HostBuffers(pin=self.device.type == "cuda")  # the pipelined path's pinned outputs, reused

    def _to_device(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # torch wants writable memory
        dtype = dtype if tensor.is_floating_point() else tensor.dtype
        if self.device.type != "cuda":
            return tensor.to(dtype)
        # pinned staging lets the copy run asynchronously to the host (arrays that came back
        # from this backend are pinned already: no staging copy)
        staged = tensor if tensor.is_pinned() else tensor.pin_memory()
        return staged.to(self.device, dtype, non_blocking=True)

    def _to_host(self, outputs: tuple[torch.Tensor, ...], rows: int | None = None) -> tuple[np.ndarray, ...]:
        outputs = tuple(o[:rows].float() for o in outputs)
        if self.device.type != "cuda":
            return tuple(o.numpy() for o in outputs)
        host = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outputs]
        for h, o in zip(host, outputs):
            h.copy_(o, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return tuple(h.numpy() for h in host)

    def _run(self, graph, *arrays: np.ndarray, dtype: torch.dtype | None = None, rows: int | None = None):
        with torch.inference_mode():
            outputs = graph(*(self._to_device(a, dtype or self.dtype) for a in arrays))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            return self._to_host(outputs, rows)

    def _pad(self, array: np.ndarray) -> np.ndarray:
        n = len(array)
        if not self.compiled or padded_batch(n) == n:
            return array
        return np.concatenate([array, np.zeros((padded_batch(n) - n, *array.shape[1:]), array.dtype)])

    def encode_images(self, pixel_values: np.ndarray) -> ImageEmbeddings:
        return ImageEmbeddings(*self._run(self.image_encoder, self._pad(pixel_values), rows=len(pixel_values)))

    def _normalised(self, images: np.ndarray | torch.Tensor, preprocessing: ImagePreprocessing) -> torch.Tensor:
        """uint8 [B, H, W, 3] (host array, or already on the device) -> the encoder's input on the
        device, mirrored copies appended under flip TTA (same float32 arithmetic as
        ttd.runtime.images.normalize); mean and std are made on the device once per setting."""
        key = (preprocessing.mean, preprocessing.std)
        if key not in self._normalisation:
            self._normalisation[key] = tuple(torch.tensor(v, device=self.device)[:, None, None] for v in key)
        mean, std = self._normalisation[key]
        pixels = images if isinstance(images, torch.Tensor) else self._to_device(images, torch.uint8)
        # channels-first uint8 made contiguous first: the float math below then runs on contiguous
        # memory (2x faster than on the permuted view; the same values)
        pixels = pixels.permute(0, 3, 1, 2).contiguous()
        if preprocessing.flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        pixels = self._pad_tensor(pixels)
        return pixels.float().div_(255.0).sub_(mean).div_(std).to(self.dtype).contiguous()

    def _pad_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        n = len(pixels)
        if not self.compiled or padded_batch(n) == n:
            return pixels
        return torch.cat([pixels, pixels.new_zeros((padded_batch(n) - n, *pixels.shape[1:]))])

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run(self.text_encoder, input_ids)[0]

    def _head(self, views: torch.Tensor, request: HeadRequest, rows_per_call: int | None = None) -> TagHeadOutputs:
        # the head is a softmax at τ = 100: always float32, whatever the encoders run in
        arrays = [self._to_device(a, torch.float32) for a in request.arrays()]
        n = len(views)
        step = n if rows_per_call is None else max(1, rows_per_call)
        scores, cosines = [], []
        for begin in range(0, n, step):  # the head's working memory bounded: rows in calls of `step`
            rows = slice(begin, begin + step)
            part = self.tag_head(views[rows].float(), *(a if len(a) == 1 else a[rows] for a in arrays))
            scores.append(part[0])
            if request.with_cosines:
                cosines.append(part[1])
        joined = (torch.cat(scores), *((torch.cat(cosines),) if request.with_cosines else ()))
        host = self._to_host(joined)
        return TagHeadOutputs(host[0], host[1] if request.with_cosines else None)

    def score_tags(self, patch_views: np.ndarray, request: HeadRequest) -> TagHeadOutputs:
        with torch.inference_mode():
            return self._head(self._to_device(patch_views, torch.float32), request)

    splits_head = True  # tag_images takes rows_per_call: the encoder runs once, only the head is split

    def tag_images(self, images: np.ndarray, preprocessing: ImagePreprocessing,
                   request: HeadRequest, rows_per_call: int | None = None) -> TagHeadOutputs:
        """Encoder and tag head on the device: only the scores (and the cosine maps if asked for)
        come back to the host, never the patch embeddings. The encoder runs the whole batch in
        one call (one compiled shape); only the head runs in calls of `rows_per_call` rows, its
        memory budget (ttd/runtime/tagger.py HEAD_ELEMENTS)."""
        with torch.inference_mode():
            _, patch_embeds = self.image_encoder(self._normalised(images, preprocessing))
            return self._head(self._views(patch_embeds, len(images), preprocessing.flip), request, rows_per_call)

    @staticmethod
    def _views(patch_embeds: torch.Tensor, n: int, flip: bool) -> torch.Tensor:
        """The encoder's [V·B(+padding), D, h, w] -> the head's views [B, V, D, h, w] (mirrored views flipped back)."""
        return patch_embeds[:n, None] if not flip else \
            torch.stack([patch_embeds[:n], patch_embeds[n : 2 * n].flip(-1)], dim=1)

    # -- the pipelined path -------------------------------------------------

    def _pipeline(self) -> UploadSlots:
        if self._slots is None:
            self._slots = UploadSlots(self.device)
            self._compute = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        return self._slots

    def staging(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Host memory for the next submitted batch's uint8 images (its pinned upload slot on a
        GPU, so decoding lands where the upload reads: UploadSlots.staging); None on a CPU."""
        return self._pipeline().staging(shape) if self.device.type == "cuda" else None

    def _constant(self, array: np.ndarray) -> torch.Tensor | None:
        """A request array shared by every image (leading dim 1: negatives, margin, a vocabulary)
        as a device tensor made once; None for per-image arrays, which travel with the batch."""
        if len(array) != 1 or array.nbytes > CONSTANT_BYTES:
            return None
        key = (array.shape, array.dtype.str, array.tobytes())
        if key not in self._constants:
            if len(self._constants) >= 8:
                self._constants.clear()
            self._constants[key] = self._to_device(array, torch.float32 if array.dtype != np.bool_ else torch.bool)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # once per constant: visible to every stream
        return self._constants[key]

    def submit(self, images: np.ndarray, preprocessing: ImagePreprocessing, request: HeadRequest, score_row: int,
               top_k: int = 0, rows_per_call: int | None = None) -> InFlight:
        """`tag_images` without waiting: the batch is uploaded on the upload stream, encoder and
        head run on the compute stream after the upload's event, and the chosen score row (plus,
        with `top_k`, the indices of the highest scores, found on the device, and the cosine maps
        when the request asks) is copied back into pinned host buffers; `wait()` on the result
        blocks on this batch's event only. The encoder runs the batch once; the head's rows run in
        calls of `rows_per_call` exactly as the plain path (`tag_images`) splits them, so both give
        the same numbers. On a CPU it all runs here."""
        cuda = self.device.type == "cuda"
        slots = self._pipeline()
        compute = self._compute
        clock = StageClock(cuda)
        arrays = request.arrays()
        constants = [self._constant(a) for a in arrays]
        varying = [a for a, c in zip(arrays, constants) if c is None]
        n = len(images)
        step = n if rows_per_call is None else max(1, rows_per_call)
        with torch.inference_mode():
            uploaded = slots.upload([images, *varying], compute, clock)  # stages "stage" (host) and "upload"
            pixels, per_image = uploaded[0], iter(uploaded[1:])
            tensors = [c if c is not None else next(per_image) for c in constants]
            if cuda:
                for constant in constants:
                    if constant is not None:  # made on another stream: not reused while this batch may read it
                        constant.record_stream(compute)
            tensors = [t if t.dtype == torch.bool else t.float() for t in tensors]
            chosen, cosines = [], []
            with stream_context(compute):
                # the encoder once for the whole batch (one compiled shape, no padded remainders);
                # only the tag head is split to its memory budget, as Tagger.tag_images splits it
                start = clock.mark(compute)
                _, patch_embeds = self.image_encoder(self._normalised(pixels, preprocessing))
                middle = clock.mark(compute)
                clock.span("encode", start, middle)
                views = self._views(patch_embeds, n, preprocessing.flip)
                for begin in range(0, n, step):
                    rows = slice(begin, begin + step)
                    part = [t if len(t) == 1 else t[rows] for t in tensors]
                    scores, maps = self.tag_head(views[rows].float(), *part)
                    chosen.append(scores[:, score_row, :].float())
                    if request.with_cosines:
                        cosines.append(maps.float())
                clock.span("head", middle, clock.mark(compute))
                start = clock.mark(compute)
                outputs = {"scores": torch.cat(chosen) if len(chosen) > 1 else chosen[0]}
                if top_k:
                    k = min(outputs["scores"].shape[1], top_k + TOP_SLACK)
                    outputs["top"] = torch.topk(outputs["scores"], k, dim=1).indices
                if request.with_cosines:
                    outputs["cosines"] = torch.cat(cosines) if len(cosines) > 1 else cosines[0]
                host = to_host(outputs, compute, self._outputs)
                done = None
                if cuda:
                    done = torch.cuda.Event()
                    done.record(compute)
                clock.span("download", start, clock.mark(compute))
        return InFlight(host, done, clock, buffers=self._outputs if cuda else None)
