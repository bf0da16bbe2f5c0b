"""Why an int8 export holds on every x86-64 CPU, and a way to see it fail where it would not.

onnxruntime's int8 GEMM multiplies uint8 activations by int8 weights (u8s8). With VNNI or AMX the
products are summed exactly in int32. Without VNNI (AVX2, AVX-512 without VNNI) MLAS uses
`vpmaddubsw`, which adds each *pair* of neighbouring products into an int16 with saturation:
a pair sum beyond ±32767 is clipped and the result is silently wrong. onnxruntime picks the kernel
from CPUID at start-up and offers no switch to force the AVX2 one, so this module

- measures the largest pair sum an export's integer GEMMs can reach (255 · (|w_k| + |w_k+1|)):
  when it is ≤ 32767 the pre-VNNI kernels compute exactly what VNNI/AMX compute, so a gate passed
  here holds there (7-bit weights, `reduce_range`, guarantee it: 255 · 2 · 64 = 32640);
- emulates the pre-VNNI kernel on a dynamically quantised graph (MatMulInteger with pairwise int16
  saturation, run by onnx's reference evaluator), so a test can show the failure on any machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ttd.model.contract import IMAGE_ENCODER, TEXT_ENCODER, ImageEmbeddings, TagHeadOutputs

INT16_MAX = 32767
UINT8_MAX = 255
# ops whose integer weights go through MLAS's u8s8 kernels, with the index of the weight input
INTEGER_GEMMS = {"MatMulInteger": 1, "ConvInteger": 1, "QLinearMatMul": 3, "QLinearConv": 3}


def _weights_of(graph) -> list[np.ndarray]:
    """The int8 weight tensors of a graph that feed integer GEMMs (QOperator or QDQ form); uint8 weights
    go through MLAS's u8u8 kernels, which widen both sides to int16 (pmaddwd) and cannot saturate."""
    from onnx import TensorProto, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    names = set()
    for node in graph.node:
        if node.op_type in INTEGER_GEMMS and len(node.input) > INTEGER_GEMMS[node.op_type]:
            names.add(node.input[INTEGER_GEMMS[node.op_type]])
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            names.add(node.input[0])  # QDQ: a constant int8 tensor dequantised for MatMul/Conv
    return [numpy_helper.to_array(initializers[n]).astype(np.int32) for n in sorted(names)
            if n in initializers and initializers[n].data_type == TensorProto.INT8]


def worst_pair_sum(model_path: Path) -> int:
    """The largest |a_k·w_k + a_k+1·w_k+1| any u8s8 kernel of this graph can meet (0 without int8 weights).

    Bounded as 255 · 2 · max|w|: the pairing order along K depends on MLAS's packing, so the bound
    does not assume which neighbours meet."""
    import onnx

    weights = _weights_of(onnx.load(str(model_path)).graph)
    if not weights:
        return 0
    return UINT8_MAX * 2 * max(int(np.abs(w).max()) for w in weights)


def _matmul_integer_avx2():
    from onnx.reference.op_run import OpRun

    class MatMulInteger(OpRun):  # the class name is the op it replaces in the reference evaluator
        def _run(self, A, B, a_zero_point=None, b_zero_point=None):
            a, b = A.astype(np.int32), B.astype(np.int32)
            k = a.shape[-1]
            if k % 2:
                a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), np.int32)], -1)
                b = np.concatenate([b, np.zeros((1,) + b.shape[1:], np.int32)], 0)
            pairs = (np.einsum("...mk,kn->...mkn", a[..., 0::2], b[0::2])
                     + np.einsum("...mk,kn->...mkn", a[..., 1::2], b[1::2]))
            raw = np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(-2)  # vpmaddubsw, then exact vpmaddwd
            za = np.int32(0 if a_zero_point is None else a_zero_point)
            zb = np.zeros((), np.int32) if b_zero_point is None else b_zero_point.astype(np.int32)
            out = raw - za * B.astype(np.int32).sum(0) - zb * A.astype(np.int32).sum(-1, keepdims=True) + k * za * zb
            return (out.astype(np.int32),)

    return MatMulInteger


