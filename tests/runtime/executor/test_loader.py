"""Tests for plait.runtime.executor.loader: safetensors streaming and config reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plait.runtime.executor.loader import (
    ModelLoadError, iter_safetensors_weights, load_config, materialized, read_json_object,
)
from plait.runtime.models.errors import ModelNotFoundError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=gen),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(8, 4, generator=gen),
    }


def _read_all(weights_dir: Path, lazy: bool) -> dict[str, torch.Tensor]:
    return {name: materialized(tensor) for name, tensor in iter_safetensors_weights(weights_dir, lazy=lazy)}


@pytest.mark.parametrize("lazy", [False, True])
def test_iterates_every_tensor_of_a_single_file(tmp_path: Path, lazy: bool) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = _read_all(tmp_path, lazy)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_sharded_checkpoint_uses_the_index(tmp_path: Path) -> None:
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "unrelated.safetensors"))  # not in the index
    loaded = dict(iter_safetensors_weights(tmp_path))
    assert sorted(loaded) == names


def test_missing_shard_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ModelNotFoundError, match="gone.safetensors"):
        list(iter_safetensors_weights(tmp_path))


def test_directory_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        list(iter_safetensors_weights(tmp_path))


@pytest.mark.parametrize("lazy", [False, True])
def test_garbage_file_raises_model_load_error_naming_it(tmp_path: Path, lazy: bool) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _read_all(tmp_path, lazy)


@pytest.mark.parametrize("lazy", [False, True])
def test_truncated_file_raises_model_load_error_naming_it(tmp_path: Path, lazy: bool) -> None:
    save_file(_tensors(), str(tmp_path / "model-00001.safetensors"))
    path = tmp_path / "model-00001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ModelLoadError, match="model-00001.safetensors") as info:
        _read_all(tmp_path, lazy)
    assert isinstance(info.value, RuntimeError)


def test_index_without_a_weight_map_is_a_load_error(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    for text in ("{not json", "[]", json.dumps({"metadata": {}}), json.dumps({"weight_map": ["a"]})):
        index.write_text(text)
        with pytest.raises(ModelLoadError, match="safetensors index"):
            list(iter_safetensors_weights(tmp_path))


def test_load_config_from_dir_and_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert load_config(tmp_path)["hidden_size"] == 8
    assert load_config(tmp_path / "config.json")["model_type"] == "llama"


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not a JSON object"):
        load_config(tmp_path)


def test_read_json_object_raises_the_callers_error_type(tmp_path: Path) -> None:
    class Refused(ValueError):
        pass

    file = tmp_path / "x.json"
    file.write_text(json.dumps({"a": 1}))
    assert read_json_object(file, Refused) == {"a": 1}
    with pytest.raises(Refused, match="larger than 4 bytes"):
        read_json_object(file, Refused, max_bytes=4)
    with pytest.raises(Refused, match=r"cannot read settings .*missing.json"):
        read_json_object(tmp_path / "missing.json", Refused, max_bytes=4, what="settings")
    file.write_text('"text"')
    with pytest.raises(Refused, match=r"^settings .*x.json is not a JSON object$"):
        read_json_object(file, Refused, what="settings")


@pytest.mark.model
def test_bundled_model_streams_all_tensors(bundled_model_dir: Path) -> None:
    names = [name for name, _ in iter_safetensors_weights(bundled_model_dir)]
    assert len(names) == 30 * 9 + 2  # 9 tensors per layer + embedding + final norm (lm_head tied)
    assert "model.layers.29.self_attn.q_proj.weight" in names
