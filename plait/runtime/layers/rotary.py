"""Rotary position embedding (GPT-NeoX / Hugging Face "rotate_half" layout), with "llama3", "linear" and
"yarn" scaling (YaRN also scales cos/sin by its attention factor, as transformers does).

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
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, base, scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; plait supports default, linear, llama3, yarn")


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, base: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: blend interpolated (divided by ``factor``) and extrapolated (unchanged) frequencies with a
    linear ramp over the dimensions between the ``beta_fast`` and ``beta_slow`` correction bounds
    (transformers' ``_compute_yarn_parameters``; ``truncate`` rounds the bounds outwards, default True)."""
    factor = _yarn_factor(scaling)
    original = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_share = 1 - ramp
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - extrapolation_share) + inv_freq * extrapolation_share


def _yarn_factor(scaling: dict[str, Any]) -> float:
    """YaRN's context factor (ModelConfig fills it from the position limits when a config leaves it out)."""
    return float(scaling["factor"])


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor cos and sin are multiplied by: 1 except for YaRN, where it is ``attention_factor`` or,
    unset, 0.1 ln(factor) + 1 (with ``mscale`` / ``mscale_all_dim``: the ratio of two such terms)."""
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling)

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
    return mscale_of(factor)


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
        cos, sin = emb.cos(), emb.sin()
        attention_factor = rope_attention_factor(self.scaling)
        if attention_factor != 1.0:  # YaRN: scaled in float32 before the cast, as transformers does
            cos, sin = cos * attention_factor, sin * attention_factor
        self.cos_cache = cos.to(device=device, dtype=dtype)
        self.sin_cache = sin.to(device=device, dtype=dtype)

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
