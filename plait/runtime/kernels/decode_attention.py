"""Decode attention over the token-slot KV pool: one new query token per request (flash-decoding).

Each request ``b`` attends its new token's query ``q[b]`` ([H, D]) to the keys and values of its first
``seq_lens[b]`` tokens, whose pool slots are ``req_to_token[req_rows[b], :seq_lens[b]]``. The pool
buffers are ``[num_slots + 1, KVH, D]``; ``H`` is a multiple of ``KVH`` (grouped-query attention).

The sequence is split (flash-decoding) so that short batches still fill the GPU:

- stage 1, grid ``(B, KVH, max_kv_splits)``: each program takes one request, one KV head and one
  split of that request's sequence, and computes for the ``H / KVH`` query heads of that KV head the
  partial softmax-weighted sum of values (normalized) and its log-sum-exp (base 2);
- stage 2, grid ``(B, H)``: merges the splits of one (request, head).

A large batch fills the GPU with one split per request (``num_kv_splits_cap`` gives 1): the caller then
passes ``max_kv_splits=1`` and stage 1 finishes the softmax and writes the output itself, with no
workspace round trip and no stage 2.

Options (GPT-OSS), compile-time gated so that the plain kernels are unchanged:

- ``sliding_window`` ``W``: only the last ``W`` keys are read (the query sits at position
  ``seq_len - 1``); the splits divide that range, so a windowed layer costs O(W), not O(seq_len);
- ``sinks`` [H]: a per-head logit that joins each head's softmax in stage 2 (its term
  ``exp(s - m)`` is added to the denominator; it adds no value).

The number of splits of each request is a device tensor (``num_kv_splits[b]``, at most
``max_kv_splits``); programs past it exit at once. The grids depend only on the batch size and
``max_kv_splits``, and nothing here reads a device value on the host, so a launch can be captured in a
CUDA graph and replayed with other sequence lengths (the caller refills the metadata tensors in place).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from plait.runtime.kernels.common import (
    attention_rows_ref,
    check_attention_inputs,
    check_window_sinks,
    compute_dtype,
)
from plait.runtime.kernels.extend_attention import attend_block

DEFAULT_MAX_KV_SPLITS = 16
MIN_TOKENS_PER_SPLIT = 64  # a split shorter than this costs more in stage 2 than it saves
_LOG2E = 1.4426950408889634


@triton.jit
def _kv_range(seq_len, num_splits, window, USE_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first key position, split length) of a request: its last ``window`` keys, or all of them."""
    if USE_WINDOW:
        kv_start = tl.maximum(seq_len - window, 0)
    else:
        kv_start = 0
    # splits are whole blocks long, so that only a range's last block is partial
    split_len = tl.cdiv(tl.cdiv(seq_len - kv_start, num_splits), BLOCK_N) * BLOCK_N
    return kv_start, split_len


@triton.jit
def _attend_range(
    Q, K, V, Table, b, kv_head, start, end, scale_log2,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table, ReqRows,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the ``GROUP`` query heads of ``kv_head`` over keys ``start..end`` of request ``b``:
    (unnormalized weighted sum of values [BLOCK_H, BLOCK_D], running max [BLOCK_H], sum [BLOCK_H]), base 2.
    An empty range gives (0, -inf, 0)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :], other=0.0,
    )  # [BLOCK_H, BLOCK_D]
    if not K.dtype.element_ty.is_fp8():  # an FP8 cache is read in q's dtype instead
        q = q.to(K.dtype.element_ty)
    row = tl.load(ReqRows + b).to(tl.int64)
    table_row = Table + row * stride_table

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n in range(start, end, BLOCK_N):
        mask_n = n + offs_n < end
        acc, m_i, l_i = attend_block(
            q, acc, m_i, l_i, K, V, table_row, kv_head, offs_d, mask_d, n, offs_n, mask_n, mask_n[None, :],
            scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, DOT_PRECISION, False,
        )
    return acc, m_i, l_i


