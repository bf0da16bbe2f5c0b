"""A small ViT-B/16 layer stack quantised both ways (onnxruntime's default int8 and `ttd export`'s
portable settings), for the int8 check on an AVX2 instruction set under qemu
(export.int8_portability.layer_stack_cosines reads it there). Apart from export.int8_portability
because it builds with export.precision, which imports the portability checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.int8_portability import STACK_GRAPHS


def write_layer_stack(out_dir: Path, blocks: int = 4, tokens: int = 17, seed: int = 0) -> Path:
    """The first `blocks` transformer blocks of an open_clip ViT-B/16 image tower (random weights,
    width 768, MLP 3072), batch 1, `tokens` tokens after ln_pre: fp32 ONNX, quantised dynamically with
    onnxruntime's defaults (full-range int8 weights) and with `ttd export`'s portable settings, and
    the input with PyTorch's fp32 output (stack.npz). Small enough to run emulated in seconds."""
    import shutil
    import warnings

    import torch

    from export.precision import FULL_RANGE, PORTABLE, to_int8
    from ttd.model.factory import create_model

    visual = create_model("ViT-B-16", seed=seed).clip.visual
    stack = torch.nn.Sequential(*list(visual.transformer.resblocks)[:blocks]).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_in = torch.randn(1, tokens, visual.transformer.width, generator=torch.Generator().manual_seed(seed))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about python scalars are expected here
            x = visual.ln_pre(tokens_in)
            torch.onnx.export(stack, (x,), str(out_dir / "fp32.onnx"), input_names=["tokens"], output_names=["out"],
                              opset_version=18, dynamo=False)
            reference = stack(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    for name, settings in zip(STACK_GRAPHS, (FULL_RANGE, PORTABLE), strict=True):
        shutil.copy(out_dir / "fp32.onnx", out_dir / f"{name}.onnx")
        to_int8(out_dir / f"{name}.onnx", "dynamic", None, settings)
    (out_dir / "fp32.onnx").unlink()  # 4 blocks: 113 MB, not needed once the variants are made
    np.savez(out_dir / "stack.npz", tokens=x.numpy(), out=reference.numpy())
    return out_dir
