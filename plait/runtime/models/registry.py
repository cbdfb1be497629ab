"""Model registry: turns a model spec (preset name, local directory, .gguf file) into a ModelSource.

Presets:

- ``smollm2-135m-instruct`` (default): real weights from the bundled GGUF, converted once into
  ``<cache>/models/smollm2-135m-instruct/`` (see ``fetch.cache_dir``).
- ``llama-3.1-8b``, ``qwen3-8b``, ``gpt-oss-20b``, ``gpt-oss-120b``, ``qwen3-30b-a3b``: their Hugging
  Face ``config.json`` only; weights are random (``dummy``; the GPT-OSS experts in MXFP4, as their
  ``quantization_config`` says) unless a local checkpoint directory is given instead of the preset name.

A ``.gguf`` path is converted once into ``<cache>/models/gguf-<hash of path, mtime, size>/``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from plait.runtime.executor.loader import load_config, safetensors_files
from plait.runtime.models.errors import ModelLoadError, ModelNotFoundError
from plait.runtime.models.fetch import cache_dir, find_bundled_gguf
from plait.runtime.models.gguf_convert import COMPLETE_MARKER, convert_gguf

__all__ = [
    "DEFAULT_PRESET",
    "LOAD_FORMATS",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSource",
    "PRESETS",
    "Preset",
    "ensure_preset_dir",
    "is_preset_cached",
    "preset_config",
    "resolve_model",
]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class Preset:
    """A named model: its shipped config and where its real weights come from (if anywhere)."""

    name: str
    description: str
    weights: str | None  # "bundled-gguf", or None for config-only presets (dummy weights)

    @property
    def config_path(self) -> Path:
        return CONFIGS_DIR / f"{self.name}.json"

    @property
    def has_weights(self) -> bool:
        return self.weights is not None


DEFAULT_PRESET = "smollm2-135m-instruct"
PRESETS: MappingProxyType[str, Preset] = MappingProxyType(
    {
        "smollm2-135m-instruct": Preset(
            "smollm2-135m-instruct", "SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized to float32)", "bundled-gguf"
        ),
        "llama-3.1-8b": Preset("llama-3.1-8b", "Llama-3.1-8B architecture (config only: dummy weights)", None),
        "qwen3-8b": Preset("qwen3-8b", "Qwen3-8B architecture (config only: dummy weights)", None),
        "gpt-oss-20b": Preset(
            "gpt-oss-20b", "gpt-oss-20b architecture, MXFP4 experts (config only: dummy weights)", None
        ),
        "gpt-oss-120b": Preset(
            "gpt-oss-120b", "gpt-oss-120b architecture, MXFP4 experts (config only: dummy weights)", None
        ),
        "qwen3-30b-a3b": Preset("qwen3-30b-a3b", "Qwen3-30B-A3B MoE architecture (config only: dummy weights)", None),
    }
)


@dataclass(frozen=True)
class ModelSource:
    """Everything the runtime needs to build a model and its tokenizer.

    ``weights_dir`` is None when weights are random (``load_format == "dummy"``); otherwise it holds
    ``*.safetensors`` files with Hugging Face parameter names. ``tokenizer_dir`` is None when there is
    no tokenizer (config-only presets without ``tokenizer_path``).
    """

    name: str
    config: dict[str, Any]
    weights_dir: Path | None
    tokenizer_dir: Path | None
    load_format: str  # "safetensors" | "dummy"


def preset_config(name: str) -> dict[str, Any]:
    """The shipped Hugging Face config dict of a preset (no download, no conversion)."""
    return load_config(_preset(name).config_path)


def preset_cache_dir(name: str) -> Path:
    """Where a preset's converted weights live (whether or not they exist yet)."""
    return cache_dir() / "models" / _preset(name).name


def is_preset_cached(name: str) -> bool:
    """Whether a preset's real weights are converted and complete in the cache."""
    return _preset(name).has_weights and (preset_cache_dir(name) / COMPLETE_MARKER).is_file()


def ensure_preset_dir(name: str) -> Path:
    """The converted Hugging Face directory of a preset with real weights; fetches and converts once.

    Cheap when cached (checks the completion marker). Raises ValueError for a config-only preset and
    ModelNotFoundError for an unknown name or when the bundled model cannot be obtained.
    """
    preset = _preset(name)
    if not preset.has_weights:
        raise ValueError(
            f"preset {name!r} has no downloadable weights; use load_format='dummy' "
            f"or pass a local checkpoint directory"
        )
    target = preset_cache_dir(name)
    if (target / COMPLETE_MARKER).is_file():
        return target
    return convert_gguf(find_bundled_gguf(), target)