def run_as_pre_vnni(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of a dynamically quantised graph as an AVX2 (pre-VNNI) u8s8 kernel would compute them.

    Slow (numpy reference evaluator): for small graphs and a few inputs, in tests."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(model_path), new_ops=[_matmul_integer_avx2()]).run(None, feeds)


class PreVnniEmulatedBackend:
    """A runtime backend whose encoders run as on an AVX2 CPU (run_as_pre_vnni), the tag head in
    onnxruntime: the quality gate of export/checks.py can then be measured for that CPU class here."""

    name = "onnxruntime (pre-VNNI u8s8 emulated)"

    def __init__(self, export) -> None:
        from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend

        self.export, self.head = export, OnnxRuntimeBackend(export, "cpu")

    def encode_images(self, pixel_values: np.ndarray) -> ImageEmbeddings:
        return ImageEmbeddings(*run_as_pre_vnni(self.export.graph(IMAGE_ENCODER.name),
                                                {IMAGE_ENCODER.inputs[0]: pixel_values.astype(np.float32)}))

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        return run_as_pre_vnni(self.export.graph(TEXT_ENCODER.name), {TEXT_ENCODER.inputs[0]: input_ids.astype(np.int64)})[0]

    def score_tags(self, patch_views: np.ndarray, request) -> TagHeadOutputs:
        return self.head.score_tags(patch_views, request)

    def tag_images(self, images: np.ndarray, preprocessing, request) -> TagHeadOutputs:
        from ttd.runtime.backend import tag_images_on_host

        return tag_images_on_host(self, images, preprocessing, request)


# ---------------------------------------------------------------- the real AVX2 kernels, under qemu
#
# The emulation above models one kernel. On any x86-64 machine the real ones can be run: qemu's
# user-mode emulator with `-cpu Haswell` runs this same interpreter and venv with AVX-512, VNNI and
# AMX hidden from CPUID, so onnxruntime's MLAS picks its AVX2 (pre-VNNI) int8 kernels. Under
# qemu-user /proc/cpuinfo is still the host's, so what the process sees is read from CPUID itself
# (numpy's runtime dispatch table) instead.

QEMU_AVX2_CPU = "Haswell"  # AVX2, FMA, F16C; no AVX-512, no VNNI, no AMX
NUMPY_TO_CPUINFO = {"AVX2": "avx2", "FMA3": "fma", "F16C": "f16c", "AVX512F": "avx512f", "AVX512BW": "avx512bw",
                    "AVX512VNNI": "avx512_vnni"}


def cpuid_features() -> dict[str, bool]:
    """The instruction-set features CPUID reports to this process, as numpy dispatches on them (numpy
    lists no AMX or AVX-VNNI: enough to tell AVX2 from VNNI, not AMX from AVX-512 VNNI)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return {name: bool(__cpu_features__.get(name, False)) for name in NUMPY_TO_CPUINFO}


def qemu_avx2_command(qemu: str | None = None) -> list[str] | None:
    """The command prefix that runs a program on an AVX2-only instruction set (None without qemu-x86_64
    or off x86-64, where qemu-user would emulate a whole foreign CPU)."""
    import platform
    import shutil

    qemu = qemu or shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    return [qemu, "-cpu", QEMU_AVX2_CPU]


STACK_GRAPHS = ("onnxruntime_default", "portable")


def layer_stack_cosines(stack_dir: Path) -> dict[str, float]:
    """Worst per-token cosine of each int8 stack against PyTorch fp32, run by onnxruntime here."""
    import onnxruntime as ort

    data = np.load(stack_dir / "stack.npz")
    cosines = {}
    for name in STACK_GRAPHS:
        session = ort.InferenceSession(str(stack_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        out, ref = session.run(None, {"tokens": data["tokens"]})[0], data["out"]
        cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
        cosines[name] = float(cos.min())
    return cosines


def check_on_this_instruction_set(export_dir: Path, stack_dir: Path | None) -> dict:
    """What `python -m export.int8_portability` prints: the CPUID features this process sees, the int8
    export's re-check on its reference samples (the portability gate, ttd/runtime/portability.py)
    and the layer stack's cosines."""
    from ttd.runtime.export_dir import read_export
    from ttd.runtime.hardware import Capabilities
    from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from ttd.runtime.portability import check_here

    features = cpuid_features()
    here = Capabilities(model="as CPUID reports it", flags=tuple(NUMPY_TO_CPUINFO[n] for n, on in features.items() if on))
    export = read_export(export_dir)
    check = check_here(export_dir, export.manifest, OnnxRuntimeBackend(export, "cpu"), here)
    return {"cpuid": features, "isa_class": here.isa_class,
            "export": {"checked": check.checked, "message": check.message, "min_cosine": check.min_cosine},
            "layer_stack": layer_stack_cosines(stack_dir) if stack_dir else None}


if __name__ == "__main__":  # qemu-x86_64 -cpu Haswell python -m export.int8_portability EXPORT [STACK]
    import json
    import sys

    print(json.dumps(check_on_this_instruction_set(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)))
