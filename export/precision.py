"""Precision variants of the encoder graphs. fp32 is the reference; each variant must then pass
the quality gate of export/checks.py against it, or the export refuses it.

- fp16: onnxruntime's converter, LayerNormalization and Softmax kept in fp32, float32 I/O;
- bf16: the encoders exported from a bfloat16 PyTorch model (float32 I/O);
- int8: onnxruntime dynamic quantisation of the weights (MatMul/Gemm), or static QDQ
  quantisation calibrated on images and captions.
The tag head has no weights and stays fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
INT8_MODES = ("dynamic", "static")
ENCODERS = ("image_encoder", "text_encoder")


def to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True,
                                     op_block_list=["LayerNormalization", "Softmax", "ReduceL2", "ReduceSum"])
    onnx.save(model, str(path))


class _Calibration:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def to_int8(path: Path, mode: str = "dynamic", calibration: list[dict[str, np.ndarray]] | None = None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmp = path.with_suffix(".fp32.onnx")
    path.rename(tmp)
    try:
        if mode == "dynamic":
            quantize_dynamic(str(tmp), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        elif mode == "static":
            if not calibration:
                raise ValueError("static int8 quantisation needs calibration inputs")
            prepared = path.with_suffix(".pre.onnx")
            quant_pre_process(str(tmp), str(prepared), skip_symbolic_shape=True)
            try:
                quantize_static(str(prepared), str(path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["MatMul", "Gemm", "Conv"])
            finally:
                prepared.unlink(missing_ok=True)
        else:
            raise ValueError(f"unknown int8 mode {mode!r}; choose one of {', '.join(INT8_MODES)}")
    except BaseException:
        if tmp.exists():
            tmp.replace(path)
        raise
    tmp.unlink(missing_ok=True)
