"""What a job refuses rather than lose or mix records (docs/reliability.md, "One job per output"
and "What --resume checks"): links planted beside its output, and a resume over inputs or a
model that changed since the job began."""

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from jobs.test_stream_job import world_job
from ttd.cli import main
from ttd.jobs.jsonl_output import finished_job_path, job_path, partial_path
from ttd.jobs.output_lock import lock_path

MODEL = ["--model", "world-tiny", "--device", "cpu", "--quiet"]


def tag(*args):
    return CliRunner().invoke(main, ["tag", *MODEL, *map(str, args)], catch_exceptions=False)


def killed_after(output: Path, keep: int) -> None:
    """What a SIGKILL after `keep` records leaves of a finished JSON-lines output."""
    lines = output.read_text().splitlines(keepends=True)
    partial_path(output).write_text("".join(lines[:keep]))
    shutil.move(finished_job_path(output), job_path(output))
    output.unlink()


def test_links_and_fifos_planted_beside_the_output_are_never_written_through(tmp_path):
    captions = world_job(tmp_path, 2)
    output = tmp_path / "tags.jsonl"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock_path(output).symlink_to(victim)
    result = tag("--captions", captions, "-o", output)
    # before: the job truncated victim.txt and wrote its holder line into it
    assert result.exit_code == 2 and victim.read_text() == "precious"
    assert result.output.strip().splitlines()[-1] == (f"error: {lock_path(output)} is a symbolic link; a job never "
                                                      "writes through one beside its output: remove it (or choose "
                                                      "another output)")
    lock_path(output).unlink()
    partial_path(output).symlink_to(victim)  # a fresh job removes the link, never truncates its target
    assert tag("--captions", captions, "-o", output).exit_code == 0
    assert victim.read_text() == "precious" and len(output.read_text().splitlines()) == 2
    lock_path(output).unlink()  # the finished job leaves its (plain) lock file
    os.mkfifo(lock_path(output))  # was "Invalid argument" naming no path
    result = tag("--captions", captions, "-o", output)
    assert result.exit_code == 2 and f"error: {lock_path(output)} is not a plain file (a FIFO" in result.output
