"""Creating and loading TTD models: open_clip name + pretrained tag, a local checkpoint, or a
config registered by this project. Checkpoints are safetensors + a JSON of the ModelConfig;
nothing is ever unpickled."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ttd.errors import InputError, TTDError
from ttd.model.config import ModelConfig
from ttd.model.file_modes import current_umask, keep_mode  # noqa: F401 - keep_mode: part of this module's API
from ttd.model.clip import TTDModel

DEFAULT_CHECKPOINT = Path(__file__).parents[1] / "assets" / "world-base.safetensors"


class ModelLoadError(TTDError, RuntimeError):
    """A model could not be created or loaded; the message says what to do instead."""


class HubUnreachable(ModelLoadError, ConnectionError):
    """The model hub cannot be reached (offline): the message says how to load local weights."""


class ModelConfigError(ModelLoadError, ValueError):
    """A checkpoint's config JSON is malformed or holds settings that cannot work."""


def registered_configs() -> dict[str, ModelConfig]:
    """Configs this project defines (the world models of docs/architecture.md §3.6)."""
    from ttd.model.world_config import world_model_config

    return {"world-tiny": world_model_config()}


def _build_clip(model_cfg: dict[str, Any]):
    from open_clip.model import CLIP

    return CLIP(**model_cfg)


def open_clip_config(name: str, dense_mode: str | None, pretrained: str | None) -> ModelConfig:
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        known = ", ".join(sorted(registered_configs()))
        raise ModelLoadError(
            f"unknown model {name!r}: not an open_clip architecture (see `python -c \"import open_clip; "
            f"print(open_clip.list_models())\"`) nor a registered TTD config ({known})"
        )
    model_cfg = {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
    vision = model_cfg["vision_cfg"]
    pooled_by_average = vision.get("pool_type", "tok") == "avg"
    return ModelConfig(
        name=name,
        model_cfg=model_cfg,
        tokenizer={"kind": "open_clip", "name": name},
        source=f"open_clip:{name}/{pretrained}" if pretrained else f"open_clip:{name}/random-init",
        dense_mode=dense_mode or ("avg" if pooled_by_average else "clearclip"),
        image_size=int(vision["image_size"]),
    )


def create_model(
    name: str, pretrained: str | None = None, dense_mode: str | None = None, seed: int | None = 0
) -> TTDModel:
    """A model from an open_clip architecture name (random init unless `pretrained`) or a registered config."""
    registered = registered_configs()
    if name in registered:
        if pretrained:
            raise ModelLoadError(f"{name!r} is a TTD config with no pretrained tags; pass --checkpoint FILE instead")
        config = registered[name]
        if dense_mode:
            config = dataclasses.replace(config, dense_mode=dense_mode)
    else:
        config = open_clip_config(name, dense_mode, pretrained)
    if seed is not None:
        torch.manual_seed(seed)
    clip = _build_clip(config.model_cfg)
    if pretrained:
        _load_open_clip_weights(clip, name, pretrained)
    return TTDModel(config, clip).eval()


def _load_open_clip_weights(clip: torch.nn.Module, name: str, pretrained: str) -> None:
    import open_clip

    if os.path.isfile(pretrained):
        open_clip.load_checkpoint(clip, pretrained, weights_only=True)
        return
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
            _check_hub_reachable()
        # open_clip resolves the tag to a hub download; HF_HUB_OFFLINE=1 makes that fail at once.
        source = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
    except Exception as error:  # the hub client raises many different types
        raise ModelLoadError(
            f"could not load pretrained weights {name}/{pretrained}: {type(error).__name__}: {error}\n"
            "This machine may be offline. Download the open_clip weights where you have internet "
            f"(open_clip.create_model('{name}', pretrained='{pretrained}') caches them), then pass the "
            "file: --model NAME --pretrained /path/to/open_clip_model.safetensors, or a TTD checkpoint "
            "with --checkpoint FILE."
        ) from error
    clip.load_state_dict(source.state_dict())


def _check_hub_reachable(timeout_s: float = 3.0) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when the hub is unreachable."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        raise HubUnreachable(
            f"the model hub {host}:{port} is unreachable ({error}); weights already in the local hub cache "
            "load with HF_HUB_OFFLINE=1"
        ) from error


def config_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def atomic_write(path: Path, write) -> None:
    """Write `path` through a temporary file beside it, renamed over it when `write(tmp)` has
    returned: a reader sees the old file or the new one. The new file keeps the old one's mode
    (or the umask's for a new file), not the temporary file's 600. A symbolic link is written
    through (its target replaced), never replaced by a plain file."""
    if os.path.islink(path):
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        keep_mode(tmp, path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(model: TTDModel, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                    config: ModelConfig | None = None) -> Path:
    """Write `path` (.safetensors) and its config JSON (`config`, default the model's) beside it, each atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"checkpoint path must end in .safetensors, got {path}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "ttd-checkpoint/1"}))
    save_config(path, config or model.config)
    return path


def save_config(checkpoint: Path, config: ModelConfig) -> None:
    """Write a checkpoint's config JSON beside it, atomically."""
    text = json.dumps(config.to_dict(), indent=1)
    atomic_write(config_path(Path(checkpoint)), lambda tmp: Path(tmp).write_text(text))


def load_checkpoint(path: str | Path, dense_mode: str | None = None) -> TTDModel:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"checkpoint {path} is not a .safetensors file; TTD never unpickles checkpoints. "
            "For an open_clip .pt/.bin file use --model NAME --pretrained FILE."
        )
    cfg_file = config_path(path)
    if not cfg_file.is_file():
        raise ModelLoadError(f"checkpoint {path} has no config {cfg_file.name} beside it")
    try:
        config = ModelConfig.from_dict(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ModelConfigError(f"{cfg_file} is not a usable model config: {error}") from None
    if dense_mode:
        config = dataclasses.replace(config, dense_mode=dense_mode)
    model = TTDModel(config, _build_clip(config.model_cfg))
    try:
        weights = load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError for damaged files
        raise ModelLoadError(f"checkpoint {path} cannot be read as safetensors ({error})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelLoadError(f"checkpoint {path} does not fit its config {cfg_file.name} (weights of another "
                             f"model, or a renamed file?): {detail}") from None
    return model.eval()


def load_model(
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    dense_mode: str | None = None,
) -> TTDModel:
    """The CLI's resolution order: a checkpoint, else a model name, else the embedded default."""
    if checkpoint:
        return load_checkpoint(checkpoint, dense_mode)
    if model:
        return create_model(model, pretrained, dense_mode)
    if not DEFAULT_CHECKPOINT.is_file():
        raise ModelLoadError(f"the embedded default model {DEFAULT_CHECKPOINT} is missing from this install")
    return load_checkpoint(DEFAULT_CHECKPOINT, dense_mode)
