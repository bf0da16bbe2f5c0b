"""int8 exports hold on every x86-64 CPU class: no u8s8 saturation without VNNI (emulated here, so
the AVX2 case runs on any machine), the gate CPU in the manifest, and the re-check on load."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from export.checks import GateError, check_pairs
from export.int8_portability import INT16_MAX, qemu_avx2_command, run_as_pre_vnni, worst_pair_sum
from export.pipeline import run_export
from export.precision import FULL_RANGE, PORTABLE, to_int8
from ttd.model.factory import create_model
from ttd.runtime.hardware import Capabilities, cpu_capabilities
from ttd.runtime.images import Preprocess, normalize
from ttd.runtime import PortabilityNotice, load_tagger
from ttd.runtime.export_dir import read_export
from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend
from ttd.runtime.portability import REFERENCE_SAMPLES, PortabilityError, check_here

AVX2_ONLY = Capabilities(model="test AVX2-only CPU", flags=("avx2", "fma", "f16c"))


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    manifest = run_export(create_model("world-tiny", seed=0), out, "int8", "dynamic", check_count=16)
    return out, manifest


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    run_export(create_model("world-tiny", seed=0), out, check_count=4)
    return out


def _image_encoder(tmp_path, fp32_export, settings):
    """The fp32 image encoder of world-tiny, quantised dynamically with `settings`, and check inputs."""
    tmp_path.mkdir(parents=True)
    path = tmp_path / "image_encoder.onnx"
    shutil.copy(fp32_export / "image_encoder.onnx", path)
    to_int8(path, "dynamic", None, settings)
    config = read_export(fp32_export).config
    images, _ = check_pairs(Preprocess(config.image_size), 8)
    return path, {"pixel_values": normalize(images, config.mean, config.std).astype(np.float32)}


def _cos(a, b):
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


def test_full_range_int8_saturates_on_a_pre_vnni_cpu_and_portable_int8_does_not(tmp_path, fp32_export):
    from onnx.reference import ReferenceEvaluator

    full, feeds = _image_encoder(tmp_path / "full", fp32_export, FULL_RANGE)
    exact = ReferenceEvaluator(str(full)).run(None, feeds)[0]  # exact int32 sums: what VNNI/AMX compute
    assert worst_pair_sum(full) == 255 * 2 * 127
    assert _cos(exact, run_as_pre_vnni(full, feeds)[0]) < 0.999  # saturated int16 pairs

    portable, feeds = _image_encoder(tmp_path / "portable", fp32_export, PORTABLE)
    assert worst_pair_sum(portable) == 255 * 2 * 64 <= INT16_MAX
    exact = ReferenceEvaluator(str(portable)).run(None, feeds)
    emulated = run_as_pre_vnni(portable, feeds)
    for a, b in zip(exact, emulated):
        np.testing.assert_array_equal(a, b)  # the AVX2 kernel computes exactly what VNNI computes


def test_export_refuses_int8_that_could_saturate_without_vnni(tmp_path):
    with pytest.raises(GateError, match=r"image_encoder's u8s8 products can reach int16 pair sums of 64770 > 32767"):
        run_export(create_model("world-tiny", seed=0), tmp_path, "int8", "dynamic", check_count=4,
                   int8_settings=FULL_RANGE)
    assert not (tmp_path / "image_encoder.onnx").exists()


def test_int8_manifest_records_gate_cpu_settings_and_reference_samples(int8_export):
    out, manifest = int8_export
    here = cpu_capabilities(with_gpu=False)
    assert manifest["gate_cpu"]["isa_class"] == here.isa_class and manifest["gate_cpu"]["flags"] == list(here.flags)
    assert manifest["int8"] == {"mode": "dynamic", "reduce_range": True, "per_channel": True,
                                "unsigned_activations": True, "unsigned_weights": False, "worst_pair_sum": 32640}
    assert REFERENCE_SAMPLES in manifest["files"]  # hashed: a tampered sample file fails read_export
    samples = np.load(out / REFERENCE_SAMPLES)
    assert samples["pixel_values"].shape == (4, 3, 64, 64) and samples["patch_embeds"].shape == (4, 128, 8, 8)


def test_int8_export_is_rechecked_on_another_cpu_class(int8_export, tmp_path):
    out, manifest = int8_export
    export = read_export(out)
    backend = OnnxRuntimeBackend(export, "cpu")
    same = check_here(out, manifest, backend, Capabilities.from_dict(manifest["gate_cpu"]))
    assert not same.checked and "not re-checked" in same.message
    other = check_here(out, manifest, backend, AVX2_ONLY)
    assert other.checked and "re-checked on this avx2 CPU" in other.message
    assert min(other.min_cosine.values()) > 0.995

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    samples = dict(np.load(broken / REFERENCE_SAMPLES))
    samples["patch_embeds"] = samples["patch_embeds"][::-1].copy()  # outputs that do not match the inputs
    np.savez_compressed(broken / REFERENCE_SAMPLES, **samples)
    with pytest.raises(PortabilityError, match=r"loses quality on this avx2 CPU \(patch_embeds cosine"):
        check_here(broken, manifest, backend, AVX2_ONLY)
    (broken / REFERENCE_SAMPLES).unlink()
    unchecked = check_here(broken, manifest, backend, AVX2_ONLY)
    assert not unchecked.checked and "NOT checked on this avx2 CPU" in unchecked.message


def test_loading_an_int8_export_says_whether_it_was_checked_here(int8_export):
    out, _ = int8_export
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_tagger("onnxruntime", export_dir=str(out), device="cpu")
    notices = [str(w.message) for w in caught if issubclass(w.category, PortabilityNotice)]
    assert len(notices) == 1 and notices[0].startswith("int8 export gated on")


CAPPED = """
import json, torch
from export.checks import VARIANT_GATE, check_pairs, compare, enforce
from ttd.runtime.images import Preprocess
from export.int8_portability import PreVnniEmulatedBackend
from export.pipeline import run_export
from ttd.runtime import model_tagger
from ttd.model.factory import create_model
from ttd.runtime.export_dir import read_export
from ttd.runtime.torch_backend import TorchBackend
torch.set_num_threads(2)
out = {out!r}
model = create_model("world-tiny", seed=0)
manifest = run_export(create_model("world-tiny", seed=0), __import__("pathlib").Path(out), "int8", {mode!r}, check_count=8)
figures = manifest["quality"]
if {mode!r} == "dynamic":  # also the int8 kernels as an AVX2 CPU runs them
    reference = model_tagger(TorchBackend(model, "cpu", "float32"), model)
    figures = compare(reference, model_tagger(PreVnniEmulatedBackend(read_export(out)), model), *check_pairs(Preprocess(64), 8),
                      batch_sizes=(4,))
    enforce(figures, VARIANT_GATE, "int8 on an emulated AVX2 CPU")
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), "quality": figures, "int8": manifest["int8"]}}))
"""


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_gate_passes_with_the_isa_capped_to_avx2(tmp_path, mode):
    """torch capped to AVX2 (ATen and oneDNN) for the reference; onnxruntime, which cannot be capped,
    runs its int8 kernels as a pre-VNNI CPU would through the emulation (dynamic graphs)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="2")
    script = CAPPED.format(out=str(tmp_path / "x"), mode=mode)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["capability"] == "AVX2"
    # no integer GEMM can saturate without VNNI: 7-bit int8 weights (dynamic) or uint8 weights (static, u8u8)
    assert (result["int8"]["worst_pair_sum"], result["int8"]["unsigned_weights"]) == (
        (32640, False) if mode == "dynamic" else (0, True))
    quality = result["quality"]
    assert min(quality["min_cosine"][k] for k in ("image_embeds", "patch_embeds", "text_embeds")) >= 0.99
    assert quality["tag_agreement"] >= 0.95


