"""Writing the three contract graphs (docs/architecture.md §4) with the TorchScript-based ONNX exporter.

The dynamo exporter specialises a batch of 1 and writes side files; the TorchScript exporter
with explicit dynamic axes and open_clip's MHA fast path disabled gives one self-contained file
per graph with a dynamic batch (docs/architecture.md §5).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ttd.model.contract import IMAGE_ENCODER, TAG_HEAD, TEXT_ENCODER, Graph
from ttd.model.graphs import ImageEncoderGraph, TagHeadGraph, TextEncoderGraph
from ttd.model.clip import TTDModel

DEFAULT_OPSET = 18
EXAMPLE_BATCH = 2  # never 1: a batch of 1 invites the exporter to specialise it


def _export(module: torch.nn.Module, args: tuple, out_dir: Path, graph: Graph, axes: list[dict[int, str]],
            opset: int) -> Path:
    """`graph` (a ttd.model.contract.Graph) to `out_dir/<name>.onnx`; `axes`: the dynamic axes of its
    inputs then its outputs, in the contract's order."""
    path = out_dir / f"{graph.name}.onnx"
    names = [*graph.inputs, *graph.outputs]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python scalars are expected here
            torch.onnx.export(module, args, str(path), input_names=list(graph.inputs),
                              output_names=list(graph.outputs), dynamic_axes=dict(zip(names, axes, strict=True)),
                              opset_version=opset, dynamo=False,
                              do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def export_graphs(model: TTDModel, out_dir: Path, opset: int = DEFAULT_OPSET,
                  dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """image_encoder.onnx, text_encoder.onnx and tag_head.onnx in `out_dir`.

    Inputs and outputs are float32 whatever `dtype` the encoders' weights are in (the graphs
    cast at their edges), so every precision variant keeps the contract's types."""
    model = model.to(dtype).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    size, dim = config.image_size, config.embed_dim
    grid_h, grid_w = config.grid_size
    batch = {0: "batch"}
    pixels = torch.randn(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    input_ids = torch.from_numpy(model.tokenizer(["a photo", "two words here"]))
    generator = torch.Generator().manual_seed(0)
    views = torch.nn.functional.normalize(torch.randn(EXAMPLE_BATCH, 2, dim, grid_h, grid_w, generator=generator), dim=2)
    tag_embeds = torch.nn.functional.normalize(torch.randn(EXAMPLE_BATCH, 3, dim, generator=generator), dim=-1)
    tag_valid = torch.tensor([[True, True, True], [True, True, False]])
    negative_embeds = torch.nn.functional.normalize(torch.randn(EXAMPLE_BATCH, 2, dim, generator=generator), dim=-1)
    negative_margin = torch.full((EXAMPLE_BATCH, 1), float(config.negative_margin))
    head = TagHeadGraph(config.tau, model.mask_weight.item(), model.mask_bias.item())
    # every axis but D and the grid is dynamic; the tag inputs' first axis is "tag_batch": the
    # images' batch, or 1 for one vocabulary broadcast over every image
    head_axes = [{0: "batch", 1: "views"}, {0: "tag_batch", 1: "tags"}, {0: "tag_batch", 1: "tags"},
                 {0: "tag_batch", 1: "negatives"}, {0: "tag_batch"}, {0: "batch", 2: "tags"}, {0: "batch", 1: "tags"}]
    with torch.no_grad():
        return {
            IMAGE_ENCODER.name: _export(ImageEncoderGraph(model), (pixels,), out_dir, IMAGE_ENCODER,
                                        [batch, batch, batch], opset),
            TEXT_ENCODER.name: _export(TextEncoderGraph(model), (input_ids,), out_dir, TEXT_ENCODER,
                                       [batch, batch], opset),
            TAG_HEAD.name: _export(head, (views, tag_embeds, tag_valid, negative_embeds, negative_margin), out_dir,
                                   TAG_HEAD, head_axes, opset),
        }
