import json

import pytest
import torch

from ttd.model.factory import ModelLoadError, create_model, load_checkpoint, load_model, save_checkpoint


def test_checkpoint_round_trip_is_bit_exact(tmp_path, fresh_tiny_model):
    with torch.no_grad():
        fresh_tiny_model.mask_weight.fill_(12.5)
    path = save_checkpoint(fresh_tiny_model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    original, reloaded = fresh_tiny_model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert loaded.config == fresh_tiny_model.config
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh_tiny_model.encode_image(pixels)[1], loaded.encode_image(pixels)[1])


def test_checkpoint_needs_safetensors_and_its_config(tmp_path, tiny_model):
    pickle_file = tmp_path / "m.pt"
    pickle_file.write_bytes(b"not a pickle we would ever open")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_checkpoint(pickle_file)
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelLoadError, match="has no config m.json"):
        load_checkpoint(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_unknown_config_keys_are_rejected(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    config = json.loads(path.with_suffix(".json").read_text())
    config["surprise"] = 1
    path.with_suffix(".json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown model config keys: \\['surprise'\\]"):
        load_checkpoint(path)


def test_hub_request_offline_fails_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    message = str(error.value)
    assert "could not load pretrained weights ViT-B-32/laion2b_s34b_b79k" in message
    assert "--pretrained /path/to/open_clip_model.safetensors" in message


def test_unknown_model_name_is_explained():
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99")


def test_registered_config_with_dense_mode_override():
    model = load_model("world-tiny", dense_mode="clearclip")
    assert model.config.dense_mode == "clearclip" and model.config.image_size == 64
