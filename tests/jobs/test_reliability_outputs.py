"""Reliability of job outputs: one job per output (a lock
that names its holder and dies with it), a resume that checks the index sequence and that its
captions file is unchanged, a full disk as one line with the partial kept, records that do not
depend on batch composition, and a progress total that counts CSV records."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.test_stream_job import world_job
from ttd.cli import main
from ttd.data.items import count_items
from ttd.jobs.jsonl_output import finished_job_path, job_path, partial_path
from ttd.jobs.output_lock import OutputInUse, OutputLock, lock_path
from ttd.jobs.parquet_output import SUCCESS_FILE, shard_files

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model", "world-tiny", "--device", "cpu", "--quiet"]


def tag(captions, output, *extra):
    return CliRunner().invoke(main, ["tag", "--captions", str(captions), "-o", str(output), *MODEL,
                                     *map(str, extra)], catch_exceptions=False)


def killed_after(output: Path, keep: int) -> None:
    """What a SIGKILL after `keep` records leaves of a finished JSON-lines output."""
    lines = output.read_text().splitlines(keepends=True)
    partial_path(output).write_text("".join(lines[:keep]))
    shutil.move(finished_job_path(output), job_path(output))
    output.unlink()


# item 1: one job per output -----------------------------------------------------------------------

@pytest.mark.parametrize("name, extra", [("tags.jsonl", []), ("tags.parquet", ["--format", "parquet"])])
def test_a_second_job_on_an_output_in_use_is_refused_at_once_naming_the_holder(tmp_path, name, extra):
    captions = world_job(tmp_path, 3)
    output = tmp_path / name
    held = OutputLock.acquire(output)  # the first job, still running
    try:
        result = tag(captions, output, *extra)
        assert result.exit_code == 2
        assert f"is being written by another job (pid {os.getpid()} on" in result.output, result.output
        assert not output.exists() and not partial_path(output).exists()  # nothing of the first job's touched
    finally:
        held.release()
    assert tag(captions, output, *extra).exit_code == 0  # released: the output is free again
    assert tag(captions, output, *extra).exit_code == 0  # and a finished job leaves no lock held


@pytest.mark.deadline(120)
def test_the_lock_dies_with_a_killed_job(tmp_path):
    output = tmp_path / "tags.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from ttd.jobs.output_lock import OutputLock
        OutputLock.acquire({str(output)!r}); print("locked", flush=True); time.sleep(60)""")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUse, match=f"pid {holder.pid} on"):
            OutputLock.acquire(output)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    OutputLock.acquire(output).release()  # no stale lock after kill -9
    assert lock_path(output).exists() and lock_path(output).name.startswith(".")  # hidden, beside the output


# item 6: resume checks the index sequence -------------------------------------------------------

@pytest.mark.parametrize("junk", ["{}\n{}\n[1]\n", '{"index": 7, "image": "x"}\n', '{"index": 2}\n{"index": 2}\n'])
def test_resume_refuses_lines_that_are_not_the_jobs_next_records(tmp_path, junk):
    captions = world_job(tmp_path, 8)
    output = tmp_path / "tags.jsonl"
    assert tag(captions, output).exit_code == 0
    killed_after(output, 2)
    with partial_path(output).open("a") as f:
        f.write(junk)
    before = partial_path(output).read_bytes()
    result = tag(captions, output, "--resume")
    assert result.exit_code == 2 and "expected the record of input item 2" in result.output, result.output
    assert f"{partial_path(output)}:3" in result.output  # names the line
    assert partial_path(output).read_bytes() == before and not output.exists()


def test_resume_of_a_shard_expects_its_own_positions(tmp_path):
    captions = world_job(tmp_path, 9)
    output = tmp_path / "s1.jsonl"
    assert tag(captions, output, "--shard", 1, "--num-shards", 3).exit_code == 0
    killed_after(output, 2)  # items 1 and 4 written
    assert tag(captions, output, "--shard", 1, "--num-shards", 3, "--resume").exit_code == 0
    assert [json.loads(line)["index"] for line in output.read_text().splitlines()] == [1, 4, 7]


