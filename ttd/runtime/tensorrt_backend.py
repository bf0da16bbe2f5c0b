"""The TensorRT backend: runs the engines `ttd export --tensorrt` wrote, with torch CUDA tensors
as buffers (no pycuda). Needs an NVIDIA GPU and the tensorrt package."""

from __future__ import annotations

import numpy as np

from ttd.runtime.export_dir import GRAPH_NAMES, ExportDir

OUTPUTS = {"image_encoder": ("image_embeds", "patch_embeds"), "text_encoder": ("text_embeds",),
           "tag_head": ("tag_scores", "tag_masks", "tag_probs")}


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, export: ExportDir) -> None:
        try:
            import tensorrt as trt
        except ImportError as error:
            raise RuntimeError("the tensorrt backend needs the tensorrt package and an NVIDIA GPU "
                               "(pip install tensorrt on such a machine)") from error
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs an NVIDIA GPU; none is visible")
        engines = export.manifest.get("tensorrt", {}).get("engines", {})
        missing = [g for g in GRAPH_NAMES if g not in engines]
        if missing:
            raise RuntimeError(f"{export.root} has no TensorRT engines for {missing}; run `ttd export --tensorrt`")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.torch, self.stream = torch, torch.cuda.Stream()
        self.contexts = {}
        for graph in GRAPH_NAMES:
            engine = runtime.deserialize_cuda_engine(export.file(engines[graph]).read_bytes())
            self.contexts[graph] = (engine, engine.create_execution_context())

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        torch = self.torch
        engine, context = self.contexts[graph]
        keep = []
        for name, array in feeds.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in OUTPUTS[graph]:
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {graph} failed")
        self.stream.synchronize()
        return tuple(o.cpu().numpy() for o in outputs)

    def encode_images(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._run("image_encoder", {"pixel_values": pixel_values.astype(np.float32)})

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text_encoder", {"input_ids": input_ids.astype(np.int64)})[0]

    def score_tags(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._run("tag_head", {"patch_embeds": patch_embeds.astype(np.float32),
                                      "tag_embeds": tag_embeds.astype(np.float32)})
