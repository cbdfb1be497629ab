"""RMSNorm, optionally fused with the residual add.

On CUDA tensors the Triton kernels of ``kernels/fused_norm.py`` do the add and the norm in one pass;
on the CPU the eager code below runs unchanged (the CPU tests compare it with transformers exactly).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from plait.runtime.layers.linear import default_weight_loader

# PLAIT_FUSED_KERNELS=0 turns the Triton norm/rotary/activation kernels off (eager torch on CUDA too),
# e.g. to measure what they save. Read once, at import.
_FUSED_KERNELS = os.environ.get("PLAIT_FUSED_KERNELS", "1") != "0"


def fused_kernels_enabled(t: torch.Tensor) -> bool:
    """Whether the Triton fused kernels (norm, rotary, silu-and-mul) serve ``t``: CUDA tensors only."""
    return t.is_cuda and _FUSED_KERNELS


@functools.cache
def _fused_norm() -> ModuleType:
    from plait.runtime.kernels import fused_norm  # imports triton: only where a CUDA tensor needs it

    return fused_norm


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 like the Hugging Face reference, cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: norm(x). With it: (norm(x + residual), x + residual)."""
        if fused_kernels_enabled(x):
            if residual is None:
                return _fused_norm().rms_norm(x, self.weight, self.eps)
            return _fused_norm().add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
