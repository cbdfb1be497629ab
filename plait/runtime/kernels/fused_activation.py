"""SiLU-and-multiply of a fused gate/up projection in one Triton kernel.

``x`` [T, 2I] holds ``[gate | up]``; the output [T, I] is ``silu(gate) * up``. As in eager 16-bit
torch, ``silu`` is computed in float32 and rounded to the model dtype before the product, which is
rounded once more. The only difference from ``silu_and_mul_ref`` is float32 ``exp``/division rounding
inside ``silu``, which shows as a last-place difference in a small fraction of outputs.

Grid ``(T, cdiv(I, BLOCK))``: shapes only, no host reads, CUDA-graph capturable. ``T == 0`` launches
nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    X, Out,
    stride_x, stride_o,
    I,
    BLOCK: tl.constexpr,
    ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(X + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    up = tl.load(X + t * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    act = gate / (1.0 + tl.exp(-gate))  # silu, as torch computes it
    if ROUND:  # eager torch rounds silu's output to the model dtype before the product
        act = act.to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + t * stride_o + offs, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor, *, out: torch.Tensor | None = None, block: int = 1024, num_warps: int = 4
) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` [T, 2I] (Triton).

    Args:
        x: [T, 2I] (rows may be strided; the last stride must be 1, else it is copied).
        out: [T, I] destination with a unit last stride; a new contiguous tensor when omitted.
        block: columns per program (a power of two).

    Returns:
        ``out``: [T, I] in ``x``'s dtype.
    """
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul expects [T, 2I], got {tuple(x.shape)}")
    T, I = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((T, I), dtype=x.dtype, device=x.device)
    elif out.shape != (T, I) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must be [{T}, {I}] {x.dtype} with a unit last stride")
    if T == 0 or I == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    _silu_and_mul_kernel[(T, triton.cdiv(I, block))](
        x, out, x.stride(0), out.stride(0), I,
        BLOCK=block, ROUND=x.dtype != torch.float32, num_warps=num_warps,
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference of ``silu_and_mul``: ``SiluAndMul`` (and HF ``LlamaMLP``) eagerly."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


__all__ = ["silu_and_mul", "silu_and_mul_ref"]
