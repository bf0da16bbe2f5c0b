"""Precision variants of the encoder graphs. fp32 is the reference; each variant must then pass
the quality gate of export/checks.py against it, or the export refuses it.

- fp16: onnxruntime's converter, LayerNormalization and Softmax kept in fp32, float32 I/O;
- bf16: the encoders exported from a bfloat16 PyTorch model (float32 I/O);
- int8: onnxruntime dynamic quantisation of the weights (MatMul/Gemm), or static QDQ
  quantisation calibrated on images and captions, both with uint8 activations and settings under
  which no integer GEMM can saturate on CPUs without VNNI (export/int8_portability.py), so the
  gate measured here holds on every x86-64 CPU: dynamic uses 7-bit per-channel int8 weights
  (`reduce_range`, `per_channel`); static uses uint8 weights (MLAS's u8u8 kernels widen to int16
  before multiplying), because 7-bit per-channel weights cost static QDQ its gate on the world
  model (patch cosine 0.988; benchmarks/int8_settings.py).
The tag head has no weights and stays fp32.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ttd.errors import InputError
from ttd.model.config import INT8_MODES, PRECISIONS
from ttd.model.contract import IMAGE_ENCODER, TEXT_ENCODER

ENCODERS = (IMAGE_ENCODER.name, TEXT_ENCODER.name)


def to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True,
                                     op_block_list=["LayerNormalization", "Softmax", "ReduceL2", "ReduceSum"])
    onnx.save(model, str(path))


@dataclass(frozen=True)
class Int8Settings:
    """onnxruntime quantisation options; PORTABLE is what `ttd export` uses (see the module doc)."""

    reduce_range: bool = True  # 7-bit weights: no int16 saturation in pre-VNNI u8s8 kernels
    per_channel: bool = True  # one scale per output channel wins back the bit reduce_range costs
    unsigned_activations: bool = True  # u8 activations: the form MLAS's x86 kernels take natively
    unsigned_weights: bool = False  # u8 weights: MLAS's u8u8 kernels widen to int16 first (no saturation, slower)

    def to_dict(self) -> dict:
        return asdict(self)


PORTABLE = Int8Settings()  # dynamic
PORTABLE_STATIC = Int8Settings(reduce_range=False, per_channel=False, unsigned_weights=True)
FULL_RANGE = Int8Settings(reduce_range=False, per_channel=False)  # onnxruntime's defaults: saturates on AVX2


def portable_settings(mode: str) -> Int8Settings:
    """The settings `ttd export` uses for an int8 mode (measured: benchmarks/int8_settings.py)."""
    return PORTABLE_STATIC if mode == "static" else PORTABLE


class _Calibration:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def to_int8(path: Path, mode: str = "dynamic", calibration: list[dict[str, np.ndarray]] | None = None,
            settings: Int8Settings | None = None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = settings or portable_settings(mode)
    weight_type = QuantType.QUInt8 if settings.unsigned_weights else QuantType.QInt8
    tmp = path.with_suffix(".fp32.onnx")
    path.rename(tmp)
    try:
        if mode == "dynamic":
            quantize_dynamic(str(tmp), str(path), weight_type=weight_type, op_types_to_quantize=["MatMul", "Gemm"],
                             per_channel=settings.per_channel, reduce_range=settings.reduce_range)
        elif mode == "static":
            if not calibration:
                raise InputError("static int8 quantisation needs calibration inputs")
            prepared = path.with_suffix(".pre.onnx")
            quant_pre_process(str(tmp), str(prepared), skip_symbolic_shape=True)
            try:
                quantize_static(str(prepared), str(path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8 if settings.unsigned_activations else QuantType.QInt8,
                                weight_type=weight_type,
                                op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                                per_channel=settings.per_channel, reduce_range=settings.reduce_range)
            finally:
                prepared.unlink(missing_ok=True)
        else:
            raise InputError(f"unknown int8 mode {mode!r}; choose one of {', '.join(INT8_MODES)}")
    except BaseException:
        if tmp.exists():
            tmp.replace(path)
        raise
    tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class VariantJob:
    """What a converter may use to turn the gated fp32 encoder graphs in `out_dir` into a variant."""

    model: object  # the fp32 TTDModel the graphs came from
    out_dir: Path
    opset: int
    int8_mode: str = "dynamic"
    int8_settings: Int8Settings | None = None
    calibration: Callable[[], dict[str, list[dict[str, np.ndarray]]]] = dict  # static int8: feeds per encoder


def _fp16(job: VariantJob) -> None:
    for name in ENCODERS:
        to_fp16(job.out_dir / f"{name}.onnx")


def _bf16(job: VariantJob) -> None:
    import torch

    from export.onnx_graphs import export_graphs

    with tempfile.TemporaryDirectory() as tmp:
        # a copy: casting the reference model to bf16 and back would round its weights
        graphs = export_graphs(copy.deepcopy(job.model), Path(tmp), job.opset, torch.bfloat16)
        for name in ENCODERS:
            shutil.move(graphs[name], job.out_dir / f"{name}.onnx")


def _int8(job: VariantJob) -> None:
    from export.checks import GateError
    from export.int8_portability import INT16_MAX, worst_pair_sum

    calibration = job.calibration() if job.int8_mode == "static" else {}
    for name in ENCODERS:
        path = job.out_dir / f"{name}.onnx"
        to_int8(path, job.int8_mode, calibration.get(name), job.int8_settings or portable_settings(job.int8_mode))
        worst = worst_pair_sum(path)
        if worst > INT16_MAX:
            raise GateError(f"int8 export refused: {name}'s u8s8 products can reach int16 pair sums of {worst} "
                            f"> {INT16_MAX}, which saturate on CPUs without VNNI (AVX2); quantise with reduce_range")


# precision name -> converter of the encoder graphs (fp32 is the reference and needs none);
# a new precision is one function and one entry here
CONVERTERS: dict[str, Callable[[VariantJob], None]] = {"fp16": _fp16, "bf16": _bf16, "int8": _int8}
assert set(CONVERTERS) == set(PRECISIONS) - {"fp32"}, "every precision of ttd.model.config.PRECISIONS needs a converter"
