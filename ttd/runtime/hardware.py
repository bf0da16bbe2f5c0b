"""What this machine can run fast: the CPU's model, its vector/matrix ISA flags and class, and
the GPU if torch sees one. Read from /proc/cpuinfo (Linux), so nothing here assumes a CPU feature.

ISA classes, slowest first (each implies the ones before it on x86-64):
- `avx2`: int8 u8s8 GEMMs use vpmaddubsw (int16 pair sums that can saturate), bf16 is emulated;
- `avx512`: wider, same int8 arithmetic as avx2;
- `avx512_vnni` (or AVX-VNNI): exact int8 dot products, int8 is the fast CPU path;
- `amx`: AMX tiles for bf16 and int8 matmuls; bf16 in torch is the fast path.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

ISA_CLASSES = ("other", "avx2", "avx512", "avx512_vnni", "amx")
# the flags that decide a fast path; the manifest and `ttd bench` record these
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                  "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Capabilities:
    model: str
    flags: tuple[str, ...]  # the RELEVANT_FLAGS this CPU has
    gpu: str | None = None  # torch.cuda device name, None without a usable GPU
    machine: str = field(default_factory=platform.machine)

    @property
    def isa_class(self) -> str:
        has = set(self.flags)
        if {"amx_tile", "amx_bf16"} <= has:
            return "amx"
        if has & {"avx512_vnni", "avx_vnni"}:
            return "avx512_vnni"
        if "avx512bw" in has:
            return "avx512"
        if "avx2" in has:
            return "avx2"
        return "other"

    @property
    def has_vnni(self) -> bool:
        return ISA_CLASSES.index(self.isa_class) >= ISA_CLASSES.index("avx512_vnni")

    def to_dict(self) -> dict:
        return {"model": self.model, "machine": self.machine, "isa_class": self.isa_class,
                "flags": list(self.flags), "gpu": self.gpu}

    @classmethod
    def from_dict(cls, data: dict) -> "Capabilities":
        return cls(model=data.get("model", "unknown"), flags=tuple(data.get("flags", ())), gpu=data.get("gpu"),
                   machine=data.get("machine", "unknown"))


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(model name, relevant flags) from the text of /proc/cpuinfo."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, tuple(f for f in RELEVANT_FLAGS if f in flags)


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch, or a broken CUDA install: no GPU as far as we are concerned
        return None


def cpu_capabilities(cpuinfo: Path = Path("/proc/cpuinfo"), with_gpu: bool = True) -> Capabilities:
    """This machine's capabilities ('unknown'/no flags where /proc/cpuinfo is not readable)."""
    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text())
    except OSError:
        model, flags = platform.processor() or "unknown", ()
    return Capabilities(model=model, flags=flags, gpu=_gpu_name() if with_gpu else None)


# Images per batch of `--batch-size auto` (docs/gpu.md): a data-centre GPU is launch-bound at 32
# (ViT-B/16 bf16 on an H200: 1.3k images/s at batch 8, 9.8k at 256); a CPU gains nothing past 32.
# Whole images hold each full-size image in memory, hence fewer per batch.
AUTO_BATCH = {("gpu", "center"): 256, ("gpu", "whole"): 64, ("cpu", "center"): 32, ("cpu", "whole"): 8}


def auto_batch_size(device: str | None, crop: str = "center") -> int:
    """`--batch-size auto` for `device` (cpu, cuda, cuda:N, tensorrt; auto/None: a GPU if torch sees one)."""
    kind = (device or "auto").split(":")[0]
    gpu = kind in ("cuda", "tensorrt") or (kind == "auto" and _gpu_name() is not None)
    return AUTO_BATCH[("gpu" if gpu else "cpu", "whole" if crop == "whole" else "center")]
