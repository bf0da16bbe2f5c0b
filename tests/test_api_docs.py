"""docs/api.md and the public module's docstrings run as written; the public module passes `mypy --strict`."""

from __future__ import annotations

import doctest
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["ttd/__init__.py", "ttd/api.py", "ttd/options.py", "ttd/errors.py", "ttd/jobs/job.py"]


def _blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def test_api_page_examples_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = _blocks(ROOT / "docs/api.md")
    assert len(blocks) >= 8
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's own examples


def test_readme_python_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Python", 1)[1].split("\n## ", 1)[0]
    (block,) = _blocks_of(section)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["result"].selected == ["orange", "heart", "circle"]


def _blocks_of(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("module", ["ttd", "ttd.api", "ttd.jobs.job"])
def test_docstring_examples_run(module, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    import ttd

    found = doctest.testmod(importlib.import_module(module), extraglobs={"ttd": ttd, "tmp": tmp_path},
                            optionflags=doctest.ELLIPSIS)
    assert found.attempted > 0 and found.failed == 0


@pytest.mark.skipif(shutil.which("mypy") is None and importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[dev]')")
def test_public_module_passes_mypy_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                             "--cache-dir", str(tmp_path), *PUBLIC], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
