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

from plait.runtime.kernels.kv_store import to_cache_dtype


# Index arguments (positions, slots, rows) are often slices of one per-step tensor at offsets that move with
# the batch; they are read one value at a time, so no kernel variant per 16-byte alignment (compiled mid-serving).
@triton.jit(do_not_specialize_on_alignment=["Positions"])
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


@triton.jit(do_not_specialize_on_alignment=["Positions", "Slots"])
def _rotary_store_kv_kernel(
    X, Positions, Cos, Sin, KBuf, VBuf, Slots,
    stride_xt, stride_xh, stride_cos, stride_sin, stride_kbt, stride_kbh, stride_vbt, stride_vbh,
    NUM_Q: tl.constexpr,
    NUM_KV: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # over q, k, v heads
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    live = heads < NUM_Q + 2 * NUM_KV
    mask = live[:, None] & mask_d[None, :]  # [BLOCK_H, BLOCK_HALF]
    rotated = (heads < NUM_Q + NUM_KV)[:, None]  # q and k heads rotate; v heads pass through
    pos = tl.load(Positions + t).to(tl.int64)
    cos1 = tl.load(Cos + pos * stride_cos + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(Cos + pos * stride_cos + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(Sin + pos * stride_sin + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(Sin + pos * stride_sin + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    x_ptrs = X + t * stride_xt + heads[:, None] * stride_xh + offs_d[None, :]
    x1_raw = tl.load(x_ptrs, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_HALF], model dtype
    x2_raw = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
    x1 = x1_raw.to(tl.float32)
    x2 = x2_raw.to(tl.float32)
    a1 = x1 * cos1
    b1 = x2 * sin1
    a2 = x2 * cos2
    b2 = x1 * sin2
    dtype = X.dtype.element_ty
    if ROUND:  # as in _rotary_kernel: eager 16-bit torch rounds every product before the add
        a1 = a1.to(dtype).to(tl.float32)
        b1 = b1.to(dtype).to(tl.float32)
        a2 = a2.to(dtype).to(tl.float32)
        b2 = b2.to(dtype).to(tl.float32)
    o1 = tl.where(rotated, (a1 - b1).to(dtype), x1_raw)
    o2 = tl.where(rotated, (a2 + b2).to(dtype), x2_raw)
    tl.store(x_ptrs, o1, mask=mask & rotated)  # q and k rotate in place
    tl.store(x_ptrs + HALF, o2, mask=mask & rotated)
    slot = tl.load(Slots + t).to(tl.int64)
    is_k = ((heads >= NUM_Q) & (heads < NUM_Q + NUM_KV))[:, None]
    k_ptrs = KBuf + slot * stride_kbt + (heads - NUM_Q)[:, None] * stride_kbh + offs_d[None, :]
    tl.store(k_ptrs, to_cache_dtype(o1, KBuf.dtype.element_ty), mask=mask & is_k)
    tl.store(k_ptrs + HALF, to_cache_dtype(o2, KBuf.dtype.element_ty), mask=mask & is_k)
    is_v = (heads >= NUM_Q + NUM_KV)[:, None]
    v_ptrs = VBuf + slot * stride_vbt + (heads - NUM_Q - NUM_KV)[:, None] * stride_vbh + offs_d[None, :]
    tl.store(v_ptrs, to_cache_dtype(o1, VBuf.dtype.element_ty), mask=mask & is_v)
    tl.store(v_ptrs + HALF, to_cache_dtype(o2, VBuf.dtype.element_ty), mask=mask & is_v)


def rotary_store_kv(
    qkv: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    *,
    block_h: int | None = None,
    num_warps: int = 4,
) -> None:
    """Rotary on q and k plus the K/V pool write, in one launch (decode's rotary + ``store_kv``).

    ``qkv`` [T, H + 2 * KVH, D] holds each token's q, k and v heads (a view of the fused projection
    with a unit last stride). q and k heads are rotated in place, exactly as ``rotary_embedding``
    rotates them; the rotated k heads and the v heads are written to rows ``slots`` [T] of
    ``k_buffer`` / ``v_buffer`` [S, KVH, D]. Duplicate slots are not allowed, except padding slot 0.
    """
    T, N, D = qkv.shape
    if N != num_q_heads + 2 * num_kv_heads:
        raise ValueError(f"qkv has {N} heads, expected {num_q_heads} q + 2 x {num_kv_heads} kv")
    if D % 2 or qkv.stride(-1) != 1:
        raise ValueError("qkv needs an even head_dim and a unit last stride")
    if tuple(k_buffer.shape[1:]) != (num_kv_heads, D) or v_buffer.shape != k_buffer.shape:
        raise ValueError(f"pool buffers {tuple(k_buffer.shape)} do not hold {num_kv_heads} heads of {D}")
    if cos_cache.dtype != qkv.dtype or sin_cache.dtype != qkv.dtype or cos_cache.shape[-1] != D:
        raise ValueError("cos/sin caches must be [P, D] in qkv's dtype")
    if positions.shape != (T,) or slots.shape != (T,):
        raise ValueError(f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must be [{T}]")
    if T == 0:
        return
    block_h = block_h or default_block_h(N, D)
    _rotary_store_kv_kernel[(T, triton.cdiv(N, block_h))](
        qkv, positions, cos_cache, sin_cache, k_buffer, v_buffer, slots,
        qkv.stride(0), qkv.stride(1), cos_cache.stride(0), sin_cache.stride(0),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HALF=D // 2, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(D // 2), ROUND=qkv.dtype != torch.float32, num_warps=num_warps,
    )


__all__ = ["default_block_h", "rotary_embedding", "rotary_embedding_ref", "rotary_store_kv"]
