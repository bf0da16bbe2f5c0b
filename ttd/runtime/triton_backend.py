"""The triton backend: the three graphs served by a Triton server (ttd_image_encoder,
ttd_text_encoder, ttd_tag_head), over HTTP or gRPC. Large inputs are split into chunks of the
served max batch size and sent with bounded concurrency."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ttd.errors import InputError, TTDError
from ttd.model.contract import GRAPHS, IMAGE_ENCODER, TAG_HEAD, TEXT_ENCODER, ImageEmbeddings, TagHeadOutputs
from ttd.runtime.backend import HeadRequest, ImagePreprocessing, tag_images_on_host
from ttd.runtime.onnxruntime_backend import head_feeds

NUMPY_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.bool_): "BOOL"}


def parse_url(url: str) -> tuple[str, str]:
    """('http' | 'grpc', 'host:port'); a bare host:port means HTTP."""
    if "://" in url:
        scheme, address = url.split("://", 1)
        if scheme not in ("http", "grpc"):
            raise InputError(f"Triton URL {url!r}: scheme must be http:// or grpc://")
        return scheme, address.rstrip("/")
    return "http", url.rstrip("/")


class TritonUnreachable(TTDError, ConnectionError):
    """No Triton server answers at the URL, or it is not ready."""


class TritonBackend:
    name = "triton"

    def __init__(self, url: str, concurrency: int = 4, timeout_s: float = 60.0, retry_s: float = 60.0) -> None:
        self.retry_s, self.timeout_s, self.concurrency = retry_s, timeout_s, concurrency
        self.protocol, self.address = parse_url(url)
        if self.protocol == "http":
            import tritonclient.http as client_module
        else:
            import tritonclient.grpc as client_module
        self.module = client_module
        self._clients = threading.local()
        self._grpc_client = client_module.InferenceServerClient(self.address) if self.protocol == "grpc" else None
        try:
            ready = self.client.is_server_ready()
        except Exception as error:
            raise TritonUnreachable(f"no Triton server answers at {url}: {error}") from error
        if not ready:
            raise TritonUnreachable(f"the Triton server at {url} is not ready")
        self.max_batch = {}
        for model in (g.served_as for g in GRAPHS.values()):
            try:
                config = self.client.get_model_config(model)  # HTTP: a dict; gRPC: a ModelConfigResponse
            except Exception as error:  # a fused repository serves ttd_tagger alone (docs/serving.md)
                raise InputError(f"the Triton server at {url} does not serve {model} ({error}): --backend triton "
                                 "runs the graph models of a python- or native-flavour repository; a fused one "
                                 "is called through its ttd_tagger model") from None
            self.max_batch[model] = int(config["max_batch_size"] if isinstance(config, dict) else config.config.max_batch_size)

    @property
    def client(self):
        """The gRPC client (thread-safe, shared), or this thread's HTTP client: that one runs on
        gevent, whose connections belong to the thread that made them, and a backend is called
        from several threads (the head stage of `ttd tag`, Ray's actor threads)."""
        if self._grpc_client is not None:
            return self._grpc_client
        client = getattr(self._clients, "client", None)
        if client is None:
            client = self._clients.client = self.module.InferenceServerClient(
                self.address, concurrency=self.concurrency, network_timeout=self.timeout_s)
        return client

    def _tensors(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> tuple[list, list]:
        tensors = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            tensor = self.module.InferInput(name, list(array.shape), NUMPY_TO_TRITON[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors, [self.module.InferRequestedOutput(n) for n in outputs]

    def _server_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready())
        except Exception:
            return False

    def _graph(self, graph, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._infer(graph.served_as, dict(zip(graph.inputs, arrays)), list(graph.outputs))

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> tuple[np.ndarray, ...]:
        """One call, retried while the server is down (`ttd serve` restarts a crashed tritonserver
        in seconds) for at most `retry_s`; an error from a server that is up is raised at once."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return self._infer_once(model, inputs, outputs)
            except Exception:
                if time.monotonic() > deadline or self._server_ready():
                    raise
            while time.monotonic() < deadline and not self._server_ready():
                time.sleep(0.25)

    def _infer_once(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> tuple[np.ndarray, ...]:
        total = len(next(iter(inputs.values())))
        step = self.max_batch[model]
        chunks = [self._tensors({k: v[i : i + step] for k, v in inputs.items()}, outputs) for i in range(0, total, step)]
        if self.protocol == "http":
            # the HTTP client is not thread-safe; its own connection pool gives the concurrency
            pending = [self.client.async_infer(model, t, outputs=o) for t, o in chunks]
            results = [p.get_result() for p in pending]
        else:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                results = list(pool.map(lambda chunk: self.client.infer(model, chunk[0], outputs=chunk[1]), chunks))
        return tuple(np.concatenate([r.as_numpy(n) for r in results]) for n in outputs)

    def encode_images(self, pixel_values: np.ndarray) -> ImageEmbeddings:
        return ImageEmbeddings(*self._graph(IMAGE_ENCODER, pixel_values.astype(np.float32)))

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        return self._graph(TEXT_ENCODER, input_ids.astype(np.int64))[0]

    def score_tags(self, patch_views: np.ndarray, request: HeadRequest) -> TagHeadOutputs:
        """Triton batches every input on its first axis: a vocabulary's single row goes to each image."""
        batch = len(patch_views)
        feeds = [feed if len(feed) == batch else np.broadcast_to(feed, (batch, *feed.shape[1:]))
                 for feed in head_feeds(patch_views, request)]
        outputs = list(TAG_HEAD.outputs if request.with_cosines else TAG_HEAD.outputs[:1])
        result = self._infer(TAG_HEAD.served_as, dict(zip(TAG_HEAD.inputs, feeds)), outputs)
        return TagHeadOutputs(result[0], result[1] if request.with_cosines else None)

    def tag_images(self, images: np.ndarray, preprocessing: ImagePreprocessing,
                   request: HeadRequest) -> TagHeadOutputs:
        return tag_images_on_host(self, images, preprocessing, request)
