"""The base install (no `torch` extra, docs/edge.md): the runtime modules with torch, open_clip,
safetensors and onnx made unimportable (tests/torch_blocked.py, in a subprocess), the embedded
default's export in step with its weights, and an open_clip model's export tokenising without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.embedded_default import SOURCE_KEY
from export.pipeline import run_export
from ttd.model.factory import DEFAULT_CHECKPOINT, _build_clip, load_checkpoint
from ttd.model.clip import TTDModel
from ttd.model.config import ModelConfig
from ttd.model.tokenizer import TruncationWarning
from ttd.runtime import load_tagger, model_tagger, torch_tagger
from ttd.runtime.base_install import DEFAULT_EXPORT, export_for_torch_request
from ttd.runtime.export_dir import TOKENIZER, read_export, sha256
from ttd.runtime.torch_backend import TorchBackend

ROOT = Path(__file__).parents[2]
WORLD = ROOT / "examples" / "world"
BLOCKER = ROOT / "tests" / "torch_blocked.py"


def blocked(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python tests/torch_blocked.py ARGS` with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BLOCKER), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_records(ours: list[dict], reference: list[dict], tolerance: float = 1e-5) -> None:
    """Selections identical, every candidate's score within `tolerance`."""
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a["selected"] == b["selected"], (a, b)
        a_scores = {c["tag"]: c["score"] for c in a["candidates"]}
        b_scores = {c["tag"]: c["score"] for c in b["candidates"]}
        assert a_scores.keys() == b_scores.keys()
        assert max(abs(a_scores[t] - b_scores[t]) for t in a_scores) <= tolerance


def test_the_runtime_modules_import_without_torch(tmp_path):
    modules = ["ttd.cli", "ttd.api", "ttd.runtime.tagger", "ttd.runtime.onnxruntime_backend", "ttd.jobs.runner",
               "ttd.jobs.mask_files", "ttd.jobs.segment_job", "ttd.jobs.report", "ttd.segment.whole_image",
               "ttd.segment.pamr", "ttd.model.scoring", "ttd.evaluation.calibrate", "ttd.evaluation.calibration", "ttd.evaluation.label_free", "ttd.jobs.job",
               "ttd.serve.service", "ttd.model.clip_bpe"]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'onnx')))")
    done = blocked("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    refused = blocked("-c", "import torch", cwd=tmp_path)
    assert "No module named 'torch' (blocked" in refused.stderr  # the blocker itself works


def test_main_job_without_torch_equals_the_torch_default(tmp_path, monkeypatch):
    """`ttd tag --captions ... --masks-dir m` with no model named: torch's embedded default on the full
    install, its export on onnxruntime where torch is missing; the same records and masks."""
    job = ["--captions", str(WORLD / "annotations.jsonl"), "--quiet"]
    done = blocked("-m", "ttd", "tag", *job, "-o", "base.jsonl", "--masks-dir", "base_masks", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    from click.testing import CliRunner

    from ttd.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["tag", *job, "-o", "full.jsonl", "--masks-dir", "full_masks"])
    assert result.exit_code == 0, result.output
    base, full = records(tmp_path / "base.jsonl"), records(tmp_path / "full.jsonl")
    assert_same_records(base, full)
    assert sum(len(r["selected"]) for r in base) >= 8  # the job selects tags: a real comparison
    for a, b in zip(base, full):
        for tag in a["selected"]:
            grey_a = np.asarray(__import__("PIL.Image").Image.open(a["masks"][tag]), np.int16)
            grey_b = np.asarray(__import__("PIL.Image").Image.open(b["masks"][tag]), np.int16)
            assert np.abs(grey_a - grey_b).max() <= 1


@pytest.mark.parametrize("mode", ["vocabulary", "whole"])
def test_vocabulary_and_whole_image_modes_without_torch_equal_torch(tmp_path, monkeypatch, mode):
    (tmp_path / "vocab.txt").write_text("circle\nheart\nred\nsquare\ngrass\ndog\nstar\nblue\n")
    if mode == "vocabulary":
        job = ["tag", "--vocabulary", str(tmp_path / "vocab.txt"), str(WORLD / "images"), "--no-vocab-cache"]
    else:
        job = ["tag", "--captions", str(WORLD / "annotations.jsonl"), "--crop", "whole", "--masks-dir", "m"]
    done = blocked("-m", "ttd", *job, "--quiet", "-o", "base.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    from click.testing import CliRunner

    from ttd.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*job, "--quiet", "-o", "full.jsonl"])
    assert result.exit_code == 0, result.output
    base, full = records(tmp_path / "base.jsonl"), records(tmp_path / "full.jsonl")
    if mode == "vocabulary":
        for a, b in zip(base, full):
            assert [c["tag"] for c in a["top"]] == [c["tag"] for c in b["top"]]
            assert max(abs(c["score"] - d["score"]) for c, d in zip(a["top"], b["top"])) <= 1e-5
            assert [c["tag"] for c in a["selected"]] == [c["tag"] for c in b["selected"]]
    else:
        assert_same_records(base, full)


