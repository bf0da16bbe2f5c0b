"""--backend auto / --dtype auto: the choice for mocked hardware, and the one line that says why."""

import json

from click.testing import CliRunner

from ttd.cli import main
from ttd.runtime.auto_choice import choose_fast_path, resolve_auto
from ttd.runtime.hardware import Capabilities, parse_cpuinfo

AVX2 = Capabilities("AMD EPYC 7B12", ("avx2", "fma", "f16c"))
VNNI = Capabilities("Intel Xeon Gold 6248", ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"))
BF16 = Capabilities("AMD EPYC 9B14", ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"))
AMX = Capabilities("Intel Xeon Platinum 8481C", ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                                 "amx_tile", "amx_bf16", "amx_int8"))
GPU = Capabilities("AMD EPYC", ("avx2",), gpu="NVIDIA H100 80GB HBM3")


def test_cpuinfo_flags_decide_the_isa_class():
    text = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni\n"
    model, flags = parse_cpuinfo(text)
    assert model == "Test CPU" and flags == ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni")
    assert [c.isa_class for c in (AVX2, VNNI, AMX, Capabilities("x", ()))] == ["avx2", "avx512_vnni", "amx", "other"]
    assert Capabilities("x", ("avx2", "avx_vnni")).has_vnni and not AVX2.has_vnni


def test_auto_without_export_picks_torch_dtype_by_hardware():
    picks = {caps.model: choose_fast_path(caps) for caps in (AVX2, VNNI, BF16, AMX, GPU)}
    assert [(p.backend, p.device, p.dtype) for p in picks.values()] == [
        ("torch", "cpu", "fp32"), ("torch", "cpu", "fp32"), ("torch", "cpu", "bf16"),
        ("torch", "cpu", "bf16"), ("torch", "cuda", "fp16")]
    assert "no AMX or avx512_bf16 on this avx2 CPU (AMD EPYC 7B12)" in picks[AVX2.model].line()
    assert "avx512_bf16 dot products" in picks[BF16.model].reason
    assert picks[AMX.model].line() == "auto: torch bf16 on cpu — AMX tiles run bfloat16 matmuls (3-5x float32)"


def test_auto_with_an_export_runs_it_in_onnxruntime():
    vnni = choose_fast_path(VNNI, export_precision="int8")
    avx2 = choose_fast_path(AVX2, export_precision="int8")
    assert (vnni.backend, vnni.device, vnni.dtype) == ("onnxruntime", "cpu", "int8")
    assert "exact int8 dot products with VNNI/AMX" in vnni.reason
    assert "7-bit weights keep it exact on this avx2 CPU" in avx2.reason
    fp32 = choose_fast_path(AVX2, export_precision="fp32")
    assert fp32.backend == "onnxruntime" and "re-export with --precision int8" in fp32.reason
    gpu = choose_fast_path(GPU, export_precision="int8")  # an export without torch weights: never torch
    assert (gpu.backend, gpu.device) == ("onnxruntime", "auto") and "GPU NVIDIA H100" in gpu.reason
    with_gpu_provider = choose_fast_path(GPU, export_precision="fp16", export_torch_weights=True, onnxruntime_gpu=True)
    assert with_gpu_provider.backend == "onnxruntime"
    # a GPU, the export's torch weights and no onnxruntime GPU provider: torch on CUDA, not the CPU
    torch_gpu = choose_fast_path(GPU, export_precision="int8", export_torch_weights=True)
    assert (torch_gpu.backend, torch_gpu.device, torch_gpu.dtype) == ("torch", "cuda", "fp16")
    assert choose_fast_path(VNNI, export_precision="int8", export_torch_weights=True).backend == "onnxruntime"


def test_explicit_choices_are_kept():
    assert choose_fast_path(AMX, backend="torch", dtype="float32").dtype == "fp32"  # the torch alias, canonical
    assert choose_fast_path(AVX2, backend="torch", dtype="auto", device="cpu").dtype == "fp32"
    assert choose_fast_path(AMX, backend="torch", dtype="auto", device="cpu").dtype == "bf16"


def test_resolve_auto_reads_the_export_precision(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"precision": "int8"}))
    assert resolve_auto("auto", "auto", "auto", str(tmp_path), caps=VNNI).dtype == "int8"


def test_ttd_tag_backend_auto_prints_its_choice(tmp_path):
    from ttd.data.annotations import write_world_split

    annotations = write_world_split(tmp_path / "world", seed=2, count=3, progress=False)
    out = tmp_path / "tags.jsonl"
    result = CliRunner().invoke(main, ["tag", "--captions", str(annotations), "-o", str(out), "--quiet",
                                       "--backend", "auto", "--dtype", "auto", "--model", "world-tiny", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("auto: "))
    assert line.startswith("auto: torch ") and " on cpu — " in line
    assert len(out.read_text().splitlines()) == 3
