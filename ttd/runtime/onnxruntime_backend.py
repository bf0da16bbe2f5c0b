"""The onnxruntime backend: the three graphs of an export directory in InferenceSessions.

Providers come from what this onnxruntime build offers (TensorRT EP, CUDA EP, CPU); the active
provider is checked after session creation, so a session never falls back to the CPU silently.
"""

from __future__ import annotations

import numpy as np

from ttd.errors import InputError, RuntimeProblem
from ttd.model.contract import GRAPH_NAMES, IMAGE_ENCODER, TAG_HEAD, TEXT_ENCODER, ImageEmbeddings, TagHeadOutputs
from ttd.runtime.backend import HeadRequest, ImagePreprocessing, tag_images_on_host
from ttd.runtime.export_dir import ExportDir

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(device: str | None, available: list[str]) -> list[str]:
    """auto: the best available; cpu: CPU only; cuda: CUDA (then CPU for ops CUDA lacks); tensorrt likewise."""
    wanted = {
        None: PREFERENCE, "auto": PREFERENCE, "cpu": ("CPUExecutionProvider",),
        "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
        "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    }
    key = device.split(":")[0] if device else None
    if key not in wanted:
        raise InputError(f"unknown device {device!r} for onnxruntime; choose auto, cpu, cuda or tensorrt")
    providers = [p for p in wanted[key] if p in available]
    if not providers or (key in ("cuda", "tensorrt") and providers[0] != wanted[key][0]):
        raise InputError(f"device {device!r} needs {wanted[key][0]}, but this onnxruntime offers {', '.join(available)}")
    return providers


def with_device_id(providers: list[str], device: str | None) -> list:
    """The providers as onnxruntime takes them, `cuda:N` / `tensorrt:N` giving the GPU's index to
    the GPU providers (`device_id`; without it onnxruntime runs on GPU 0 whatever was asked)."""
    _, _, index = (device or "").partition(":")
    if not index:
        return list(providers)
    if not index.isdigit():
        raise InputError(f"device {device!r}: the GPU index after ':' must be a number (e.g. cuda:1)")
    gpu = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    return [(p, {"device_id": int(index)}) if p in gpu else p for p in providers]


def session_options(precision: str, on_cpu: bool, threads: int = 0):
    """onnxruntime SessionOptions for a graph of `precision` (the backend and the Triton graph
    models share them): every optimisation, except that onnxruntime 1.32's CPU layout
    optimisations crash (SIGSEGV) on fp16 graphs, where EXTENDED is safe."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if precision == "fp16" and on_cpu
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return options


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, export: ExportDir, device: str | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        self.providers = choose_providers(device, ort.get_available_providers())
        options = session_options(export.precision, self.providers[0] == "CPUExecutionProvider", threads)
        self.sessions = {}
        for name in GRAPH_NAMES:
            session = ort.InferenceSession(str(export.graph(name)), options,
                                           providers=with_device_id(self.providers, device))
            active = session.get_providers()
            if active[0] != self.providers[0]:
                raise RuntimeProblem(f"{name}: asked for {self.providers[0]} but onnxruntime activated {active}")
            self.sessions[name] = session
        self.precision = export.precision
        self.export_root = export.root  # the vocabulary cache's key, also for the embedded default's export

    def _run(self, graph, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.sessions[graph.name].run(list(graph.outputs), dict(zip(graph.inputs, arrays)))

    def encode_images(self, pixel_values: np.ndarray) -> ImageEmbeddings:
        return ImageEmbeddings(*self._run(IMAGE_ENCODER, pixel_values.astype(np.float32)))

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run(TEXT_ENCODER, input_ids.astype(np.int64))[0]

    def score_tags(self, patch_views: np.ndarray, request: HeadRequest) -> TagHeadOutputs:
        outputs = list(TAG_HEAD.outputs if request.with_cosines else TAG_HEAD.outputs[:1])
        feeds = dict(zip(TAG_HEAD.inputs, head_feeds(patch_views, request)))
        result = self.sessions[TAG_HEAD.name].run(outputs, feeds)
        return TagHeadOutputs(result[0], result[1] if request.with_cosines else None)

    def tag_images(self, images: np.ndarray, preprocessing: ImagePreprocessing,
                   request: HeadRequest) -> TagHeadOutputs:
        return tag_images_on_host(self, images, preprocessing, request)


def head_feeds(patch_views: np.ndarray, request: HeadRequest) -> tuple[np.ndarray, ...]:
    """The tag head's inputs in the contract's order and types (float32, the validity mask bool)."""
    return (np.ascontiguousarray(patch_views, np.float32), np.ascontiguousarray(request.tag_embeds, np.float32),
            np.ascontiguousarray(request.tag_valid, np.bool_), np.ascontiguousarray(request.negative_embeds, np.float32),
            np.ascontiguousarray(request.negative_margin, np.float32))
