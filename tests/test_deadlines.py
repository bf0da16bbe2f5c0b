"""Every test has a deadline (tests/deadlines.py): a test that hangs — a server that never
answers, a subprocess that never ends — fails in seconds instead of holding the suite until it
is killed (a broken hash check once let the flipped-byte test start a real server on port 1)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.deadline(120)
def test_a_hanging_test_fails_at_its_deadline(tmp_path):
    (tmp_path / "test_hangs.py").write_text(
        "import subprocess, sys, time\nimport pytest\n\n"
        "@pytest.mark.deadline(2)\ndef test_waits_on_a_subprocess_that_never_ends():\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "    try:\n        child.wait()\n    finally:\n        child.kill()\n\n"
        "def test_a_quick_one_passes():\n    time.sleep(0.1)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "deadlines", "-p", "no:cacheprovider",
                           str(tmp_path / "test_hangs.py")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}"}, timeout=100)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "test_waits_on_a_subprocess_that_never_ends ran past its 2 s deadline" in done.stdout
    assert "1 failed, 1 passed" in done.stdout
    assert time.monotonic() - started < 60
