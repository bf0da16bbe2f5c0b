"""The exactly-once writer of a job, by format: JSON lines or a folder of Parquet shards."""

from __future__ import annotations

import os
from pathlib import Path

from ttd.errors import InputError
from ttd.jobs.jsonl_output import ResumableJsonl, output_format_of
from ttd.jobs.output_lock import OutputLock


def open_output(output: Path, job: dict, resume: bool, output_format: str = "auto", rows_per_file: int = 10_000):
    """The exactly-once writer of a job: ResumableJsonl, or ParquetShards (a folder of shard files;
    `rows_per_file` records each). `job` describes the job (a resume must match it). The output is
    locked until the writer's `close()`: a second job on it is refused at once (OutputInUse)."""
    output = Path(output)
    if os.path.islink(output):  # written through: the link stays, its target (and the lock beside it) is the output
        output = Path(os.path.realpath(output))
    parquet = output_format_of(output, output_format) == "parquet"
    if not parquet and output.is_dir():
        raise InputError(f"{output} is a folder; JSON lines go to a file (for Parquet shards in a folder use "
                         "--format parquet or a name ending in .parquet)")
    if not parquet and output.exists() and not output.is_file():  # os.replace would put a file where it is
        raise InputError(f"{output} is not a plain file (a FIFO or a device): a job writes its records to a new file "
                         "that replaces the output when the job is done; give a file name")
    folder = next(p for p in (output.parent, *output.parent.parents) if p.exists())
    if not folder.is_dir():
        raise InputError(f"cannot write {output}: {folder} is a file, not a folder")
    lock = OutputLock.acquire(output)
    try:
        if parquet:
            from ttd.jobs.parquet_output import ParquetShards  # pyarrow only when asked for

            return ParquetShards(output, job, resume, rows_per_file, lock)
        return ResumableJsonl(output, job, resume, lock)
    except BaseException:
        lock.release()
        raise
