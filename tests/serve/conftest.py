"""What the serving tests share: the world-tiny export their repositories are built from."""

import pytest

from export.pipeline import run_export
from ttd.model.factory import create_model


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A world-tiny export (fp32 graphs), made once per test module."""
    out = tmp_path_factory.mktemp("export")
    run_export(create_model("world-tiny", seed=0), out, check_count=8)
    return out
