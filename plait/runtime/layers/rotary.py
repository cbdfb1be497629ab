"""Rotary position embedding (GPT-NeoX / Hugging Face "rotate_half" layout), with "llama3" and "linear" scaling.

On CUDA, ``lookup`` returns a ``FusedRope`` (the step's positions and the whole cos/sin tables) and
``apply`` rotates with the Triton kernel of ``kernels/fused_rotary.py``, which reads the table rows
at the positions itself (bit-identical to the eager code in bf16/fp16). On the CPU ``lookup`` gathers
cos/sin once per step and ``apply`` runs the eager code, unchanged.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any, NamedTuple, Union

import torch
from torch import nn

from plait.runtime.layers.norm import fused_kernels_enabled


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, computed exactly as transformers does."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; plait supports default, linear, llama3")


class FusedRope(NamedTuple):
    """``RotaryEmbedding.lookup``'s result on CUDA: rotate with one kernel that reads the tables."""

    positions: torch.Tensor  # [T] int64
    cos_cache: torch.Tensor  # [P, D]
    sin_cache: torch.Tensor  # [P, D]


# lookup's result: (cos, sin) [T, 1, D] each on the CPU, FusedRope on CUDA
Rope = Union[tuple[torch.Tensor, torch.Tensor], FusedRope]


@functools.cache
def _fused_rotary() -> ModuleType:
    from plait.runtime.kernels import fused_rotary  # imports triton: only where a CUDA tensor needs it

    return fused_rotary


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary embedding for q [T, H, D] and k [T, KVH, D] at positions [T] (``lookup`` then ``apply``).

    The cos/sin table covers ``max_positions`` and is rebuilt by ``build_cache`` (after the model is
    materialized from the meta device).
    """

    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.base = base
        self.scaling = scaling
        self.cos_cache: torch.Tensor | None = None
        self.sin_cache: torch.Tensor | None = None

    def build_cache(self, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos_cache = emb.cos().to(device=device, dtype=dtype)
        self.sin_cache = emb.sin().to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> Rope:
        """What ``apply`` needs for the step's positions [T]; computed once per step, shared by all layers.

        CPU: cos, sin [T, 1, D]. CUDA: a ``FusedRope`` (no gather: the kernel indexes the tables).
        """
        if fused_kernels_enabled(positions):
            return FusedRope(positions, self.cos_cache, self.sin_cache)
        return self.cos_cache[positions].unsqueeze(1), self.sin_cache[positions].unsqueeze(1)

    @staticmethod
    def apply(rope: Rope, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, N, D] (any number of heads N, e.g. q and k heads stacked) by ``lookup``'s result.

        Returns a new [T, N, D] tensor (contiguous on the fused path); ``x`` may be a strided view.
        """
        if isinstance(rope, FusedRope):
            return _fused_rotary().rotary_embedding(x, rope.positions, rope.cos_cache, rope.sin_cache)
        cos, sin = rope
        return x * cos + _rotate_half(x) * sin
