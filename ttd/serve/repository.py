"""What `ttd triton build` records about a model repository, and the check of it that
`ttd triton validate` and `ttd serve` run before anything loads it.

The record (`ttd_repository.json`) keeps the sha256 of every file the build put into the
repository — graphs, engines, weights, the models' Python code, the export's config and manifest —
so a flipped byte or a swapped file is refused with its name instead of being served
. `config.pbtxt` files are not hashed: operators tune them (instances, batching), and the
validator parses and checks them against the graphs.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from ttd.runtime.export_dir import sha256

RECORD = "ttd_repository.json"
UNHASHED = {"config.pbtxt"}  # edited by operators, checked by parsing
RUNTIME_LITTER = {"__pycache__"}  # written by the Python backend when it imports model.py


def repository_files(repo: Path) -> dict[str, str]:
    """sha256 of every file of the models in `repo` (POSIX paths relative to it), configs aside."""
    files = {}
    for path in sorted(repo.rglob("*")):
        relative = path.relative_to(repo)
        if (path.is_file() and len(relative.parts) > 1 and path.name not in UNHASHED
                and not RUNTIME_LITTER & set(relative.parts)):
            files[relative.as_posix()] = sha256(path)
    return files


def write_record(repo: Path, fields: dict) -> None:
    """Record `fields` (flavour, engine, source export) and the hash of every file now in `repo`."""
    (repo / RECORD).write_text(json.dumps({**fields, "files": repository_files(repo)}, indent=1))


def recorded_flavour(repo: Path) -> str | None:
    """The flavour `ttd triton build` recorded (fused, python, native), None if the record is unreadable."""
    try:
        return json.loads((repo / RECORD).read_text()).get("flavour")
    except (OSError, ValueError, AttributeError):
        return None  # record_problems names what is wrong with the record


def _inside(repo: Path, name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


def record_problems(repo: Path) -> list[str]:
    """Why `repo` is not what `ttd triton build` wrote (an empty list when every recorded file is
    there with its hash)."""
    how = "rebuild it with `ttd triton build`"
    record = repo / RECORD
    if not record.is_file():
        return [f"no {RECORD}: not built by `ttd triton build`, or built before it recorded file hashes; {how}"]
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return [f"{RECORD} is not a record of file hashes (damaged?); {how}"]
    problems = []
    for name, digest in sorted(files.items()):
        path = repo / name
        if not isinstance(name, str) or not _inside(repo, name):
            problems.append(f"{RECORD} names {name!r}, outside the repository")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256(path) != digest:
            problems.append(f"{name} is not the file `ttd triton build` wrote (sha256 differs: damaged or replaced); "
                            f"{how}")
    return problems
