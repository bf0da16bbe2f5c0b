"""The TensorRT backend: runs the engines `ttd export --tensorrt` wrote, with torch CUDA tensors
as buffers (no pycuda). Needs an NVIDIA GPU and the tensorrt package (10.x or 11.x).

An engine accepts only the shapes of its optimisation profile, and `set_input_shape` answers
False (it does not raise) for any other: ignoring that runs the engine with the previous shapes.
So every call is split along the batch axis into pieces the profile accepts, every TensorRT call
that reports failure is checked, and buffer types are read from the engine.

The tag head's tag axis is the one axis that cannot be split: its per-pixel softmax runs over
all of a call's tags, so scores computed on a slice of the tags are different numbers. A call
with more tags than the head's profile allows runs the head (no weights: one product, a softmax
and a sigmoid) in torch on the same device, with the functions the exported graph was traced
from (ttd.model.scoring), so the answer is the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ttd.errors import InputError, RuntimeProblem
from ttd.model.contract import GRAPH_NAMES, GRAPHS, ImageEmbeddings, TagHeadOutputs
from ttd.model.scoring import tag_head
from ttd.runtime.backend import HeadRequest, ImagePreprocessing, with_flipped
from ttd.runtime.export_dir import ExportDir

# tensorrt.DataType member names -> torch dtype names (TensorRT's own nptype() has no bfloat16)
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
_ENGINE_NAME = re.compile(r"^(?P<graph>[a-z_]+)\.trt(?P<version>\d+\.\d+)\.sm(?P<sm>\d+)\.(?P<precision>\w+)\.plan$")


def engine_name(graph: str, trt_version: str, compute_capability: tuple[int, int], precision: str) -> str:
    """e.g. image_encoder.trt10.13.sm90.fp16.plan: an engine runs only on the TensorRT version and
    GPU generation that built it, so both are in its name."""
    major_minor = ".".join(trt_version.split(".")[:2])
    return f"{graph}.trt{major_minor}.sm{compute_capability[0]}{compute_capability[1]}.{precision}.plan"


def deserialisation_failure(name: str, trt_version: str, compute_capability: tuple[int, int]) -> str:
    """Why an engine file probably did not load, from what its name records and what is running."""
    version, sm = ".".join(trt_version.split(".")[:2]), f"{compute_capability[0]}{compute_capability[1]}"
    rebuild = "rebuild the engines with `ttd export --tensorrt` on this machine"
    match = _ENGINE_NAME.match(name)
    if not match:
        return (f"TensorRT {trt_version} could not load {name}, whose name does not record the TensorRT version "
                f"and GPU that built it (this is TensorRT {version} on sm{sm}): {rebuild}")
    differences = []
    if match["version"] != version:
        differences.append(f"it was built with TensorRT {match['version']}, this is TensorRT {trt_version}")
    if match["sm"] != sm:
        differences.append(f"it was built for GPU compute capability sm{match['sm']}, this GPU is sm{sm}")
    reason = "; ".join(differences) or (f"its name matches this machine (TensorRT {version}, sm{sm}), so the "
                                        "file comes from an incompatible TensorRT build (see the TensorRT log above)")
    return f"TensorRT could not load {name}: {reason}. To fix it, {rebuild}"


@dataclass(frozen=True)
class Profile:
    """The shapes an input accepts: min[i] <= shape[i] <= max[i] on every axis."""

    min: tuple[int, ...]
    max: tuple[int, ...]


class EngineRunner:
    """One engine and its execution context; `run` splits a call along the batch axis into pieces
    that the engine's optimisation profile 0 accepts."""

    def __init__(self, graph: str, engine, device: str = "cuda", stream=None) -> None:
        import torch

        self.graph, self.engine, self.torch, self.device, self.stream = graph, engine, torch, device, stream
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = set(GRAPHS[graph].inputs) | set(GRAPHS[graph].outputs)
        if names != expected:
            raise RuntimeProblem(f"the {graph} engine has tensors {sorted(names)}, expected {sorted(expected)}: "
                               "it was not built from this export's graph")
        self.profiles = {}
        for name in GRAPHS[graph].inputs:
            low, _, high = engine.get_tensor_profile_shape(name, 0)
            self.profiles[name] = Profile(tuple(int(d) for d in low), tuple(int(d) for d in high))
        self.dtypes = {name: self._torch_dtype(name) for name in expected}
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeProblem(f"TensorRT could not create an execution context for the {graph} engine "
                               "(out of GPU memory?)")

    def _torch_dtype(self, name: str):
        dtype = self.engine.get_tensor_dtype(name)
        key = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
        if key not in TORCH_DTYPES:
            raise RuntimeProblem(f"the {self.graph} engine's tensor {name} has type {key}, which this runtime cannot hold")
        return getattr(self.torch, TORCH_DTYPES[key])

    @property
    def max_batch(self) -> int:
        return min(p.max[0] for p in self.profiles.values())

    def accepts(self, name: str, axis: int, size: int) -> bool:
        profile = self.profiles[name]
        return profile.min[axis] <= size <= profile.max[axis]

    def check_shapes(self, feeds: dict[str, np.ndarray]) -> None:
        """Every axis but the batch must lie within the profile; the batch is split by `run`."""
        for name, array in feeds.items():
            profile = self.profiles[name]
            if array.ndim != len(profile.max):
                raise InputError(f"{self.graph}: {name} has shape {tuple(array.shape)}, the engine expects "
                                 f"{len(profile.max)} axes")
            for axis in range(1, array.ndim):
                if not self.accepts(name, axis, array.shape[axis]):
                    raise InputError(f"{self.graph}: {name} has shape {tuple(array.shape)}; the engine's profile accepts "
                                     f"{profile.min[axis]}..{profile.max[axis]} on axis {axis} "
                                     "(rebuild the engines with larger limits)")

    def run(self, feeds: dict) -> tuple:
        """Outputs (torch tensors on the device) for feeds of numpy arrays or device tensors; a
        feed with a leading 1 where the others have B (one vocabulary) is broadcast."""
        torch = self.torch
        tensors = {name: value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
                   for name, value in feeds.items()}
        self.check_shapes(tensors)
        total = max(len(v) for v in tensors.values())
        tensors = {k: v.expand(total, *v.shape[1:]) if len(v) != total else v for k, v in tensors.items()}
        if total == 0:
            return self._empty()
        step = self.max_batch
        pieces = [self._run_once({k: v[start : start + step] for k, v in tensors.items()})
                  for start in range(0, total, step)]
        return tuple(torch.cat(parts) for parts in zip(*pieces))

    def _empty(self) -> tuple:
        outputs = []
        for name in GRAPHS[self.graph].outputs:
            shape = [0] + [int(d) for d in self.engine.get_tensor_shape(name)][1:]
            if any(d < 0 for d in shape):
                raise InputError(f"{self.graph}: an empty batch has no defined {name} shape")
            outputs.append(self.torch.zeros(shape, dtype=self.torch.float32))  # every float output of the contract is float32
        return tuple(outputs)

    def _run_once(self, feeds: dict) -> tuple:
        torch, context = self.torch, self.context
        keep = []  # the buffers must outlive the execution
        for name, tensor in feeds.items():
            if self.stream is not None and tensor.device.type == "cpu":
                tensor = tensor.pin_memory()  # an asynchronous copy needs page-locked memory
            tensor = tensor.to(self.device, self.dtypes[name], non_blocking=True).contiguous()
            keep.append(tensor)
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeProblem(f"TensorRT refused shape {tuple(tensor.shape)} for {self.graph} input {name} "
                                   f"(profile {self.profiles[name].min}..{self.profiles[name].max})")
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeProblem(f"TensorRT refused the buffer of {self.graph} input {name}")
        outputs = []
        for name in GRAPHS[self.graph].outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeProblem(f"TensorRT could not infer the shape of {self.graph} output {name} ({shape})")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            if not context.set_tensor_address(name, out.data_ptr()):
                raise RuntimeProblem(f"TensorRT refused the buffer of {self.graph} output {name}")
            outputs.append(out)
        if not context.execute_async_v3(self.stream.cuda_stream if self.stream is not None else 0):
            raise RuntimeProblem(f"TensorRT execution of {self.graph} failed (see the TensorRT log above)")
        # no synchronise: what reads the outputs (the next engine, the copy to the host) is queued
        # on this stream after the execution; inputs freed here are reused only by later work on it
        # the contract's outputs are float32 whatever precision the engine computes in
        return tuple(o.float() if o.is_floating_point() else o for o in outputs)


