"""On-disk cache of a fixed vocabulary's tag embeddings (prompt-ensemble text embeddings).

Vocabulary tagging against thousands of tags spends its start-up encoding each tag through every
prompt template. The result depends only on the text encoder, the templates and the tags, so it
is cached under a key made of
- the model: the export's hash (sha256 of its manifest's file hashes) or, for the torch backend,
  a sha256 of the model config and every weight, plus the backend and its dtype;
- the vocabulary: sha256 of the tags in order and the prompt templates.
Any change to either gives a new key (a miss); an entry whose stored keys or tags disagree with
its name, or that cannot be read, is treated as a miss and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "ttd-vocab-cache/1"


def default_cache_dir() -> Path:
    root = os.environ.get("TTD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ttd"
    return Path(root) / "vocab"


def vocabulary_hash(tags: list[str], templates: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps({"tags": list(tags), "templates": list(templates)}).encode()).hexdigest()


def export_key(manifest: dict) -> str:
    """The export's hash: every file's sha256 (graphs, tokenizer, config) from its manifest."""
    files = manifest.get("files") or {}
    payload = {"files": files, "precision": manifest.get("precision")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def torch_model_key(model, dtype: str) -> str:
    """sha256 of a TTDModel's config and every parameter and buffer, with the runtime dtype."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    digest.update(dtype.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheResult:
    embeds: np.ndarray  # [K, D]
    hit: bool
    path: Path


def load_or_encode(tagger, tags: list[str], model_key: str, cache_dir: Path | None = None,
                   progress: bool = False) -> CacheResult:
    """The vocabulary's tag embeddings from the cache, or encoded by `tagger` and stored."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    vocab_key = vocabulary_hash(tags, tagger.config.prompt_templates)
    path = cache_dir / f"{model_key[:24]}-{vocab_key[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as entry:
                meta = json.loads(str(entry["meta"]))
                embeds = entry["embeds"]
            if (meta.get("format"), meta.get("model_key"), meta.get("vocabulary_hash")) == (FORMAT, model_key, vocab_key) \
                    and meta.get("tags") == list(tags) and embeds.shape == (len(tags), tagger.config.embed_dim):
                return CacheResult(embeds.astype(np.float32), True, path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # unreadable or truncated entry: a miss
            pass
    embeds = tagger.encode_tags(list(tags), progress).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"format": FORMAT, "model_key": model_key, "vocabulary_hash": vocab_key, "tags": list(tags)})
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
        np.savez(tmp, meta=np.array(meta), embeds=embeds)
    from ttd.model.file_modes import keep_mode

    keep_mode(tmp.name, path)  # not NamedTemporaryFile's 600: a cache shared with a service stays readable
    os.replace(tmp.name, path)  # atomic: a reader never sees half an entry
    return CacheResult(embeds, False, path)


def model_key_for(tagger, export_dir: str | Path | None = None) -> str | None:
    """The cache key of the model behind `tagger`: its export's hash, or its torch weights' hash;
    None (do not cache) for a backend whose model is not visible here (Triton)."""
    from ttd.runtime.backends import REGISTRY

    entry = REGISTRY.get(getattr(tagger.backend, "name", ""))
    export_dir = export_dir or getattr(tagger.backend, "export_root", None)
    if export_dir and entry is not None and entry.keyed_by_export:
        manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
        return hashlib.sha256(f"{tagger.backend.name}:{export_key(manifest)}".encode()).hexdigest()
    text_encoder = getattr(tagger.backend, "text_encoder", None)
    model = getattr(text_encoder, "model", None)
    if model is not None and hasattr(model, "state_dict"):
        dtype = str(getattr(tagger.backend, "dtype", "float32")).removeprefix("torch.")
        return torch_model_key(model, dtype)
    return None