def gguf_cache_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """Cache directory of a converted .gguf file, keyed by its resolved path, mtime and size."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"gguf-{key}"


def ensure_gguf_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """Convert a .gguf file once (cached) and return the Hugging Face style directory."""
    target = gguf_cache_dir(gguf_path)
    if (target / COMPLETE_MARKER).is_file():
        return target
    return convert_gguf(gguf_path, target)


def resolve_model(
    spec: str | os.PathLike[str],
    load_format: str = "auto",
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> ModelSource:
    """Resolve a preset name, a local Hugging Face directory or a .gguf file into a ModelSource.

    ``load_format``: "auto" (real weights where there are any, dummy for config-only presets),
    "safetensors" (require a safetensors checkpoint), "gguf" (require a GGUF source), "dummy"
    (random weights from the config, even when weights exist). ``tokenizer_path`` overrides where
    the tokenizer is read from. Raises ModelNotFoundError for an unknown name, a missing path or a
    directory lacking config.json or weights; ValueError for a load_format the spec cannot satisfy.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}")
    tokenizer_override = _check_tokenizer_path(tokenizer_path)
    text = os.fspath(spec)
    if text in PRESETS:
        source = _resolve_preset(PRESETS[text], load_format)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            source = _resolve_dir(path, load_format)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            source = _resolve_gguf(path, load_format)
        elif path.exists():
            raise ModelNotFoundError(
                f"{path} is neither a model directory nor a .gguf file; presets: {_preset_list()}"
            )
        else:
            raise ModelNotFoundError(f"no model {text!r}: not a preset and no such path; presets: {_preset_list()}")
    if tokenizer_override is not None:
        source = ModelSource(source.name, source.config, source.weights_dir, tokenizer_override, source.load_format)
    return source


def _resolve_preset(preset: Preset, load_format: str) -> ModelSource:
    if not preset.has_weights:
        if load_format in ("safetensors", "gguf"):
            raise ValueError(
                f"preset {preset.name!r} ships no weights, so load_format={load_format!r} cannot be met; "
                f"use 'dummy' or pass a local checkpoint directory"
            )
        return ModelSource(preset.name, preset_config(preset.name), None, None, "dummy")
    if load_format == "dummy":
        return ModelSource(preset.name, preset_config(preset.name), None, None, "dummy")
    directory = ensure_preset_dir(preset.name)  # "gguf" too: the preset's weights come from a GGUF
    return ModelSource(preset.name, load_config(directory), directory, directory, "safetensors")


def _resolve_dir(path: Path, load_format: str) -> ModelSource:
    if load_format == "gguf":
        raise ValueError(f"load_format='gguf' needs a .gguf file, but {path} is a directory")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model directory {path} has no config.json")
    config = load_config(path)
    tokenizer = path if any((path / f).is_file() for f in TOKENIZER_FILES) else None
    if load_format == "dummy":
        return ModelSource(path.name, config, None, tokenizer, "dummy")
    safetensors_files(path)  # raises ModelNotFoundError naming what is missing
    return ModelSource(path.name, config, path, tokenizer, "safetensors")


def _resolve_gguf(path: Path, load_format: str) -> ModelSource:
    if load_format == "safetensors":
        raise ValueError(f"load_format='safetensors' needs a directory, but {path} is a .gguf file")
    directory = ensure_gguf_dir(path)
    config = load_config(directory)
    if load_format == "dummy":
        return ModelSource(path.stem, config, None, directory, "dummy")
    return ModelSource(path.stem, config, directory, directory, "safetensors")


def _check_tokenizer_path(tokenizer_path: str | os.PathLike[str] | None) -> Path | None:
    if tokenizer_path is None:
        return None
    path = Path(tokenizer_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"no tokenizer at {path}")
    return path


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown preset {name!r}; presets: {_preset_list()}") from None


def _preset_list() -> str:
    return ", ".join(PRESETS)


def describe_presets() -> list[dict[str, Any]]:
    """One row per preset for listings: name, description, weights kind, cached, cache path."""
    rows = []
    for name, preset in PRESETS.items():
        rows.append(
            {
                "name": name,
                "default": name == DEFAULT_PRESET,
                "description": preset.description,
                "weights": preset.weights or "dummy",
                "cached": is_preset_cached(name),
                "path": str(preset_cache_dir(name)) if preset.has_weights else None,
            }
        )
    return rows

