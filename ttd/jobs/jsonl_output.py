"""Exactly-once JSON-lines output for long tagging jobs that may be killed at any moment.

The job writes one line per input item, in input order, to `OUT.partial` (appending, flushed
after every batch). So the lines on disk are always a prefix of the job's output plus, after a
SIGKILL, at most one torn line. `--resume` cuts the torn tail, counts the complete lines (that
many items are done) and appends from the next item: every item ends up exactly once. Only when
the last item is written does `OUT.partial` replace `OUT` (an atomic rename).

Beside the partial file, `OUT.partial.job.json` records what the job is (inputs, shard, model,
settings); a resume with other settings is refused instead of mixing two jobs in one file. A
finished job keeps it as `OUT.job.json`, so `--resume` on a finished `OUT` is checked the same
way. A sidecar, not a header line: every line of `OUT` stays a record, so shard outputs still
concatenate and JSON-lines readers (pandas, duckdb, jq) read `OUT` as it is.

`open_output` picks the writer of a job (JSON lines here, Parquet shards in ttd.jobs.parquet_output);
both have this module's interface: `done`, `complete`, `write(records)`, `finish()`, `close()`.
"""

from __future__ import annotations

from ttd.model.file_modes import current_umask
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ttd.data.inputs import InputError
from ttd.errors import InputError
from ttd.jobs.input_identity import describe_change, input_fingerprint
from ttd.jobs.output_lock import OutputLock, open_beside_output

CHUNK = 1 << 20


def partial_path(output: Path) -> Path:
    if Path(output).name in ("", ".", ".."):  # `-o .` or `-o /`: was "PosixPath('.') has an empty name"
        raise InputError(f"-o {output} names a folder, not an output file: give a file name (or, for Parquet "
                         "shards, a new folder name ending in .parquet)")
    return output.with_name(output.name + ".partial")


def job_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.job.json")


def finished_job_path(output: Path) -> Path:
    """Where a finished JSON-lines job keeps its description (beside OUT: see the module doc)."""
    return output.with_name(output.name + ".job.json")


OUTPUT_FORMATS = ("auto", "jsonl", "parquet")


