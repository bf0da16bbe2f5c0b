"""Exactly-once Parquet output for `ttd tag`: a folder of shard files that survives SIGKILL.

`OUT/` (e.g. `tags.parquet/`, the layout Spark, pandas, pyarrow and duckdb read as one table):

    _ttd_job.json         the job description (kept after the job: --resume checks it)
    part-00000.parquet    the first `rows_per_file` records, in input order
    part-00001.parquet    ...
    _SUCCESS              written last: the job is complete

Records are buffered and each shard file is written to a hidden temporary name, fsynced and
renamed: a shard file either exists whole or not at all. So the complete shards always hold a
prefix of the job's records; `--resume` counts their rows (that many items are done), deletes
a half-written temporary file and redoes the records after the last complete shard (at most
`rows_per_file` of them). Readers skip `_`- and `.`-prefixed names, so the folder reads as a
table at any time (before `_SUCCESS`, a prefix of it).

Columns are typed and nested, not JSON strings: a pandas or duckdb user gets lists of
{tag, score} structs (`unnest(candidates)`, `list_contains(selected, 'dog')`) and maps keyed by tag
without parsing JSON in every query, and the columns compress and filter like any other. A field a
record lacks (e.g. `error`) is null; `read_records` gives the records back as JSON lines has them,
a null read as an absent field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ttd.errors import InputError, RuntimeProblem
from ttd.jobs.jsonl_output import Progress, check_record, check_same_job, write_job
from ttd.jobs.output_lock import OutputLock

JOB_FILE = "_ttd_job.json"
SUCCESS_FILE = "_SUCCESS"
SHARD_NAME = re.compile(r"part-(\d{5,})\.parquet")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeProblem("Parquet output needs pyarrow: pip install 'ttd-toolkit[parquet]' "
                           "(or pip install 'pyarrow>=14,<21')") from None
    return pa, pq


def record_schema(vocabulary_mode: bool):
    """The columns of a `ttd tag` record. Fixed per job, so that every shard (even one holding only
    error records) has the same schema and the folder reads as one table."""
    pa, _ = _pyarrow()
    tag_score = pa.struct([("tag", pa.string()), ("score", pa.float64())])
    rle = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])
    return pa.schema([
        ("index", pa.int64()),
        ("image", pa.string()),
        ("caption", pa.string()),
        ("candidates", pa.list_(tag_score)),
        # captions: the selected tags' names; vocabulary: the selected tags with their scores
        ("selected", pa.list_(tag_score) if vocabulary_mode else pa.list_(pa.string())),
        ("top", pa.list_(tag_score)),
        ("masks", pa.map_(pa.string(), pa.string())),  # tag -> PNG file (--masks-dir)
        ("rle_masks", pa.map_(pa.string(), rle)),  # tag -> COCO RLE (--rle-masks)
        ("error", pa.string()),
    ])


def _numbered(folder: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SHARD_NAME.fullmatch(p.name)))


def shard_files(folder: Path) -> list[Path]:
    """The complete shard files of `folder`, in order; refuses a gap (a shard deleted by hand)."""
    numbered = _numbered(folder)
    for expected, (number, path) in enumerate(numbered):
        if number != expected:
            raise InputError(f"{folder}: shard part-{expected:05d}.parquet is missing (found {path.name}); "
                             "run without --resume to start over")
    return [p for _, p in numbered]


def read_records(folder: Path) -> Iterator[dict]:
    """The records of a Parquet output folder, as the JSON-lines output holds them (in order)."""
    _, pq = _pyarrow()
    for path in shard_files(Path(folder)):
        for row in pq.read_table(path).to_pylist(maps_as_pydicts="strict"):
            yield {k: v for k, v in row.items() if v is not None}


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class ParquetShards:
    """Records buffered into shard files of `rows_per_file` rows under the folder `output`.

    The interface of ttd.jobs.jsonl_output.ResumableJsonl: `resume=False` starts over (the shards of
    an earlier `ttd tag` output in the folder are deleted; a folder that `ttd tag` did not write is
    refused); `resume=True` continues the shards of the same job, or reports a finished one."""

    def __init__(self, output: Path, job: dict, resume: bool, rows_per_file: int = 10_000,
                 lock: OutputLock | None = None) -> None:
        self.lock = lock
        _pyarrow()  # the clear error before anything is written
        if rows_per_file < 1:
            raise InputError(f"rows per Parquet file must be ≥ 1, got {rows_per_file}")
        self.output, self.job, self.rows_per_file = Path(output), json.loads(json.dumps(job)), rows_per_file
        self.job_file, self.success_file = self.output / JOB_FILE, self.output / SUCCESS_FILE
        self.schema = record_schema(self.job.get("vocabulary") is not None)
        self.done = Progress()
        self.complete = False
        self._buffer: list[dict] = []
        self._closed = False
        if self.output.exists() and not self.output.is_dir():
            raise InputError(f"{self.output} is a file; Parquet output is a folder of shard files (give a new name, "
                             "e.g. tags.parquet, or --format jsonl)")
        if resume and self.job_file.exists():
            check_same_job(self.job_file, self.job, self.output)
            self._drop_temporary_files()
            for path in shard_files(self.output):
                self._count(path)
            self.complete = self.success_file.exists()
            self._closed = self.complete
            return
        self._start_over()

    def _start_over(self) -> None:
        if self.output.is_dir() and any(self.output.iterdir()) and not self.job_file.exists():
            raise InputError(f"{self.output} is a folder that `ttd tag` did not write (no {JOB_FILE}); refusing to "
                             "write into it: give a new or empty folder")
        self.output.mkdir(parents=True, exist_ok=True)
        self.success_file.unlink(missing_ok=True)  # first: the folder stops claiming to be complete
        self._drop_temporary_files()
        # only the files this writer makes (anything else stays), last first: a kill in between
        # leaves the old job's description with a prefix of its shards, still a valid partial output
        for _, path in reversed(_numbered(self.output)):
            path.unlink()
        write_job(self.job_file, self.job)

    @staticmethod
    def _is_temporary(path: Path) -> bool:
        return path.name.startswith(".part-") and path.name.endswith(".tmp")

    def _drop_temporary_files(self) -> None:
        for path in self.output.iterdir():
            if self._is_temporary(path):  # a shard that a kill cut short: its records are redone
                path.unlink()

    def _count(self, path: Path) -> None:
        _, pq = _pyarrow()
        table = pq.read_table(path, columns=["index", "error"])
        for row, (index, error) in enumerate(zip(table.column("index").to_pylist(), table.column("error").to_pylist())):
            check_record({"index": index, "image": None}, self.job, self.done.lines, f"{path}, row {row}")
            self.done.add({} if error is None else {"error": error})

    def write(self, records: list[dict]) -> None:
        """Buffer records; every `rows_per_file` of them become one shard file (whole, or not at all)."""
        for record in records:
            unknown = set(record) - set(self.schema.names)
            if unknown:
                raise InputError(f"record field(s) {sorted(unknown)} have no Parquet column")
        self._buffer.extend(records)
        while len(self._buffer) >= self.rows_per_file:
            self._write_shard(self._buffer[: self.rows_per_file])
            del self._buffer[: self.rows_per_file]

    def _write_shard(self, records: list[dict]) -> None:
        pa, pq = _pyarrow()
        number = len(shard_files(self.output))
        path = self.output / f"part-{number:05d}.parquet"
        tmp = self.output / f".part-{number:05d}.parquet.tmp"
        try:
            pq.write_table(pa.Table.from_pylist(records, schema=self.schema), tmp)
            _fsync(tmp)
            os.replace(tmp, path)
        except OSError as error:  # a full disk, a quota: the shards before stay whole
            tmp.unlink(missing_ok=True)
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}; the shard files written "
                                       "so far stay: free space, then run again with --resume") from None
        _fsync(self.output)  # the rename itself survives a power cut

    def finish(self) -> None:
        """Write the buffered records (and an empty shard for an empty job, so that the folder has
        a schema), then mark the job complete."""
        if self._closed:
            return
        if self._buffer or not shard_files(self.output):
            self._write_shard(self._buffer)
            self._buffer = []
        self.success_file.touch()  # empty, as Spark's: its existence says the job is complete
        _fsync(self.output)
        self._closed = True

    def close(self) -> None:
        """Stop without finishing: buffered records are dropped (a resume redoes them); unlock the output."""
        self._buffer = []
        self._closed = True
        if self.lock is not None:
            self.lock.release()