def _on_device(device: str):
    """`torch.cuda.device(device)` for a CUDA device (engines and contexts are made on the current
    device: `--device cuda:1` must make them there), nothing otherwise."""
    import contextlib

    import torch

    chosen = torch.device(device)
    return torch.cuda.device(chosen) if chosen.type == "cuda" and chosen.index is not None else contextlib.nullcontext()


def _load_engines(export: ExportDir, device: str = "cuda") -> dict:
    """graph -> deserialised engine (on `device`), with errors that say what is missing or mismatched."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise RuntimeProblem("the tensorrt backend needs the tensorrt package and an NVIDIA GPU "
                           "(pip install tensorrt on such a machine)") from error
    import torch

    if not torch.cuda.is_available():
        raise RuntimeProblem("the tensorrt backend needs an NVIDIA GPU; none is visible")
    names = export.manifest.get("tensorrt", {}).get("engines", {})
    missing = [g for g in GRAPH_NAMES if g not in names]
    if missing:
        raise RuntimeProblem(f"{export.root} has no TensorRT engines for {missing}; run `ttd export --tensorrt`")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines = {}
    with _on_device(device):
        for graph in GRAPH_NAMES:
            engine = runtime.deserialize_cuda_engine(export.file(names[graph]).read_bytes())
            if engine is None:  # TensorRT logs the details and returns None rather than raising
                raise RuntimeProblem(deserialisation_failure(names[graph], trt.__version__,
                                                           torch.cuda.get_device_capability(device)))
            engines[graph] = engine
    return engines


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, export: ExportDir, engines: dict | None = None, device: str = "cuda") -> None:
        """`engines` (graph -> deserialised engine) are loaded from the export unless given."""
        import torch

        if engines is None:
            engines = _load_engines(export, device)
        self.torch, self.device = torch, device
        with _on_device(device):  # execution contexts live on the engines' device
            self.stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
            self.runners = {g: EngineRunner(g, engines[g], device, self.stream) for g in GRAPH_NAMES}
        self.tau, self.mask_weight, self.mask_bias = float(export.config.tau), export.mask_weight, export.mask_bias
        self._normalisation: dict[tuple, tuple] = {}

    def _stream(self):
        """Every call runs on the backend's stream, after what the caller queued on its own: the
        copies in, the engines (the encoder's output handed to the head by device address) and the
        copies out are ordered by the stream, and only the host copy at the end is waited on."""
        import contextlib

        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(self.torch.cuda.current_stream(self.device))
        return self.torch.cuda.stream(self.stream)

    def encode_images(self, pixel_values: np.ndarray) -> ImageEmbeddings:
        with self._stream():
            return ImageEmbeddings(*self._host(self._run("image_encoder", pixel_values)))

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        with self._stream():
            return self._host(self._run("text_encoder", input_ids))[0]

    def score_tags(self, patch_views, request: HeadRequest) -> TagHeadOutputs:
        """The tag head engine (the torch scoring function for more tags than its profile holds)."""
        with self._stream():
            if self.runners["tag_head"].accepts("tag_embeds", 1, request.tag_embeds.shape[1]):
                scores, cosines = self._run("tag_head", patch_views, *request.arrays())
            else:
                scores, cosines = self._tag_head_in_torch(patch_views, request)
            host = self._host((scores, cosines) if request.with_cosines else (scores,))
        return TagHeadOutputs(host[0], host[1] if request.with_cosines else None)

    def tag_images(self, images: np.ndarray, preprocessing: ImagePreprocessing,
                   request: HeadRequest) -> TagHeadOutputs:
        """Encoder and head engines on the GPU: the patch embeddings stay there, the views are
        made there, and only the scores (and cosine maps if asked for) come back."""
        torch = self.torch
        with self._stream():
            pixels = torch.from_numpy(np.ascontiguousarray(with_flipped(images, preprocessing.flip)))
            if self.stream is not None:
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
            key = (preprocessing.mean, preprocessing.std)
            if key not in self._normalisation:  # made on the device once
                self._normalisation[key] = tuple(torch.tensor(v, device=self.device)[:, None, None] for v in key)
            mean, std = self._normalisation[key]
            pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)
            _, patch_embeds = self._run("image_encoder", pixels)
            n = len(images)
            views = patch_embeds[:n, None] if not preprocessing.flip else \
                torch.stack([patch_embeds[:n], patch_embeds[n:].flip(-1)], dim=1)
            return self.score_tags(views, request)

    def _run(self, graph: str, *arrays) -> tuple:
        return self.runners[graph].run(dict(zip(GRAPHS[graph].inputs, arrays)))

    def _host(self, tensors: tuple) -> tuple[np.ndarray, ...]:
        """Device outputs -> numpy: on a GPU into pinned buffers, asynchronously on the stream,
        then one wait on that stream's event."""
        torch = self.torch
        if self.stream is None:
            return tuple(t.cpu().numpy() for t in tensors)
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.stream)
        done.synchronize()
        return tuple(h.numpy() for h in host)

    def _tag_head_in_torch(self, patch_views, request: HeadRequest) -> tuple:
        torch = self.torch
        with torch.no_grad():
            device = [torch.as_tensor(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a).to(self.device)
                      for a in (patch_views, *request.arrays())]
            return tag_head(device[0].float(), *device[1:], self.tau, self.mask_weight, self.mask_bias)
