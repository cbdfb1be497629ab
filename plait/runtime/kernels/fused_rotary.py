"""Rotary position embedding (GPT-NeoX / Hugging Face "rotate_half" layout) in one Triton kernel.

For token ``t`` at position ``p = positions[t]`` and every head of ``x`` [T, N, D] (N may be q and k
heads stacked, e.g. a strided view into a fused qkv projection), with ``c = cos_cache[p]`` and
``s = sin_cache[p]`` ([D], ``half = D / 2``)::

    out[:half] = x[:half] * c[:half] - x[half:] * s[:half]
    out[half:] = x[half:] * c[half:] + x[:half] * s[half:]

which is ``x * cos + rotate_half(x) * sin``. The tables are read directly at ``positions``: there is
no per-step gather. For 16-bit inputs each product and the sum are rounded to the model dtype as in
eager torch, so the result is bit-identical to ``rotary_embedding_ref`` (float32 math may differ in
the last bit where the compiler contracts a product and the sum into one FMA).

Grid ``(T, cdiv(N, BLOCK_H))``: depends only on shapes, no host reads, CUDA-graph capturable. Each
program loads both halves of its heads before storing, so ``out`` may be ``x`` itself (in place).
Positions must lie in ``[0, P)``; they are not checked (that would need a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    X, Out, Positions, Cos, Sin,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_cos, stride_sin,
    N,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    mask = (heads < N)[:, None] & mask_d[None, :]  # [BLOCK_H, BLOCK_HALF]
    pos = tl.load(Positions + t).to(tl.int64)
    cos1 = tl.load(Cos + pos * stride_cos + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(Cos + pos * stride_cos + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(Sin + pos * stride_sin + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(Sin + pos * stride_sin + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    x_ptrs = X + t * stride_xt + heads[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    a1 = x1 * cos1
    b1 = x2 * sin1
    a2 = x2 * cos2
    b2 = x1 * sin2
    if ROUND:  # eager 16-bit torch rounds every product (exact in float32) before the add
        dtype = Out.dtype.element_ty
        a1 = a1.to(dtype).to(tl.float32)
        b1 = b1.to(dtype).to(tl.float32)
        a2 = a2.to(dtype).to(tl.float32)
        b2 = b2.to(dtype).to(tl.float32)
    o_ptrs = Out + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, (a1 - b1).to(Out.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, (a2 + b2).to(Out.dtype.element_ty), mask=mask)


def default_block_h(num_heads: int, head_dim: int) -> int:
    """Heads per program: about 512 elements per half-row tile (8 heads at D=128, 16 at D=64)."""
    block_half = triton.next_power_of_2(head_dim // 2)
    return min(triton.next_power_of_2(num_heads), max(1, 512 // block_half))


def rotary_embedding(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_h: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Rotate ``x`` [T, N, D] by the cos/sin rows at ``positions`` (Triton).

    Args:
        x: [T, N, D] (any strides with a unit last stride, e.g. ``qkv[:, :q+kv].view(T, H+KVH, D)``).
        positions: [T] int32 or int64 positions, each in ``[0, P)``.
        cos_cache, sin_cache: [P, D] tables in ``x``'s dtype (cos/sin of the concatenated
            frequencies, as ``RotaryEmbedding.build_cache`` makes them).
        out: [T, N, D] destination (any unit-last-stride strides; ``x`` itself rotates in place);
            a new contiguous tensor when omitted.
        block_h: heads per program (``default_block_h`` when omitted).

    Returns:
        ``out``: [T, N, D] in ``x``'s dtype.
    """
    T, N, D = x.shape
    if D % 2:
        raise ValueError(f"head_dim {D} is odd")
    if cos_cache.shape[-1] != D or sin_cache.shape != cos_cache.shape:
        raise ValueError(f"cos/sin caches {tuple(cos_cache.shape)}/{tuple(sin_cache.shape)} do not match head_dim {D}")
    if cos_cache.dtype != x.dtype or sin_cache.dtype != x.dtype:
        raise ValueError(f"cos/sin caches are {cos_cache.dtype}, x is {x.dtype}: build the cache in the model dtype")
    if positions.shape != (T,):
        raise ValueError(f"positions {tuple(positions.shape)} do not match {T} tokens")
    if out is None:
        out = torch.empty((T, N, D), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match x {tuple(x.shape)} {x.dtype}, unit last stride")
    if T == 0 or N == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos_cache.stride(-1) != 1:
        cos_cache = cos_cache.contiguous()
    if sin_cache.stride(-1) != 1:
        sin_cache = sin_cache.contiguous()
    block_h = block_h or default_block_h(N, D)
    _rotary_kernel[(T, triton.cdiv(N, block_h))](
        x, out, positions, cos_cache, sin_cache,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos_cache.stride(0), sin_cache.stride(0),
        N,
        HALF=D // 2, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(D // 2),
        ROUND=x.dtype != torch.float32, num_warps=num_warps,
    )
    return out


def rotary_embedding_ref(
    x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> torch.Tensor:
    """Pure-torch reference of ``rotary_embedding``: ``RotaryEmbedding.lookup`` then ``apply``, eagerly."""
    cos = cos_cache[positions].unsqueeze(1)  # [T, 1, D]
    sin = sin_cache[positions].unsqueeze(1)  # [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos + rotated * sin


__all__ = ["default_block_h", "rotary_embedding", "rotary_embedding_ref"]
