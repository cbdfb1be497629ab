"""Extend (prefill) attention over the token-slot KV pool.

Request ``b`` of a batch brings ``extend_lens[b]`` new tokens, flattened at rows
``extend_starts[b] .. extend_starts[b] + extend_lens[b] - 1`` of ``q`` ([T, H, D]), at positions
``prefix_lens[b] .. prefix_lens[b] + extend_lens[b] - 1``. Every position's K and V, the new ones
included, are already in the pool, at slots ``req_to_token[req_rows[b], pos]``. New token ``i``
attends to the whole cached prefix and causally to the request's new tokens ``0..i``.

Grid ``(B, H, ceil(max_extend_len / BLOCK_M))``: each program takes ``BLOCK_M`` new tokens of one
request and one head, and runs an online softmax first over the prefix (no mask but the length),
then over the new tokens up to its own last row (causal mask). Programs past a request's extend
length exit at once, so ``max_extend_len`` only needs to be an upper bound (a host int: no sync).

Options (GPT-OSS), compile-time gated so that the plain kernel is unchanged: ``sliding_window`` ``W``
(the token at position ``i`` sees keys ``j`` with ``i - W < j <= i``; both loops start at the first key
the block's first row can see, so a block costs O(BLOCK_M + W)) and ``sinks`` [H] (each row's online
softmax starts from the head's sink logit: ``m = s * log2(e)``, ``l = 1``, no value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.runtime.kernels.common import (
    attention_rows_ref,
    check_attention_inputs,
    check_window_sinks,
    compute_dtype,
)

_LOG2E = 1.4426950408889634


@triton.jit
def attend_block(
    q, acc, m_i, l_i, K, V, table_row, kv_head, offs_d, mask_d, pos_start, offs_n, mask_n, mask,
    scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, DOT_PRECISION: tl.constexpr,
    ROWS_MAY_BE_EMPTY: tl.constexpr,
):
    """One online-softmax step over the keys at positions ``pos_start + offs_n`` (extend and decode
    attention's inner loop).

    ``mask_n`` [BLOCK_N] marks the keys that exist, ``mask`` [BLOCK_M, BLOCK_N] what each row may see.
    ``ROWS_MAY_BE_EMPTY``: a row may have seen no key yet (``m_i`` and its new max both -inf; a window
    without sinks), so the exponentials are taken against 0 there instead of a NaN-making -inf.
    """
    slots = tl.load(table_row + pos_start + offs_n, mask=mask_n, other=0).to(tl.int64)
    k = tl.load(
        K + slots[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
        mask=mask_n[None, :] & mask_d[:, None], other=0.0,
    )  # [BLOCK_D, BLOCK_N]
    if K.dtype.element_ty.is_fp8():  # an FP8 cache is read in q's dtype
        k = k.to(q.dtype)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if ROWS_MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(qk - m_ref[:, None])
    v = tl.load(
        V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
        mask=mask_n[:, None] & mask_d[None, :], other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    if V.dtype.element_ty.is_fp8():
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


# The per-request metadata are rows of one small int32 tensor whose offsets move with the batch size:
# specializing on their 16-byte alignment compiled a variant per batch-size residue, mid-serving.
@triton.jit(do_not_specialize_on_alignment=["ReqRows", "ExtendStarts", "PrefixLens", "ExtendLens"])
def _extend_attention_kernel(
    Q, K, V, Out, Table, ReqRows, ExtendStarts, PrefixLens, ExtendLens, Sinks,
    scale_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    GUARD_EMPTY_ROWS: tl.constexpr,  # a window without sinks: a row may see no key of a block
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    extend_len = tl.load(ExtendLens + b)
    if m_block * BLOCK_M < extend_len:
        prefix_len = tl.load(PrefixLens + b)
        q_start = tl.load(ExtendStarts + b).to(tl.int64)
        row = tl.load(ReqRows + b).to(tl.int64)
        table_row = Table + row * stride_table
        kv_head = head // GROUP

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < extend_len
        mask_d = offs_d < HEAD_DIM
        q = tl.load(
            Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :], other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        if not K.dtype.element_ty.is_fp8():  # an FP8 cache is read in q's dtype instead
            q = q.to(K.dtype.element_ty)

        if HAS_SINKS:  # the sink starts each row's softmax: one term exp(s), no value (base 2)
            sink_log2 = tl.load(Sinks + head).to(tl.float32) * 1.4426950408889634
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink_log2
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if USE_WINDOW:  # the block's first row sees keys from position prefix_len + m_block * BLOCK_M - W + 1
            first_key = prefix_len + m_block * BLOCK_M - window + 1
            prefix_lo = tl.maximum(first_key, 0)
            new_lo = tl.maximum(first_key - prefix_len, 0)
        else:
            prefix_lo = 0
            new_lo = 0
        # the cached prefix: every new token sees all of it (within its window)
        for n in range(prefix_lo, prefix_len, BLOCK_N):
            mask_n = (n + offs_n) < prefix_len
            mask = (offs_m[:, None] >= 0) & mask_n[None, :]  # [BLOCK_M, BLOCK_N]
            if USE_WINDOW:
                mask = mask & ((prefix_len + offs_m)[:, None] - (n + offs_n)[None, :] < window)
            acc, m_i, l_i = attend_block(
                q, acc, m_i, l_i, K, V, table_row, kv_head, offs_d, mask_d, n, offs_n, mask_n, mask,
                scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, DOT_PRECISION,
                GUARD_EMPTY_ROWS,
            )
        # the new tokens, causally, up to this block's last row
        new_end = tl.minimum(extend_len, (m_block + 1) * BLOCK_M)
        for n in range(new_lo, new_end, BLOCK_N):
            offs_j = n + offs_n
            mask_n = offs_j < new_end
            mask = (offs_j[None, :] <= offs_m[:, None]) & mask_n[None, :]  # [BLOCK_M, BLOCK_N]
            if USE_WINDOW:
                mask = mask & (offs_m[:, None] - offs_j[None, :] < window)
            acc, m_i, l_i = attend_block(
                q, acc, m_i, l_i, K, V, table_row, kv_head, offs_d, mask_d, prefix_len + n, offs_n, mask_n, mask,
                scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, DOT_PRECISION,
                GUARD_EMPTY_ROWS,
            )
        if GUARD_EMPTY_ROWS:  # padding rows past the extend length may have seen no key at all
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(
            Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
        )


def default_extend_blocks(head_dim: int, device: torch.device, itemsize: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size, element size and device."""
    if device.type != "cuda":
        return 32, 32, 4, 1
    if itemsize > 2:  # float32: keep the tiles within shared memory
        return 64, 32, 4, 2
    if head_dim <= 128:
        # H100, D=128 bf16: 128/64/4 warps/3 stages ran 1.3-2x faster than 128/64/8/2 or 64/64/4/2
        return 128, 64, 4, 3
    return 64, 32, 4, 2


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    extend_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
    max_extend_len: int,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new tokens to its prefix and to each other (Triton).

    Args:
        q: [T, H, D] queries of the new tokens, flattened over requests (unit last stride).
        k_buffer, v_buffer: [num_slots + 1, KVH, D] pool buffers, already holding the new tokens' K/V.
        req_to_token: [R, L] int32 or int64 request-to-slot table.
        req_rows, extend_starts, prefix_lens, extend_lens: [B] int32 (or int64) per-request metadata.
        scale: softmax scale.
        max_extend_len: an upper bound of ``extend_lens`` (sizes the grid).
        out: [T, H, D] output to write; rows of tokens not in any request are left as they are.
        sliding_window: a token sees only the ``sliding_window`` keys up to its own (None: all).
        sinks: [H] per-head sink logits (any float dtype; None: no sink).

    Returns:
        [T, H, D] output in ``q``'s dtype.
    """
    T, H, D = q.shape
    KVH = k_buffer.shape[1]
    q = check_attention_inputs(q, k_buffer, v_buffer)
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    B = req_rows.shape[0]
    if B == 0 or T == 0 or max_extend_len <= 0:
        return out
    window = check_window_sinks(sliding_window, sinks, H)
    bm, bn, warps, stages = default_extend_blocks(D, q.device, compute_dtype(q, k_buffer).itemsize)
    bm, bn = block_m or bm, block_n or bn
    grid = (B, H, triton.cdiv(max_extend_len, bm))
    _extend_attention_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_rows, extend_starts, prefix_lens, extend_lens,
        q if sinks is None else sinks,
        scale * _LOG2E, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        GROUP=H // KVH, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=bm, BLOCK_N=bn,
        DOT_PRECISION="ieee" if compute_dtype(q, k_buffer) == torch.float32 else "tf32",
        USE_WINDOW=sliding_window is not None, HAS_SINKS=sinks is not None,
        GUARD_EMPTY_ROWS=sliding_window is not None and sinks is None,
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    extend_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference of ``extend_attention`` (float32 math, one request at a time).

    Returns [T, H, D] in ``q``'s dtype; rows of tokens not in any request are zero.
    """
    T, H, D = q.shape
    out = torch.zeros((T, H, D), dtype=torch.float32, device=q.device)
    for row, start, prefix, n in zip(
        req_rows.tolist(), extend_starts.tolist(), prefix_lens.tolist(), extend_lens.tolist()
    ):
        if n == 0:
            continue
        seq = prefix + n
        slots = req_to_token[int(row), :seq].long()
        q_pos = torch.arange(prefix, seq, device=q.device)
        out[start : start + n] = attention_rows_ref(
            q[start : start + n], k_buffer[slots], v_buffer[slots], q_pos, scale,
            sliding_window=sliding_window, sinks=sinks,
        )
    return out.to(q.dtype)


__all__ = ["default_extend_blocks", "extend_attention", "extend_attention_ref"]
