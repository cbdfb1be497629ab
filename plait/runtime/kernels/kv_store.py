"""Write the new tokens' K and V into the token-slot pool.

``k`` and ``v`` ([T, KVH, D], any strides with a unit last stride, e.g. views into a fused qkv
projection) go to rows ``slots`` ([T]) of the pool buffers ([num_slots + 1, KVH, D]), cast to the
pool's dtype (into an FP8 pool saturated, ``to_cache_dtype``). One program per token copies its K and V rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.runtime.kernels.common import cache_values


@triton.jit
def to_cache_dtype(x, dtype: tl.constexpr):
    """``x`` as the cache's element type; into FP8, saturated at the format's largest finite value
    first (448 e4m3, 57344 e5m2), as torch's cast to e4m3 does and SGLang's and vLLM's FP8 caches do."""
    if dtype == tl.float8e4nv:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
    elif dtype == tl.float8e5:
        x = tl.clamp(x.to(tl.float32), -57344.0, 57344.0)
    return x.to(dtype)


# Index arguments (positions, slots, rows) are often slices of one per-step tensor at offsets that move with
# the batch; they are read one value at a time, so no kernel variant per 16-byte alignment (compiled mid-serving).
@triton.jit(do_not_specialize_on_alignment=["Slots"])
def _store_kv_kernel(
    K, V, KBuf, VBuf, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kbt, stride_kbh, stride_vbt, stride_vbh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]  # [BLOCK_H, BLOCK_D]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(
        KBuf + slot * stride_kbt + offs_h[:, None] * stride_kbh + offs_d[None, :],
        to_cache_dtype(k, KBuf.dtype.element_ty), mask=mask,
    )
    tl.store(
        VBuf + slot * stride_vbt + offs_h[:, None] * stride_vbh + offs_d[None, :],
        to_cache_dtype(v, VBuf.dtype.element_ty), mask=mask,
    )


def _check(k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    expected = (slots.shape[0], k_buffer.shape[1], k_buffer.shape[2])
    if tuple(k.shape) != expected or tuple(v.shape) != expected:
        raise ValueError(f"store_kv expects k and v of shape {expected}, got {tuple(k.shape)} and {tuple(v.shape)}")


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write ``k``/``v`` [T, KVH, D] into ``k_buffer``/``v_buffer`` [S, KVH, D] at ``slots`` [T] (Triton).

    The buffers need a unit last stride; so do ``k`` and ``v`` (copied otherwise). Duplicate slots
    are not allowed (which token wins is unspecified), except the padding slot 0.
    """
    _check(k_buffer, v_buffer, slots, k, v)
    T, KVH, D = k.shape
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    block_h, block_d = triton.next_power_of_2(KVH), triton.next_power_of_2(D)
    _store_kv_kernel[(T,)](
        k, v, k_buffer, v_buffer, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        NUM_KV_HEADS=KVH, HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )


def store_kv_ref(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Pure-torch reference of ``store_kv``: index assignment."""
    _check(k_buffer, v_buffer, slots, k, v)
    k_buffer[slots.long()] = cache_values(k, k_buffer.dtype)
    v_buffer[slots.long()] = cache_values(v, v_buffer.dtype)


__all__ = ["store_kv", "store_kv_ref"]