def test_ttd_tag_prints_the_cpu_check_line(int8_export, tmp_path):
    from click.testing import CliRunner

    from ttd.cli import main
    from ttd.data.annotations import write_world_split

    out, _ = int8_export
    annotations = write_world_split(tmp_path / "world", seed=2, count=2, progress=False)
    result = CliRunner().invoke(main, ["tag", "--captions", str(annotations), "-o", str(tmp_path / "t.jsonl"), "--quiet",
                                       "--backend", "onnxruntime", "--export-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "int8 export gated on this CPU class" in result.output and "PortabilityNotice" not in result.output


QEMU_AVX2 = qemu_avx2_command()
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(QEMU_AVX2 is None, reason="no qemu-x86_64 on this x86-64 machine: `apt-get install qemu-user` "
                                              "(.ci/run installs it) to run onnxruntime on an AVX2-only instruction set")
def test_int8_holds_on_an_avx2_instruction_set_under_qemu(int8_export, tmp_path):
    """Issue 23: the real pre-VNNI kernels, not the emulation. `qemu-x86_64 -cpu Haswell` runs this
    interpreter with AVX-512, VNNI and AMX hidden from CPUID, so onnxruntime picks its AVX2 int8
    kernels: the world export's int8 gate holds there, and on a ViT-B/16 layer stack onnxruntime's
    default int8 visibly saturates while the portable settings stay at fp32's level."""
    from export.int8_layer_stack import write_layer_stack
    from export.int8_portability import layer_stack_cosines

    out, _ = int8_export
    stack = write_layer_stack(tmp_path / "stack", blocks=4, tokens=17)
    here = layer_stack_cosines(stack)  # this machine's kernels (exact int32 sums with VNNI/AMX)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([*QEMU_AVX2, sys.executable, "-m", "export.int8_portability", str(out), str(stack)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    avx2 = json.loads(done.stdout.strip().splitlines()[-1])
    assert avx2["cpuid"] == {"AVX2": True, "FMA3": True, "F16C": True, "AVX512F": False, "AVX512BW": False,
                             "AVX512VNNI": False}
    assert avx2["isa_class"] == "avx2"
    assert avx2["export"]["checked"], avx2["export"]["message"]  # re-checked, not skipped as the same class
    assert min(avx2["export"]["min_cosine"].values()) >= 0.99  # the gate's cosine on its reference samples
    stack_avx2 = avx2["layer_stack"]
    print(f"layer stack, min cosine vs fp32: here {here}, under qemu -cpu Haswell {stack_avx2}")
    assert stack_avx2["portable"] >= 0.9999 and abs(stack_avx2["portable"] - here["portable"]) < 1e-5
    assert stack_avx2["onnxruntime_default"] < 0.999  # saturated int16 pairs: the failure the settings prevent
    assert (1 - stack_avx2["onnxruntime_default"]) > 20 * (1 - stack_avx2["portable"])