def test_resume_refuses_a_parquet_shard_file_duplicated_under_the_next_number(tmp_path):
    captions = world_job(tmp_path, 6)
    output = tmp_path / "tags.parquet"
    assert tag(captions, output, "--rows-per-file", 2, "--format", "parquet").exit_code == 0
    (output / SUCCESS_FILE).unlink()
    files = shard_files(output)
    files[2].unlink()
    shutil.copy(files[0], files[2])  # part-00002 = a copy of part-00000
    result = tag(captions, output, "--rows-per-file", 2, "--format", "parquet", "--resume")
    assert result.exit_code == 2 and "expected the record of input item 4, found index 0" in result.output


# item 7: resume refuses a changed captions file --------------------------------------------------

@pytest.mark.parametrize("change", ["drop the first lines", "append a line", "same size, other text"])
def test_resume_refuses_a_captions_file_that_changed(tmp_path, change):
    captions = world_job(tmp_path, 12)
    output = tmp_path / "tags.jsonl"
    assert tag(captions, output).exit_code == 0
    killed_after(output, 5)
    lines = captions.read_text().splitlines(keepends=True)
    if change == "drop the first lines":
        captions.write_text("".join(lines[3:]))
    elif change == "append a line":
        captions.write_text("".join(lines) + lines[0])
    else:
        captions.write_text("".join(lines[1:2] + lines[:1] + lines[2:]))  # two lines swapped
    result = tag(captions, output, "--resume")
    assert result.exit_code == 2 and f"the captions file {captions} changed since the job began" in result.output
    captions.write_text("".join(lines))  # restored: the resume goes on
    assert tag(captions, output, "--resume").exit_code == 0


# item 15: a full disk is one line, and the partial output stays ---------------------------------

@pytest.mark.deadline(300)
def test_a_full_disk_is_one_line_and_the_partial_output_resumes(tmp_path):
    captions = world_job(tmp_path, 40)
    output = tmp_path / "tags.jsonl"
    command = [sys.executable, "-m", "ttd", "tag", "--captions", str(captions), "-o", str(output), *MODEL,
               "--batch-size", 4]

    def small_disk():  # a 3 kB file-size limit stands in for a full disk (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    full = subprocess.run([*map(str, command)], preexec_fn=small_disk, capture_output=True, text=True, env=env)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {partial_path(output)}: File too large")
    assert 0 < len(partial_path(output).read_text().splitlines()) < 40
    resumed = subprocess.run([*map(str, command), "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["index"] for line in output.read_text().splitlines()] == list(range(40))


def test_an_output_folder_that_cannot_exist_is_one_line(tmp_path):
    captions = world_job(tmp_path, 2)
    (tmp_path / "a-file").write_text("")
    result = tag(captions, tmp_path / "a-file" / "tags.jsonl")
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == f"error: cannot write {tmp_path / 'a-file' / 'tags.jsonl'}: {tmp_path / 'a-file'} is a file, not a folder"


# item 17: records do not depend on batch composition --------------------------------------------

def test_records_are_byte_identical_whatever_the_batches_and_shards(tmp_path):
    """With one prompt template, a tag encoded alone is a one-row text-encoder call: it took another
    kernel than the same tag encoded with others, and scores differed in the last digits."""
    captions = world_job(tmp_path, 12)
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\n")
    whole = tmp_path / "whole.jsonl"
    args = ["segment", "--captions", str(captions), "--templates", str(templates), *MODEL, "--crop", "center"]
    assert CliRunner().invoke(main, [*args, "-o", str(whole), "--batch-size", 12]).exit_code == 0
    parts = []
    for shard in range(3):
        out = tmp_path / f"s{shard}.jsonl"
        result = CliRunner().invoke(main, [*args, "-o", str(out), "--batch-size", 1, "--shard", str(shard),
                                           "--num-shards", "3"])
        assert result.exit_code == 0, result.output
        parts += out.read_text().splitlines()
    assert sorted(parts, key=lambda line: json.loads(line)["index"]) == whole.read_text().splitlines()


# item 18: the progress total counts CSV records -------------------------------------------------

def test_the_progress_total_counts_csv_records_not_lines(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text('image,caption\na.png,"a red\ncircle"\n\nb.png,"two\nlines\nhere"\nc.png,plain\n')
    assert count_items(path) == 3
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "caption": "y"}')
    assert count_items(jsonl) == 2 and count_items(tmp_path) is None
