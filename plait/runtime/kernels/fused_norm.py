"""RMSNorm, optionally fused with the residual add, in one Triton kernel (one program per row).

Numerics follow the Hugging Face ``LlamaRMSNorm`` run eagerly in the model dtype:

- ``h = x + residual`` is rounded to the model dtype (as an eager bf16 add is), and that rounded
  ``h`` is both the new residual and the norm's input;
- ``normed = h_f32 * rsqrt(mean(h_f32 ** 2) + eps)`` in float32, rounded to the model dtype;
- ``out = weight * normed``, one product rounded to the output dtype (``weight``'s and ``x``'s
  promoted dtype, as in eager torch).

Every rounding step of the eager code is reproduced, so the residual is bit-identical and ``out`` can
differ from ``rms_norm_ref`` only where float32 ``mean``/``rsqrt`` (summation order, rsqrt rounding)
tip a value across a model-dtype rounding boundary: at most one unit in the last place, rarely.

The grid is the number of rows; nothing is read back on the host, so a launch is CUDA-graph
capturable. Zero rows launch nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536  # one program holds a whole row in registers


@triton.jit
def _rms_norm_kernel(
    X, Residual, W, Out, ResidualOut,
    stride_x, stride_r, stride_o, stride_ro,
    N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)  # [BLOCK], model dtype
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded like an eager add
        tl.store(ResidualOut + row * stride_ro + offs, h, mask=mask)
    hf = h.to(tl.float32)
    mean_sq = tl.sum(hf * hf, axis=0) / N
    normed = (hf * tl.rsqrt(mean_sq + eps)).to(X.dtype.element_ty)  # HF: .to(input_dtype)
    w = tl.load(W + offs, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)  # exact in float32 for 16-bit inputs
    tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] -> [M, N] with a unit last stride (a view where possible, else a copy)."""
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match hidden size {n}")
    if n > MAX_HIDDEN:
        raise ValueError(f"hidden size {n} exceeds {MAX_HIDDEN}, the most one program handles")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)} {x.dtype}"
        )
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    new_residual = None if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out, new_residual
    x2 = _as_rows(x, n)  # [M, N]
    r2 = x2 if residual is None else _as_rows(residual, n)  # [M, N]
    o2 = out.view(-1, n)  # [M, N]
    ro2 = o2 if new_residual is None else new_residual.view(-1, n)  # [M, N]
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    block = triton.next_power_of_2(n)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, ro2,
        x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` [..., N] over its last dim (Triton).

    Args:
        x: [..., N] input; rows may be strided (copied only if they cannot be viewed as [M, N]).
        weight: [N] scale.
        eps: added to the mean square.

    Returns:
        [..., N] contiguous, in the promoted dtype of ``x`` and ``weight``.
    """
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x + residual`` and that sum, in one pass (Triton).

    Args:
        x, residual: [..., N] of the same shape and dtype; inputs are not modified.
        weight: [N] scale.
        eps: added to the mean square.

    Returns:
        ``(out, new_residual)``: ``out`` = norm(x + residual) as in ``rms_norm``; ``new_residual`` =
        x + residual in ``x``'s dtype, both new contiguous tensors.
    """
    out, new_residual = _launch(x, residual, weight, eps)
    return out, new_residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-torch reference of ``rms_norm``: Hugging Face ``LlamaRMSNorm.forward``, line for line."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of ``add_rms_norm``: the eager residual add, then ``rms_norm_ref``."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


__all__ = ["MAX_HIDDEN", "add_rms_norm", "add_rms_norm_ref", "rms_norm", "rms_norm_ref"]