def output_format_of(output: Path, output_format: str = "auto") -> str:
    """`auto`: Parquet shards when OUT's name ends in .parquet (a folder, as Spark and duckdb write
    them), JSON lines otherwise."""
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output format {output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "auto":
        return "parquet" if Path(output).suffix.lower() == ".parquet" else "jsonl"
    return output_format


def write_job(path: Path, job: dict) -> None:
    """Write a job description atomically (a kill leaves the old one or the new one), through a new
    temporary file (never an existing name, which may be a planted link) renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(job, indent=1, sort_keys=True))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from a service of another user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_same_job(job_file: Path, job: dict, what: Path) -> None:
    """Refuse to continue or accept `what` unless `job_file` describes the same job as `job`."""
    try:
        saved = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{what} has no readable job description ({job_file}), so it cannot be checked to come "
                         "from this job; run without --resume to start over") from None
    # a job begun before its inputs and model were recorded resumes with the checks it had
    job = {k: v for k, v in job.items() if k not in ("inputs", "model_files") or k in saved}
    if "captions_file" in saved and "captions_file" not in job and job.get("captions"):
        job["captions_file"] = input_fingerprint(job["captions"])
    identity = ("inputs", "model_files", "captions_file")  # what the inputs and model hold, checked below
    changed = [f"{k}: {saved.get(k)!r} -> {job.get(k)!r}" for k in sorted(set(saved) | set(job))
               if k not in identity and saved.get(k) != job.get(k)]
    if changed:  # other arguments or settings first: another job, not a changed input
        raise InputError(f"{what} belongs to a job with other settings ({'; '.join(changed)}); resume "
                         "with the same settings, or run without --resume to start over")
    for key in ("inputs", "model_files"):
        if key in saved and saved[key] != job.get(key):
            raise InputError(f"{what}: {describe_change(key, saved[key], job.get(key), job.get('captions'))}; "
                             "restore it, or run without --resume to start over")
    if "captions_file" not in saved:
        job.pop("captions_file", None)
    elif saved["captions_file"] != job.get("captions_file"):
        before, now = saved["captions_file"], job.get("captions_file") or {}
        raise InputError(f"{what}: the captions file {job.get('captions')} changed since the job began (size "
                         f"{before.get('size')} -> {now.get('size')} bytes"
                         f"{'' if before.get('head_sha256') == now.get('head_sha256') else ', other first lines'}), "
                         "so its items are not the ones already written; restore it, or run without --resume to "
                         "start over")
    changed = [f"{k}: {saved.get(k)!r} -> {job.get(k)!r}" for k in sorted(set(saved) | set(job))
               if saved.get(k) != job.get(k)]
    if changed:
        raise InputError(f"{what} belongs to a job with other settings ({'; '.join(changed)}); resume "
                         "with the same settings, or run without --resume to start over")


def error_kind(message: str) -> str:
    """A short class of an item error, for the end-of-job summary."""
    text = message.lower()
    if "cannot write masks" in text:
        return "masks"
    if "file not found" in text or "does not exist" in text:
        return "missing file"
    if any(s in text for s in ("not valid utf-8", "not a json object", "no image field", "not a file name",
                               "no image in the sample", "cannot read the shard")):
        return "bad input line"
    if "caption" in text:
        return "caption"
    return "image"


@dataclass
class Progress:
    """What an output file already holds: complete lines, and the errors among them by kind."""

    lines: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, record: dict) -> None:
        self.lines += 1
        if "error" in record:
            self.errors[error_kind(str(record["error"]))] += 1


def _cut_torn_tail(path: Path) -> int:
    """Truncate `path` after its last newline (a line cut short by a kill); returns the bytes cut."""
    size = path.stat().st_size
    with path.open("rb+") as f:
        end = size
        while end > 0:
            start = max(0, end - CHUNK)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
    return size - keep


def expected_index(job: dict, count: int) -> int:
    """The input position of a job's `count`-th record (0-based): its shard's positions, in order."""
    return int(job.get("shard", 0)) + count * int(job.get("num_shards", 1))


def check_record(record, job: dict, count: int, where: str) -> None:
    """Refuse what a resumed job must not build on: a line that is not this job's next record."""
    want = expected_index(job, count)
    if isinstance(record, dict) and record.get("index") == want and "image" in record:
        return
    if not isinstance(record, dict) or "index" not in record:
        found = f"{json.dumps(record)[:60]} (no index)"
    else:
        found = f"index {record['index']!r}" if record["index"] != want else "a line that is not a record (no image)"
    raise InputError(f"{where}: expected the record of input item {want}, found {found}: the output was changed "
                     "after the job wrote it; restore it, or run without --resume to start over")


def scan(path: Path, job: dict) -> Progress:
    """Count the complete lines of a JSON-lines file (one record each, in the job's index order)
    and their errors."""
    progress = Progress()
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except ValueError as error:
                raise InputError(f"{path}:{number}: not a record written by `ttd tag` ({error}); "
                                 "delete the file to start over") from None
            check_record(record, job, progress.lines, f"{path}:{number}")
            progress.add(record)
    return progress


class ResumableJsonl:
    """Append-only JSON lines at `OUT.partial`, renamed to `OUT` by `finish()`.

    `resume=False` starts over (an existing partial file is replaced); `resume=True` continues
    the partial file of the same job, or reports a finished `OUT` as complete."""

    def __init__(self, output: Path, job: dict, resume: bool, lock: OutputLock | None = None) -> None:
        self.output, self.job, self.lock = Path(output), json.loads(json.dumps(job)), lock
        self.partial, self.job_file = partial_path(self.output), job_path(self.output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.done = Progress()
        self.complete = False
        self.torn_bytes = 0
        if resume and os.path.lexists(self.partial):
            os.close(open_beside_output(self.partial, os.O_RDONLY))  # never a link or a FIFO
            check_same_job(self.job_file, self.job, self.partial)
            self.torn_bytes = _cut_torn_tail(self.partial)
            self.done = scan(self.partial, self.job)
        elif resume and self.output.exists():
            check_same_job(finished_job_path(self.output), self.job, self.output)
            self.done, self.complete = scan(self.output, self.job), True
            self._file = None
            return
        else:
            if os.path.islink(self.partial):  # a link planted there is removed, never written through
                self.partial.unlink()
            os.close(open_beside_output(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
            write_job(self.job_file, self.job)
        self._file = os.fdopen(open_beside_output(self.partial, os.O_WRONLY | os.O_APPEND), "ab")

    def write(self, records: list[dict]) -> None:
        """Append whole lines and hand them to the OS: after this returns, a SIGKILL loses none of them."""
        try:
            self._file.write(b"".join(json.dumps(r).encode("utf-8") + b"\n" for r in records))
            self._file.flush()
        except OSError as error:  # a full disk, a quota: the lines before stay, a torn one is cut on resume
            raise OSError(error.errno, f"cannot write {self.partial}: {error.strerror or error}; the records "
                                       "written so far stay: free space, then run again with --resume") from None

    def finish(self) -> None:
        """Make the output durable and visible under its final name."""
        if self._file is None:
            return
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        write_job(finished_job_path(self.output), self.job)  # first: a kill before the rename leaves the partial
        os.replace(self.partial, self.output)
        self.job_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop writing without finishing (the partial file stays for --resume); unlock the output."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # what a full disk refused to take: the torn line is cut on resume
                pass
            self._file = None
        if self.lock is not None:
            self.lock.release()
