"""Activations.

On CUDA tensors ``SiluAndMul`` runs the Triton kernel of ``kernels/fused_activation.py`` (one pass
instead of silu, a product and their temporaries); on the CPU the eager code runs unchanged.
"""

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from plait.runtime.layers.norm import fused_kernels_enabled


@functools.cache
def _fused_activation() -> ModuleType:
    from plait.runtime.kernels import fused_activation  # imports triton: only where a CUDA tensor needs it

    return fused_activation


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and fused_kernels_enabled(x):
            return _fused_activation().silu_and_mul(x)  # [T, 2I] -> [T, I]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