# Index arguments (positions, slots, rows) are often slices of one per-step tensor at offsets that move with
# the batch; they are read one value at a time, so no kernel variant per 16-byte alignment (compiled mid-serving).
@triton.jit(do_not_specialize_on_alignment=["ReqRows", "SeqLens", "NumSplits"])
def _decode_stage1_kernel(
    Q, K, V, Table, ReqRows, SeqLens, NumSplits, MidO, MidLse, Out, Sinks,
    scale_log2, window,
    stride_qb, stride_qh,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_table,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """One (request, KV head, split): the split's partial output and log-sum-exp into the workspace; or,
    with ``DIRECT`` (one split per request), the normalized output itself (sinks folded in)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DIRECT:
        num_splits = 1
    else:
        num_splits = tl.load(NumSplits + b)
    if split < num_splits:
        seq_len = tl.load(SeqLens + b)
        kv_start, split_len = _kv_range(seq_len, num_splits, window, USE_WINDOW, BLOCK_N)
        start = kv_start + split * split_len
        end = tl.minimum(start + split_len, seq_len)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask_hd = (offs_h < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
        heads = kv_head * GROUP + offs_h
        if DIRECT:  # every request is one split: finish the softmax here (an empty request gives zeros)
            acc, m_i, l_i = _attend_range(
                Q, K, V, Table, b, kv_head, start, end, scale_log2, stride_qb, stride_qh, stride_kt, stride_kh,
                stride_vt, stride_vh, stride_table, ReqRows,
                GROUP, HEAD_DIM, BLOCK_D, BLOCK_H, BLOCK_N, DOT_PRECISION,
            )
            if HAS_SINKS:  # one more softmax term with no value (base 2)
                sink = tl.load(Sinks + heads, mask=offs_h < GROUP, other=0.0).to(tl.float32) * 1.4426950408889634
                m_new = tl.maximum(m_i, sink)
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha + tl.exp2(sink - m_new)
            out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
            tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=mask_hd)
        else:
            if end > start:
                acc, m_i, l_i = _attend_range(
                    Q, K, V, Table, b, kv_head, start, end, scale_log2, stride_qb, stride_qh, stride_kt,
                    stride_kh, stride_vt, stride_vh, stride_table, ReqRows,
                    GROUP, HEAD_DIM, BLOCK_D, BLOCK_H, BLOCK_N, DOT_PRECISION,
                )
                out_ptrs = MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
                tl.store(out_ptrs, acc / l_i[:, None], mask=mask_hd)
                lse_ptrs = MidLse + b * stride_mlb + heads * stride_mlh + split
                tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=offs_h < GROUP)


@triton.jit(do_not_specialize_on_alignment=["SeqLens", "NumSplits"])
def _decode_stage2_kernel(
    MidO, MidLse, SeqLens, NumSplits, Out, Sinks,
    window,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b)
    num_splits = tl.load(NumSplits + b)
    kv_start, split_len = _kv_range(seq_len, num_splits, window, USE_WINDOW, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    if HAS_SINKS:  # the sink is one more softmax term with no value: it starts the merge (base 2)
        m_i = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
        l_i = 1.0
    else:
        m_i = float("-inf")
        l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for split in range(0, num_splits):
        start = kv_start + split * split_len
        end = tl.minimum(start + split_len, seq_len)
        if end > start:
            lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + split)
            part = tl.load(
                MidO + b * stride_mob + h * stride_moh + split * stride_mos + offs_d, mask=mask_d, other=0.0
            )
            m_new = tl.maximum(m_i, lse)
            alpha = tl.exp2(m_i - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * part
            l_i = l_i * alpha + w
            m_i = m_new
    out = tl.where(l_i > 0, acc / tl.maximum(l_i, 1e-30), 0.0)  # an empty sequence gives zeros
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs: behave as on an H100


def launch_settings(direct: bool) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) of stage 1: one pass (``direct``: large batches) or split.

    From ``benchmarks/decode_attention.py --sweep`` on an H200 (RESULTS.md, 2026-12-02), Llama-3.1-8B
    heads (32 on 8, D=128) and GPT-OSS heads (64 on 8, D=64) at 192 to 2,048 keys: one pass at batch
    64-256 is within 8% of each case's best with (64, 2, 3) (the earlier (64, 4, 3) took up to 17% longer);
    split at batch 1-16 within 9% with (128, 4, 2) (the earlier setting took up to 19% longer)."""
    return (64, 2, 3) if direct else (128, 4, 2)


def num_kv_splits_cap(batch_size: int, num_kv_heads: int, max_kv_splits: int, device: torch.device) -> int:
    """Most splits per request worth having: enough stage-1 programs for about two waves on the GPU."""
    target_programs = 2 * _num_sms(device)
    return max(1, min(max_kv_splits, -(-target_programs // max(1, batch_size * num_kv_heads))))


def compute_num_kv_splits(
    seq_lens: torch.Tensor, num_kv_heads: int, max_kv_splits: int = DEFAULT_MAX_KV_SPLITS
) -> torch.Tensor:
    """Splits per request ([B] int32, on ``seq_lens``' device, no host sync).

    Each request gets one split per ``MIN_TOKENS_PER_SPLIT`` tokens, capped by
    ``num_kv_splits_cap`` (a function of the batch shape only), and at least one.
    """
    cap = num_kv_splits_cap(seq_lens.shape[0], num_kv_heads, max_kv_splits, seq_lens.device)
    by_len = torch.div(seq_lens + (MIN_TOKENS_PER_SPLIT - 1), MIN_TOKENS_PER_SPLIT, rounding_mode="floor")
    return by_len.clamp(1, cap).to(torch.int32)


def alloc_decode_workspace(
    batch_size: int, num_heads: int, head_dim: int, max_kv_splits: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 buffers: partial outputs [B, H, S, D] and log-sum-exps [B, H, S], float32."""
    mid_o = torch.empty((batch_size, num_heads, max_kv_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch_size, num_heads, max_kv_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_kv_splits: torch.Tensor | None = None,
    max_kv_splits: int = DEFAULT_MAX_KV_SPLITS,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per request to its KV in the pool (Triton).

    Args:
        q: [B, H, D] queries (any strides with a unit last stride).
        k_buffer, v_buffer: [num_slots + 1, KVH, D] pool buffers of one layer (contiguous).
        req_to_token: [R, L] int32 or int64 request-to-slot table.
        req_rows: [B] table row of each request.
        seq_lens: [B] int32 number of keys of each request (0 gives a zero output row).
        scale: softmax scale (usually ``D ** -0.5``).
        num_kv_splits: [B] int32 splits per request, each in ``1..max_kv_splits``; computed with
            ``compute_num_kv_splits`` when omitted; not read when ``max_kv_splits`` is 1.
        max_kv_splits: the stage-1 grid's splits. 1 runs one pass that writes the output itself (no
            workspace round trip, no stage 2): what ``num_kv_splits_cap`` gives for large batches.
        workspace: ``alloc_decode_workspace`` buffers with at least B rows and ``max_kv_splits`` splits.
        out: [B, H, D] output to write (allocated when omitted).
        sliding_window: attend only the last ``sliding_window`` keys (None: all).
        sinks: [H] per-head sink logits (any float dtype; None: no sink).
        block_n, num_warps, num_stages: launch settings; None takes ``launch_settings``'.

    Returns:
        [B, H, D] attention output in ``q``'s dtype.
    """
    B, H, D = q.shape
    KVH = k_buffer.shape[1]
    q = check_attention_inputs(q, k_buffer, v_buffer)
    if out is None:
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if num_kv_splits is None:
        num_kv_splits = compute_num_kv_splits(seq_lens, KVH, max_kv_splits)
    if workspace is None:
        workspace = alloc_decode_workspace(B, H, D, max_kv_splits, q.device)
    mid_o, mid_lse = workspace
    if mid_o.shape[0] < B or mid_o.shape[2] < max_kv_splits or mid_o.shape[1] != H or mid_o.shape[3] != D:
        raise ValueError(f"workspace {tuple(mid_o.shape)} too small for B={B}, H={H}, splits={max_kv_splits}, D={D}")
    window = check_window_sinks(sliding_window, sinks, H)
    group = H // KVH
    block_d = triton.next_power_of_2(D)
    precision = "ieee" if compute_dtype(q, k_buffer) == torch.float32 else "tf32"
    direct = max_kv_splits == 1
    default_n, default_warps, default_stages = launch_settings(direct)
    _decode_stage1_kernel[(B, KVH, max_kv_splits)](
        q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, num_kv_splits, mid_o, mid_lse, out,
        q if sinks is None else sinks,
        scale * _LOG2E, window,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n or default_n, DOT_PRECISION=precision, USE_WINDOW=sliding_window is not None,
        DIRECT=direct, HAS_SINKS=sinks is not None,
        num_warps=num_warps or default_warps, num_stages=num_stages or default_stages,
    )
    if direct:
        return out
    _decode_stage2_kernel[(B, H)](
        mid_o, mid_lse, seq_lens, num_kv_splits, out, q if sinks is None else sinks,
        window,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n or default_n, USE_WINDOW=sliding_window is not None,
        HAS_SINKS=sinks is not None, num_warps=4 if block_d >= 128 else 2,
    )
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference of ``decode_attention`` (float32 math, one request at a time).

    Returns [B, H, D] in ``q``'s dtype; a request with no keys gets zeros.
    """
    B, H, D = q.shape
    out = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    lens = seq_lens.tolist()
    rows = req_rows.tolist()
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        slots = req_to_token[int(rows[b]), :n].long()
        q_pos = torch.tensor([n - 1], device=q.device)
        out[b] = attention_rows_ref(
            q[b : b + 1], k_buffer[slots], v_buffer[slots], q_pos, scale, sliding_window=sliding_window, sinks=sinks
        )[0]
    return out.to(q.dtype)


def decode_attention_bytes(seq_lens_total: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V that one decode-attention launch must read (for bandwidth figures)."""
    return 2 * seq_lens_total * num_kv_heads * head_dim * itemsize


__all__ = [
    "DEFAULT_MAX_KV_SPLITS",
    "alloc_decode_workspace",
    "compute_num_kv_splits",
    "decode_attention",
    "decode_attention_bytes",
    "decode_attention_ref",
    "num_kv_splits_cap",
]
