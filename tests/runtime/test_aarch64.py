"""The base install on an aarch64 CPU (Jetson, Graviton, Ampere, Raspberry Pi 5; docs/edge.md):
Debian's arm64 CPython under qemu-user with the aarch64 wheels of the base install (built by
.ci/aarch64-sysroot), running this checkout on the embedded default's export. Its records equal
this machine's torch default's: the same selections, scores within 1e-5, the same masks but for
pixels on the threshold. Emulation is for correctness only, never timings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aarch64_records import records

ROOT = Path(__file__).parents[2]
CACHE = Path(os.environ.get("TTD_AARCH64_ROOT", ROOT / ".ci-cache" / "aarch64"))
PYTHON = CACHE / "sysroot" / "usr" / "bin" / "python3.11"
SCORE_TOLERANCE = 1e-5
MASK_TOLERANCE = 0.002  # share of a mask's pixels that may flip: float rounding at M = θ


def aarch64_command() -> list[str]:
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 is not installed (apt-get install qemu-user, or run .ci/aarch64-sysroot)")
    if not (PYTHON.is_file() and (CACHE / "site" / ".complete").is_file()):
        pytest.skip(f"no aarch64 sysroot and wheels at {CACHE}: run .ci/aarch64-sysroot")
    return ["qemu-aarch64", "-L", str(CACHE / "sysroot"), str(PYTHON)]


@pytest.fixture(scope="module")
def aarch64_run(tmp_path_factory) -> tuple[dict, dict]:
    command = aarch64_command()
    out = tmp_path_factory.mktemp("aarch64") / "records"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(out.parent), "OMP_NUM_THREADS": "1",
           "TTD_CACHE_DIR": str(out.parent / "cache"), "PYTHONPATH": f"{CACHE / 'site'}{os.pathsep}{ROOT}"}
    done = subprocess.run([*command, str(ROOT / "tests" / "aarch64_records.py"), str(ROOT / "examples" / "world"),
                           str(out)], env=env, capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(f"{out}.npz") as masks:
        return json.loads(Path(f"{out}.json").read_text()), dict(masks)


@pytest.fixture(scope="module")
def x86_run() -> tuple[dict, dict]:
    return records(ROOT / "examples" / "world", backend="torch")


def test_it_ran_the_base_install_on_aarch64(aarch64_run, x86_run):
    arm, _ = aarch64_run
    assert (arm["machine"], arm["backend"], arm["torch_modules"]) == ("aarch64", "onnxruntime", [])
    assert x86_run[0]["backend"] == "torch"


@pytest.mark.parametrize("mode", ["captions", "vocabulary", "captions+masks", "vocabulary+masks"])
def test_aarch64_records_equal_the_torch_default_on_x86(aarch64_run, x86_run, mode):
    arm, ours = aarch64_run[0][mode], x86_run[0][mode]
    assert [r["selected"] for r in arm] == [r["selected"] for r in ours]
    assert sum(len(r["selected"]) for r in ours) >= 8  # the examples select tags: a real comparison
    for a, b in zip(arm, ours):
        assert a["scores"].keys() == b["scores"].keys()
        assert max(abs(a["scores"][t] - b["scores"][t]) for t in a["scores"]) <= SCORE_TOLERANCE


def test_aarch64_masks_equal_the_torch_defaults(aarch64_run, x86_run):
    arm, ours = aarch64_run[1], x86_run[1]
    assert arm.keys() == ours.keys() and len(ours) >= 16
    for key, mask in ours.items():
        assert arm[key].shape == mask.shape
        assert (arm[key] != mask).sum() <= MASK_TOLERANCE * max(1, mask.sum()), key
