"""The PyTorch backend: runs the contract graphs of ttd/graphs.py on cuda (if present) or CPU."""

from __future__ import annotations

import numpy as np
import torch

from ttd.graphs import ImageEncoderGraph, TagHeadGraph, TextEncoderGraph
from ttd.model import TTDModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(device)


class TorchBackend:
    name = "torch"

    def __init__(self, model: TTDModel, device: str | None = None, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.device = pick_device(device)
        self.dtype = DTYPES[dtype]
        model = model.to(self.device, self.dtype).eval()
        self.image_encoder = ImageEncoderGraph(model)
        self.text_encoder = TextEncoderGraph(model)
        self.tag_head = TagHeadGraph(model.config.tau, model.mask_weight.item(), model.mask_bias.item())

    def _run(self, graph, *arrays: np.ndarray, dtype: torch.dtype | None = None):
        with torch.inference_mode():
            tensors = [torch.from_numpy(a).to(self.device, (dtype or self.dtype) if a.dtype.kind == "f" else None)
                       for a in arrays]
            outputs = graph(*tensors)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return tuple(o.float().cpu().numpy() for o in outputs)

    def encode_images(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._run(self.image_encoder, pixel_values)

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run(self.text_encoder, input_ids)[0]

    def score_tags(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray) -> tuple[np.ndarray, ...]:
        # the head is a softmax at τ = 100: always float32, whatever the encoders run in
        return self._run(self.tag_head, patch_embeds, tag_embeds, dtype=torch.float32)
