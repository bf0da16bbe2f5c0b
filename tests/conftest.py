"""Shared fixtures: offline, seeded, single-threaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# on a GPU, records of the pipelined and plain jobs are compared byte for byte: cuBLAS must pick
# the same kernels on both streams (a fixed workspace; docs/gpu.md, the pipelined job)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TTD_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="ttd-test-cache-"))  # not ~/.cache

import pytest
import torch

from ttd.model.factory import create_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    """The world-tiny architecture, random-initialised with seed 0."""
    return create_model("world-tiny", seed=0)


@pytest.fixture()
def fresh_tiny_model():
    return create_model("world-tiny", seed=0)


# Every test has a deadline, so that a regression fails, never hangs the suite (tests/deadlines.py)
from deadlines import DEFAULT_DEADLINE, DeadlineExceeded, pytest_configure, pytest_runtest_call  # noqa: E402,F401
