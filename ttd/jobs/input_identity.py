"""What a job read and with which model, recorded in its job description so that `--resume`
refuses to continue over changed inputs or another model (docs/reliability.md, "What --resume
checks"): a resumed job numbers its items from the inputs as they are now and tags them with the
model as it is now, so either having changed would tag one item twice and another never, or mix
two models' records in one output.

- A captions file: its size and the SHA-256 of the whole file (it is read to its end anyway):
  deleting a processed line and padding another to the same size changes the hash.
- Image files, folders and glob patterns: per argument, the number of files it lists now, their
  total size, and a SHA-256 of the ordered listing (path, size, modification time of each).
- Local webdataset shards: per shard, its size and SHA-256. Remote shards (URLs) are recorded by
  name only: they cannot be checked without reading them twice over the network.
- The model: the SHA-256 of every file it is loaded from (checkpoint and config, an export's
  manifest, which holds the hash of every file of the export, a `--pretrained` file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20
HEAD_BYTES = 1 << 20


def input_fingerprint(path) -> dict | None:
    """The captions fingerprint of jobs begun before whole files were hashed (size and the SHA-256
    of the first MiB): such a job resumes with the check it began with."""
    if path is None or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"size": Path(path).stat().st_size, "head_sha256": head}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _shard_identity(pattern: str) -> list[dict]:
    from ttd.data.items import shard_urls

    shards = []
    for url in shard_urls(pattern):
        local = url[len("file:"):] if url.startswith("file:") else url
        if "://" in url or url.startswith("pipe:") or not Path(local).is_file():
            shards.append({"shard": url})  # remote, or missing now (its error item says so)
        else:
            shards.append({"shard": url, "size": Path(local).stat().st_size, "sha256": file_sha256(local)})
    return shards


def captions_identity(captions) -> dict | None:
    """The identity of a caption-mode input: a local file's size and hash, or each shard's."""
    from ttd.data.items import is_shard_pattern

    if captions is None:
        return None
    if Path(captions).is_file():
        return {"size": Path(captions).stat().st_size, "sha256": file_sha256(captions)}
    if is_shard_pattern(str(captions)):
        return {"shards": _shard_identity(str(captions))}
    return None


def images_identity(images) -> list[dict]:
    """Per image argument: how many files it lists, their total size, and a hash of the listing."""
    from ttd.data.items import _stream_images

    identities = []
    for spec in images:
        digest, count, total = hashlib.sha256(), 0, 0
        for item in _stream_images([spec]):
            try:
                info = os.stat(item.path)
                size, mtime = info.st_size, info.st_mtime_ns
            except OSError:
                size, mtime = -1, -1  # missing: an error item now, and it must stay one
            # resolved: the same files named relative or absolute, or through a link, are the same input
            digest.update(f"{os.path.realpath(item.path)}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
            count, total = count + 1, total + max(size, 0)
        identities.append({"input": os.path.realpath(os.path.abspath(os.path.expanduser(str(spec)))), "files": count,
                           "bytes": total, "listing_sha256": digest.hexdigest()})
    return identities


def model_identity(paths) -> dict[str, str]:
    """{resolved path: sha256} of the files a model is loaded from (those that exist here)."""
    identity = {}
    for path in paths:
        if path is not None and Path(path).is_file():
            identity[str(Path(path).resolve())] = file_sha256(path)
    return identity


def model_files(checkpoint, export_dir, pretrained, model) -> list[Path]:
    """The files that make the job's model: a checkpoint and its config, an export's manifest and
    config, a `--pretrained` file, or the embedded default model when nothing is named."""
    if export_dir is not None:
        return [Path(export_dir) / "manifest.json", Path(export_dir) / "model.json"]
    if checkpoint is not None:
        return [Path(checkpoint), Path(checkpoint).with_suffix(".json")]
    if pretrained is not None:
        return [Path(pretrained)]
    if model is None:
        default = Path(__file__).resolve().parents[1] / "assets" / "world-base.safetensors"
        return [default, default.with_suffix(".json")]
    return []  # a registered architecture, random-initialised from a fixed seed: its name is its identity


def describe_change(key: str, before, now, captions: str | None = None) -> str | None:
    """One line naming what changed in the job's inputs or model, or None for another key."""
    if key == "inputs":
        before, now = before or {}, now or {}
        if before.get("captions") != now.get("captions"):
            old, new = before.get("captions") or {}, now.get("captions") or {}
            if "shards" in old or "shards" in new:
                old_shards = {s["shard"]: s for s in old.get("shards", [])}
                new_shards = {s["shard"]: s for s in new.get("shards", [])}
                names = [n for n in {**old_shards, **new_shards} if old_shards.get(n) != new_shards.get(n)]
                return f"the shard {names[0]} changed since the job began" + (
                    f" (and {len(names) - 1} more)" if len(names) > 1 else "")
            return (f"the captions file {captions} changed since the job began (size {old.get('size')} -> "
                    f"{new.get('size')} bytes{', other contents' if old.get('size') == new.get('size') else ''})")
        for old, new in zip(before.get("images") or [], now.get("images") or []):
            if old != new:
                return (f"{new['input']} changed since the job began ({old['files']} -> {new['files']} files, "
                        f"{old['bytes']} -> {new['bytes']} bytes"
                        f"{', files replaced or touched' if (old['files'], old['bytes']) == (new['files'], new['bytes']) else ''})")
        return "the job's inputs changed since it began"
    if key == "model_files":
        before, now = before or {}, now or {}
        names = sorted(p for p in set(before) | set(now) if before.get(p) != now.get(p))
        return (f"the model changed since the job began ({names[0] if names else '?'} is not the file it was"
                f"{f'; also {len(names) - 1} more' if len(names) > 1 else ''}): its records would mix two models")
    return None
