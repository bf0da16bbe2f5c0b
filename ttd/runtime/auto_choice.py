"""`--backend auto` / `--dtype auto`: the fastest gated path for the hardware at hand, and why.

Measured facts behind the rules (docs/architecture.md §5, benchmarks/results, README "ttd bench"):
- a CUDA GPU beats every CPU path: torch on CUDA in float16 (an export on onnxruntime's GPU provider
  where the build has one, else the export's own torch weights on CUDA: 9.4k img/s for ViT-B/16
  in float16 at batch 256 on an H200, benchmarks/results/gpu_h200);
- an export directory runs in onnxruntime at the precision it was gated at; int8 exports are
  7-bit/per-channel (export/precision.py), exact on every x86-64 class, fastest with VNNI or AMX
  and still ahead of fp32 on AVX2 (1.7× on ViT-B/16 in the issue's probe);
- without an export, torch: bfloat16 where the CPU has native bf16 dot products — AMX tiles
  (3–5× fp32) or avx512_bf16 (1.8× on world-base at batch 32, gate figures 0.99993 / 99.4 %);
  elsewhere bf16 is emulated and slower than fp32 (8× slower measured on AVX2), so float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ttd.model.config import canonical_precision
from ttd.runtime.hardware import Capabilities, cpu_capabilities


@dataclass(frozen=True)
class FastPath:
    backend: str
    device: str
    dtype: str  # a ttd.model.config.PRECISIONS name: the torch weights' or the export's precision
    reason: str

    def line(self) -> str:
        return f"auto: {self.backend} {self.dtype} on {self.device} — {self.reason}"


def _torch_dtype(caps: Capabilities, device: str) -> tuple[str, str]:
    if device.startswith("cuda"):
        return "fp16", f"GPU {caps.gpu}: float16 on its tensor cores"
    if caps.isa_class == "amx":
        return "bf16", "AMX tiles run bfloat16 matmuls (3-5x float32)"
    if "avx512_bf16" in caps.flags:
        return "bf16", "avx512_bf16 dot products (1.8x float32 on world-base; no AMX here)"
    return "fp32", f"no AMX or avx512_bf16 on this {caps.isa_class} CPU ({caps.model}): bfloat16 would be emulated and slower"


def choose_fast_path(caps: Capabilities, backend: str = "auto", dtype: str = "auto", device: str | None = "auto",
                     export_precision: str | None = None, export_torch_weights: bool = False,
                     onnxruntime_gpu: bool = False, torch_available: bool = True) -> FastPath:
    """Resolve 'auto' in backend / dtype / device; explicit choices are kept as they are.

    `export_torch_weights`: the export carries its torch weights (model.safetensors);
    `onnxruntime_gpu`: this onnxruntime build has a GPU provider; `torch_available`: torch is
    installed (the base install has none: an export, the embedded default's if none is given)."""
    if backend == "auto" and not torch_available:
        backend = "onnxruntime"
    if backend == "auto":
        # on a GPU without onnxruntime's GPU provider, the export's own weights run in torch on CUDA
        gpu_torch = caps.gpu and export_torch_weights and not onnxruntime_gpu and device in (None, "auto", "cuda")
        backend = "onnxruntime" if export_precision and not gpu_torch else "torch"
    if backend == "torch":
        device = ("cuda" if caps.gpu else "cpu") if device in (None, "auto") else device
        if dtype != "auto":
            dtype = canonical_precision(dtype)
            return FastPath("torch", device, dtype, f"{dtype} as asked")
        chosen, why = _torch_dtype(caps, device)
        return FastPath("torch", device, chosen, why)
    if device in (None, "auto"):
        device = "auto" if caps.gpu else "cpu"  # auto: onnxruntime's CUDA provider where it has one
    precision = export_precision or "the export's precision"
    if caps.gpu and device != "cpu":
        why = f"GPU {caps.gpu}: the export's graphs on onnxruntime's GPU provider if this build has one"
    elif export_precision == "int8":
        why = ("int8 export: exact int8 dot products with VNNI/AMX here" if caps.has_vnni else
               f"int8 export: 7-bit weights keep it exact on this {caps.isa_class} CPU, still faster than fp32")
    else:
        why = f"the export directory's {precision} graphs (re-export with --precision int8 for a faster CPU path)"
    if not torch_available:
        why = f"torch is not installed (the base install): {why}"
    return FastPath(backend, device, precision, why)


def resolve_auto(backend: str, dtype: str, device: str | None, export_dir: str | None,
                 caps: Capabilities | None = None) -> FastPath:
    """choose_fast_path for this machine and the export directory given (if any)."""
    from ttd.runtime.base_install import DEFAULT_EXPORT, torch_installed

    precision, weights, torch_available = None, False, torch_installed()
    if not export_dir and not torch_available and backend == "auto":
        export_dir = str(DEFAULT_EXPORT)  # what the base install runs when no model is named
    if export_dir and (Path(export_dir) / "manifest.json").is_file():
        manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
        precision, weights = manifest.get("precision"), "model.safetensors" in manifest.get("files", {})
    try:
        import onnxruntime

        ort_gpu = bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()))
    except ImportError:
        ort_gpu = False
    return choose_fast_path(caps or cpu_capabilities(), backend, dtype, device, precision, weights, ort_gpu,
                            torch_available)
