"""Reading PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter adds ``scaling * (x @ A^T) @ B^T`` to the output of each targeted linear map of a
Llama-family decoder (q/k/v/o projections of the attention, gate/up/down of the dense MLP), with
``A`` [r, in] and ``B`` [out, r]; ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``). Anything PEFT can save that changes the output in another way (DoRA, biases,
``modules_to_save``, per-module rank or alpha patterns, embedding or LM-head adapters) is refused with
a ``LoraFormatError`` rather than ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# PEFT's module names on Llama-family models, in the order plait applies them
from plait.runtime.config import LORA_TARGET_MODULES as TARGET_MODULES
from plait.runtime.config import parse_lora_paths  # noqa: F401  (re-exported)
from plait.runtime.executor.loader import read_json_object

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_LORA_RANK_LIMIT = 1024  # the largest rank any adapter (and max_lora_rank) may have

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT drops the adapter name on save;
# older files keep it: lora_A.default.weight)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


class LoraAdapterError(ValueError):
    """An adapter that cannot be served (the message says why)."""


class LoraFormatError(LoraAdapterError):
    """The adapter's files are missing, malformed, or use a PEFT feature plait does not serve."""


class LoraMismatchError(LoraAdapterError):
    """The adapter was trained for another base model (layer count or a weight's shape differs)."""


class LoraCapacityError(LoraAdapterError):
    """The adapter does not fit the engine's LoRA settings (rank above ``max_lora_rank``, a module
    without buffers, too many adapters loaded)."""


class UnknownLoraError(ValueError):
    """A request names an adapter that is not loaded."""


@dataclass
class LoraAdapter:
    """One adapter as read from disk (host tensors, the file's dtype).

    ``weights`` maps (layer index, module name) to (A [rank, in], B [out, rank]).
    """

    path: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.weights)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise LoraFormatError(f"no {CONFIG_FILE} in {directory} (a PEFT LoRA adapter directory is expected)")
    return read_json_object(file, LoraFormatError, max_bytes=MAX_CONFIG_BYTES)


def _check_config(config: dict[str, Any], directory: Path) -> tuple[int, float]:
    """(rank, scaling) of a PEFT LoRA config; refuses what would change the output otherwise."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraFormatError(f"{directory}: peft_type {peft_type!r} is not a LoRA adapter")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if type(rank) is not int or not 1 <= rank <= MAX_LORA_RANK_LIMIT:
        raise LoraFormatError(f"{directory}: r must be an int in [1, {MAX_LORA_RANK_LIMIT}], got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoraFormatError(f"{directory}: lora_alpha must be a number, got {alpha!r}")
    refused = {
        "use_dora": config.get("use_dora"),
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "trainable_token_indices": config.get("trainable_token_indices"),
    }
    used = sorted(k for k, v in refused.items() if v)
    if used:
        raise LoraFormatError(f"{directory}: adapter_config uses {used}, which plait does not serve")
    if config.get("bias", "none") != "none":
        raise LoraFormatError(f"{directory}: bias={config.get('bias')!r} (trained biases) is not served; "
                              "only bias='none' adapters are")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def read_adapter(path: str) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory (not yet against a base model: ``LoraManager`` does).

    Raises ``LoraFormatError`` for a missing directory or file, a ``.bin`` checkpoint (pickle; convert it
    to safetensors), a config or tensor name plait does not serve, or mismatched A/B pairs.
    """
    if not isinstance(path, str) or not path:
        raise LoraFormatError(f"an adapter path must be a non-empty str, got {path!r}")
    directory = Path(path)
    if not directory.is_dir():
        raise LoraFormatError(f"adapter path {path!r} is not a directory")
    config = _read_config(directory)
    rank, scaling = _check_config(config, directory)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise LoraFormatError(f"{directory} holds adapter_model.bin (a pickle, which plait does not load); "
                                  "save the adapter with safetensors (PEFT's default) or convert it")
        raise LoraFormatError(f"no {WEIGHTS_FILE} in {directory}")
    from safetensors import safe_open

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                match = _KEY.match(key)
                if match is None:
                    raise LoraFormatError(f"{weights_file}: tensor {key!r} is not a LoRA A/B weight of "
                                          f"{', '.join(TARGET_MODULES)} in a layer's self_attn or mlp (plait "
                                          "serves only those: not MoE experts, routers or embeddings)")
                layer, module, which = int(match.group(1)), match.group(2), match.group(3)
                shape = f.get_slice(key).get_shape()
                if len(shape) != 2 or (shape[0] if which == "A" else shape[1]) != rank:
                    raise LoraFormatError(f"{weights_file}: {key} has shape {shape}, expected rank {rank}")
                pairs.setdefault((layer, module), {})[which] = f.get_tensor(key)
    except (OSError, RuntimeError) as exc:  # safetensors' errors for a corrupt file
        raise LoraFormatError(f"cannot read {weights_file}: {exc}") from exc
    if not pairs:
        raise LoraFormatError(f"{weights_file} holds no LoRA weights")
    weights = {}
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoraFormatError(f"{weights_file}: layer {layer} {module} lacks its lora_{'A' if 'A' not in ab else 'B'}")
        weights[(layer, module)] = (ab["A"], ab["B"])
    return LoraAdapter(path=str(directory), rank=rank, scaling=scaling, weights=weights)
