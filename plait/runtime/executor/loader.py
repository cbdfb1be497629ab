"""Reading checkpoints from disk: Hugging Face ``config.json`` and ``*.safetensors`` weights.

Weights are streamed as ``(name, tensor)`` pairs straight from memory-mapped files; the model's own
per-parameter ``weight_loader`` decides where each one goes. torch and safetensors are imported lazily
so that resolving a model (``plait models list``) stays cheap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait.runtime.models.errors import ModelLoadError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

__all__ = ["ModelLoadError", "iter_safetensors_weights", "load_config", "safetensors_files"]

SAFETENSORS_INDEX = "model.safetensors.index.json"


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Hugging Face config: ``path`` is a ``config.json`` file or a directory holding one.

    Raises ModelNotFoundError when the file is missing and ModelLoadError when it is not a JSON object.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ModelNotFoundError(f"no model config at {file}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read model config {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"model config {file} is not a JSON object")
    return config


def safetensors_files(weights_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint directory, sorted.

    With a sharded checkpoint (``model.safetensors.index.json``) these are the shards its weight map
    names; a shard it names that is absent raises ModelNotFoundError. No weights at all raises too.
    """
    root = Path(weights_dir)
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read safetensors index {index}: {exc}") from exc
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} names shard(s) missing from {root}: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {root}")
    return files


def iter_safetensors_weights(weights_dir: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of every safetensors file in ``weights_dir``.

    Files are memory-mapped (``safetensors.safe_open``), so tensors are read only when consumed. A
    corrupt or truncated file raises ModelLoadError naming the file.
    """
    from safetensors import SafetensorError, safe_open

    read_errors = (SafetensorError, OSError, RuntimeError, ValueError)
    for file in safetensors_files(weights_dir):
        try:
            handle = safe_open(str(file), framework="pt")
            names = list(handle.keys())
        except read_errors as exc:
            raise ModelLoadError(f"cannot read safetensors file {file}: {exc}") from exc
        for name in names:
            try:
                tensor = handle.get_tensor(name)
            except read_errors as exc:
                raise ModelLoadError(f"cannot read tensor {name!r} from safetensors file {file}: {exc}") from exc
            yield name, tensor
