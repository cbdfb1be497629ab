"""Multi-LoRA serving: PEFT adapters over one base model, mixed freely in a batch.

``adapter.py`` reads and checks adapters; ``manager.py`` owns their host copies, device slots and the
per-step slot buffer; ``layers.py`` wraps the targeted linears. The kernels are
``plait.runtime.kernels.lora`` (``lora_shrink`` / ``lora_expand``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.runtime.lora.adapter import (
    TARGET_MODULES,
    LoraAdapter,
    LoraAdapterError,
    LoraCapacityError,
    LoraFormatError,
    LoraMismatchError,
    UnknownLoraError,
    parse_lora_paths,
    read_adapter,
)
from plait.runtime.lora.manager import (
    DEFAULT_MAX_LORA_RANK,
    LoraManager,
    RankSlice,
    check_lora_name,
    model_target_modules,
    whole_model_shapes,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plait.runtime.config import EngineConfig

__all__ = [
    "TARGET_MODULES", "LoraAdapter", "LoraAdapterError", "LoraCapacityError", "LoraFormatError",
    "LoraManager", "LoraMismatchError", "RankSlice", "UnknownLoraError", "build_lora_manager", "check_lora_name",
    "parse_lora_paths", "read_adapter", "whole_model_shapes",
]


def build_lora_manager(config: EngineConfig, model: nn.Module, max_tokens: int, device: torch.device,
                       dtype: torch.dtype, whole_shapes: dict[str, tuple[int, int]] | None = None
                       ) -> LoraManager | None:
    """The runner's adapter manager with the start-up adapters (``config.lora_paths``) registered, or None
    when LoRA is off (no ``lora_paths`` and not ``enable_lora``). ``max_lora_rank`` and
    ``lora_target_modules`` default to the largest rank and the union of targets of the start-up
    adapters (``DEFAULT_MAX_LORA_RANK`` and every module the model's layers have when there are none:
    a MoE model's attention). ``whole_shapes``: each module's (in, out) in the whole model
    (``whole_model_shapes``; needed under tensor parallelism, where ``model`` holds one rank's part)."""
    if not config.lora_enabled:
        return None
    initial = [(name, read_adapter(path)) for name, path in config.lora_paths or ()]
    rank = config.max_lora_rank
    if rank is None:
        rank = max((a.rank for _, a in initial), default=DEFAULT_MAX_LORA_RANK)
    targets = config.lora_target_modules
    if targets is None:
        used = set().union(*(a.target_modules for _, a in initial)) if initial else set(model_target_modules(model))
        targets = tuple(t for t in TARGET_MODULES if t in used)
    manager = LoraManager(model, max_loras_per_batch=config.max_loras_per_batch,
                          max_loaded_loras=config.resolved_max_loaded_loras, max_rank=rank, targets=targets,
                          max_tokens=max_tokens, device=device, dtype=dtype, whole_shapes=whole_shapes)
    for name, adapter in initial:
        manager.register(name, adapter)
    return manager