def test_a_command_of_the_torch_extra_says_which_extra_in_one_line(tmp_path):
    done = blocked("-m", "ttd", "train", "--out", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: `ttd train` needs torch, which this install leaves out: "
                                   "pip install 'ttd-toolkit[torch]'")
    named = blocked("-m", "ttd", "tag", "--captions", str(WORLD / "annotations.jsonl"), "-o", "t.jsonl",
                    "--model", "ViT-B-16", cwd=tmp_path)
    assert named.returncode == 2
    assert named.stderr.strip().splitlines() == [
        "error: --model loads a model with torch, which this install leaves out: pip install "
        "'ttd-toolkit[torch]', or run an export of it with --backend onnxruntime --export-dir DIR"]


def test_calibrate_fits_the_embedded_exports_margin_without_torch(tmp_path):
    done = blocked("-m", "ttd", "calibrate", "--captions", str(WORLD / "annotations.jsonl"), "--dry-run",
                   "--json", "fit.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("negative_margin ")
    assert json.loads((tmp_path / "fit.json").read_text())["margin_fit"]["method"] == "label-free"
    refused = blocked("-m", "ttd", "calibrate", "--captions", str(WORLD / "annotations.jsonl"), cwd=tmp_path)
    assert refused.returncode == 2 and "calibration writes into a checkpoint's config" in refused.stderr


def test_a_torch_request_without_torch_runs_only_the_same_fp32_model():
    assert export_for_torch_request(None, None, None, None) == str(DEFAULT_EXPORT)
    assert export_for_torch_request(None, None, None, "exp") == "exp"
    with pytest.raises(ImportError, match=r"--dtype bf16 applies to the torch backend"):
        export_for_torch_request(None, None, None, None, dtype="bf16")
    with pytest.raises(ImportError, match=r"--checkpoint loads a model with torch"):
        export_for_torch_request(None, None, "m.safetensors", None)


def test_the_embedded_export_is_the_embedded_weights():
    """Regenerate with `python -m export.embedded_default` when world-base.safetensors changes."""
    export = read_export(DEFAULT_EXPORT)  # every file's sha256 checked
    assert export.manifest[SOURCE_KEY] == {"file": DEFAULT_CHECKPOINT.name, "sha256": sha256(DEFAULT_CHECKPOINT)}
    model = load_checkpoint(DEFAULT_CHECKPOINT)
    assert export.config == model.config
    assert (export.mask_weight, export.mask_bias) == (model.mask_weight.item(), model.mask_bias.item())
    assert export.precision == "fp32" and "model.safetensors" not in export.manifest["files"]
    size = sum(p.stat().st_size for p in DEFAULT_EXPORT.iterdir())
    assert size < 8 << 20  # it ships in the wheel beside the weights


def test_onnxruntime_with_nothing_named_runs_the_embedded_export():
    tagger = load_tagger("onnxruntime", threads=1)
    assert tagger.backend.export_root == DEFAULT_EXPORT
    reference = torch_tagger(load_checkpoint(DEFAULT_CHECKPOINT))
    texts = ["a red circle", "the orange heart on grass"]
    np.testing.assert_allclose(tagger.encode_texts(texts), reference.encode_texts(texts), atol=1e-5)


def tiny_bpe_model() -> TTDModel:
    """A tiny random ViT with CLIP's BPE vocabulary (49,408 ids): an open_clip model's tokenizer
    at the size of a test."""
    import torch

    torch.manual_seed(0)
    config = ModelConfig(
        name="tiny-bpe", source="test", tokenizer={"kind": "open_clip", "name": "ViT-B-16"}, dense_mode="avg",
        image_size=32, interpolation="bilinear", prompt_templates=("a photo of a {}.",),
        model_cfg={"embed_dim": 32,
                   "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                                  "pool_type": "avg"},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
    return TTDModel(config, _build_clip(config.model_cfg)).eval()


def test_an_open_clip_export_tokenises_without_torch(tmp_path):
    pytest.importorskip("open_clip")
    model = tiny_bpe_model()
    out = tmp_path / "export"
    run_export(model, out, check_count=8, torch_weights=False)
    export = read_export(out)
    assert TOKENIZER in export.manifest["files"] and export.config.tokenizer["kind"] == "clip_bpe"
    texts = ["Café crème on a 東京 street &amp; a dog", "a " * 40 + "very long caption"]
    ours = load_tagger("onnxruntime", export_dir=str(out), threads=1, warn_unfitted=False)
    with pytest.warns(TruncationWarning):
        ids = ours.tokenizer(texts)
    with pytest.warns(TruncationWarning):
        np.testing.assert_array_equal(ids, model.tokenizer(texts))
    reference = model_tagger(TorchBackend(model, "cpu", "fp32"), model)
    with pytest.warns(TruncationWarning):
        np.testing.assert_allclose(ours.encode_texts(texts), reference.encode_texts(texts), atol=1e-5)
    code = ("from ttd.runtime import load_tagger\n"
            f"t = load_tagger('onnxruntime', export_dir={str(out)!r}, threads=1)\n"
            "print(type(t.tokenizer).__name__, t.tokenizer(['a dog']).tolist()[0][:4])")
    done = blocked("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ClipBpeTokenizer [49406, 320, 1929, 49407]"
    spec = json.loads((out / TOKENIZER).read_text())
    (out / TOKENIZER).write_text(json.dumps({**spec, "merges": "../elsewhere.gz"}))
    with pytest.raises(Exception, match="tokenizer.json|sha256"):
        read_export(out)


def test_the_wheel_carries_the_embedded_export():
    """pyproject's package data globs (as setuptools expands them) include every file of the export."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ttd"]
    packaged = {path for pattern in patterns for path in (ROOT / "ttd").glob(pattern)}
    assert set(DEFAULT_EXPORT.iterdir()) <= packaged


def test_auto_without_torch_picks_onnxruntime_on_the_embedded_export(tmp_path):
    from ttd.runtime.auto_choice import choose_fast_path
    from ttd.runtime.hardware import Capabilities

    amx = Capabilities("Intel Xeon Platinum 8481C", ("avx2", "avx512f", "avx512_bf16", "amx_tile"))
    assert choose_fast_path(amx, export_precision="fp32").backend == "onnxruntime"
    assert choose_fast_path(amx).backend == "torch"  # with torch: bf16 weights on AMX
    without = choose_fast_path(amx, export_precision="fp32", torch_available=False)
    assert (without.backend, without.dtype, without.device) == ("onnxruntime", "fp32", "cpu")
    assert without.reason.startswith("torch is not installed (the base install): ")
    gpu = Capabilities("AMD EPYC", ("avx2",), gpu="NVIDIA H100 80GB HBM3")  # an export's own weights go to torch
    assert choose_fast_path(gpu, export_precision="fp32", export_torch_weights=True).backend == "torch"
    assert choose_fast_path(gpu, export_precision="fp32", export_torch_weights=True,
                            torch_available=False).backend == "onnxruntime"
    code = ("from ttd.runtime.auto_choice import resolve_auto\n"
            "print(resolve_auto('auto', 'auto', 'auto', None).line())")
    done = blocked("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("auto: onnxruntime fp32 on cpu — torch is not installed (the base install)")


def test_a_missing_extra_is_named_with_its_install_command():
    from ttd.model.torch_extra import as_missing_extra

    assert str(as_missing_extra(ModuleNotFoundError("x", name="aiohttp"), "`ttd serve`")) == (
        "`ttd serve` needs aiohttp, which this install leaves out: pip install 'ttd-toolkit[serve]'")
    assert "ttd-toolkit[torch]" in str(as_missing_extra(ModuleNotFoundError("x", name="open_clip.model"), "x"))
    assert as_missing_extra(ModuleNotFoundError("x", name="ttd.nothing"), "x") is None  # a bug stays a traceback


def test_segment_over_several_windows_and_scales_without_torch_equals_torch(tmp_path, monkeypatch):
    """Windows stitched, scales averaged and PAMR in numpy: what the base install runs for images
    larger than the model's input (a scale of 1.5 makes four windows of each world image)."""
    (tmp_path / "classes.txt").write_text("circle\nheart\nsquare\nstar\ngrass\nsand\n")
    job = ["segment", "--classes", str(tmp_path / "classes.txt"), str(WORLD / "images" / "010000.png"),
           str(WORLD / "images" / "010003.png"), "--scales", "1,1.5", "--pamr", "--quiet"]
    done = blocked("-m", "ttd", *job, "-o", "base.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    from click.testing import CliRunner

    from ttd.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*job, "-o", "full.jsonl"])
    assert result.exit_code == 0, result.output
    base, full = records(tmp_path / "base.jsonl"), records(tmp_path / "full.jsonl")
    assert_same_records(base, full)
    for a, b in zip(base, full):
        assert [(s["label"], s["area"]) for s in a["segments"]] == [(s["label"], s["area"]) for s in b["segments"]]
