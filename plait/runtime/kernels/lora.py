"""Batched LoRA for a batch that mixes adapters (S-LoRA / Punica style): ``shrink`` then ``expand``.

The adapters resident on the device sit in stacked slot tensors, every adapter padded with zeros to
the largest rank ``R``: ``lora_a`` [S, R, K] and ``lora_b`` [S, N, R]. Each token of a batch names
the slot of its adapter in ``slots`` (int32 [T], -1 for the base model), so one call serves any mix
of adapters and of the base model, without merging weights or splitting the batch:

    h = lora_shrink(x, lora_a, slots)                      # h[t] = A[slots[t]] @ x[t], float32 [T, R]
    lora_expand(h, lora_b, slots, scaling, y, offset)      # y[t, offset:offset+N] += s * B[slots[t]] @ h[t]

Zero rows of A and zero columns of B add nothing, so padding changes no result. The public functions
run the Triton kernels on CUDA tensors and the torch references on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None) -> None:
    if x.dim() != 2 or lora_a.dim() != 3 or x.shape[1] != lora_a.shape[2]:
        raise ValueError(f"lora_shrink takes x [T, K] and lora_a [S, R, K], got {tuple(x.shape)} and "
                         f"{tuple(lora_a.shape)}")
    if slots.dim() != 1 or slots.shape[0] != x.shape[0] or slots.dtype != torch.int32:
        raise ValueError(f"slots must be int32 [T={x.shape[0]}], got {slots.dtype} {tuple(slots.shape)}")
    if out is not None and (tuple(out.shape) != (x.shape[0], lora_a.shape[1]) or out.dtype != torch.float32):
        raise ValueError(f"out must be float32 [{x.shape[0]}, {lora_a.shape[1]}], got {out.dtype} "
                         f"{tuple(out.shape)}")


def _check_expand(h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, scaling: torch.Tensor,
                  y: torch.Tensor, column_offset: int) -> None:
    if h.dim() != 2 or lora_b.dim() != 3 or h.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_expand takes h [T, R] and lora_b [S, N, R], got {tuple(h.shape)} and "
                         f"{tuple(lora_b.shape)}")
    if slots.dim() != 1 or slots.shape[0] != h.shape[0] or slots.dtype != torch.int32:
        raise ValueError(f"slots must be int32 [T={h.shape[0]}], got {slots.dtype} {tuple(slots.shape)}")
    if scaling.dim() != 1 or scaling.shape[0] != lora_b.shape[0]:
        raise ValueError(f"scaling must be [S={lora_b.shape[0]}], got {tuple(scaling.shape)}")
    if y.dim() != 2 or y.shape[0] != h.shape[0]:
        raise ValueError(f"y must be [T={h.shape[0]}, Ny], got {tuple(y.shape)}")
    if column_offset < 0 or column_offset + lora_b.shape[1] > y.shape[1]:
        raise ValueError(f"columns {column_offset}..{column_offset + lora_b.shape[1]} are outside y's "
                         f"{y.shape[1]}")


def lora_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference of ``lora_shrink``: one float32 matmul per slot present in the batch.

    Reads ``slots`` on the host (a device sync on a GPU), so it is not for CUDA graphs.
    """
    _check_shrink(x, lora_a, slots, out)
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device) if out is None else out
    if out is not None:
        h.zero_()
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = (slots == slot).nonzero().squeeze(1)  # [T_s]
        h[rows] = x[rows].float() @ lora_a[slot].float().T  # [T_s, K] @ [K, R]
    return h


def lora_expand_reference(h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, scaling: torch.Tensor,
                          y: torch.Tensor, column_offset: int = 0) -> None:
    """The torch reference of ``lora_expand``: float32 products and sums, one cast into ``y``'s dtype."""
    _check_expand(h, lora_b, slots, scaling, y, column_offset)
    cols = slice(column_offset, column_offset + lora_b.shape[1])
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = (slots == slot).nonzero().squeeze(1)  # [T_s]
        delta = (h[rows].float() @ lora_b[slot].float().T) * scaling[slot].float()  # [T_s, N]
        y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor,
                out: torch.Tensor | None = None, *, kernel: str | None = None) -> torch.Tensor:
    """h [T, R] float32 with ``h[t] = lora_a[slots[t]] @ x[t]`` (fp32 accumulation), 0 where ``slots[t] == -1``.

    Args:
        x: [T, K] the layer's input, any T (a decode batch or a prefill chunk, any mix of adapters).
        lora_a: [S, R, K] the A matrices of the S resident slots, zero rows past each adapter's rank.
        slots: int32 [T] each token's slot, -1 for the base model.
        out: an optional float32 [T, R] to write into (and return).
        kernel: the Triton layout on CUDA: None or 'gathered' (any batch), 'segmented' (tokens in long
            runs of one adapter, as in a prefill chunk; slow when a 32-token block holds many adapters).

    CUDA tensors go through the Triton kernel (no host sync, no allocation when ``out`` is given: safe
    inside a CUDA graph); CPU tensors through ``lora_shrink_reference``.
    """
    if x.is_cuda:
        return lora_shrink_triton(x, lora_a, slots, out, kernel=kernel)
    return lora_shrink_reference(x, lora_a, slots, out)


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, scaling: torch.Tensor,
                y: torch.Tensor, column_offset: int = 0, *, kernel: str | None = None) -> None:
    """In place: ``y[t, off:off+N] += scaling[slots[t]] * lora_b[slots[t]] @ h[t]`` for tokens with a slot >= 0.

    Args:
        h: [T, R] the shrink's output (float32, or the model dtype).
        lora_b: [S, N, R] the B matrices of the resident slots, zero columns past each adapter's rank.
        slots: int32 [T] each token's slot, -1 for the base model (its row of ``y`` is left alone).
        scaling: [S] float32 per-slot factor (alpha / r, or alpha / sqrt(r) for rsLoRA).
        y: [T, Ny] the layer's output in the model dtype, updated in place (float32 sums, one rounding).
        column_offset: first column of ``y`` written; a merged linear (packed q/k/v, gate/up) applies each
            shard's B to its own column slice.
        kernel: the Triton layout on CUDA, as for ``lora_shrink``.

    CUDA tensors go through the Triton kernel (CUDA-graph safe); CPU tensors through the reference.
    """
    if y.is_cuda:
        lora_expand_triton(h, lora_b, slots, scaling, y, column_offset, kernel=kernel)
    else:
        lora_expand_reference(h, lora_b, slots, scaling, y, column_offset)



# ---------------------------------------------------------------------------------------------------
# Triton kernels. Two layouts of the same products, both correct for any mix of slots:
#   gathered (BGMV, the default): one program per (token, block of output rows); each token reads its
#     own slot's weights (tokens of one adapter hit the L2 cache). Its cost does not depend on the
#     order of the tokens' adapters: decode batches, and any batch whose layout is unknown.
#   segmented (SGMV): one program per (block of tokens, block of outputs) loops over the distinct slots
#     in its token block, one tensor-core product per slot. Tokens of a request are contiguous in a
#     batch, so a prefill chunk's blocks hold one slot (one pass) and the weights are read once a
#     block; a block of many adapters costs one pass each (a shuffled decode batch: use 'gathered').
# ---------------------------------------------------------------------------------------------------

_SLOT_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def _shrink_gathered_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, K, R, stride_xt, stride_as, stride_ar, stride_ht,
                            EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    slot = tl.load(slots_ptr + t)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if slot >= 0:
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + tl.where(r_ok, r, 0)[:, None].to(tl.int64) * stride_ar
        x_row = x_ptr + t.to(tl.int64) * stride_xt
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                xk = tl.load(x_row + k)
                ak = tl.load(a_rows + k[None, :])
            else:
                k_ok = k < K
                xk = tl.load(x_row + k, mask=k_ok, other=0.0)
                ak = tl.load(a_rows + k[None, :], mask=k_ok[None, :], other=0.0)
            acc += ak.to(tl.float32) * xk.to(tl.float32)[None, :]
    tl.store(h_ptr + t.to(tl.int64) * stride_ht + r, tl.sum(acc, axis=1), mask=r_ok)


@triton.jit
def _expand_gathered_kernel(h_ptr, b_ptr, slots_ptr, scale_ptr, y_ptr, N, R, column_offset,
                            stride_ht, stride_bs, stride_bn, stride_yt,
                            BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        hv = tl.load(h_ptr + t.to(tl.int64) * stride_ht + r, mask=r_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + n[:, None].to(tl.int64) * stride_bn + r[None, :],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        delta = tl.sum(b.to(tl.float32) * hv[None, :], axis=1) * tl.load(scale_ptr + slot).to(tl.float32)
        y_at = y_ptr + t.to(tl.int64) * stride_yt + column_offset + n
        y = tl.load(y_at, mask=n_ok, other=0.0)
        tl.store(y_at, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _shrink_segmented_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, T, K, R, stride_xt, stride_as, stride_ar, stride_ht,
                             BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    safe_rows = tl.where(row_ok, rows, 0).to(tl.int64)
    slots = tl.load(slots_ptr + rows, mask=row_ok, other=-1)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    safe_r = tl.where(r_ok, r, 0).to(tl.int64)
    remaining = row_ok.to(tl.int32)
    while tl.max(remaining, axis=0) > 0:  # one pass per distinct slot in this token block
        slot = tl.min(tl.where(remaining > 0, slots, _SLOT_MAX), axis=0)
        match = (remaining > 0) & (slots == slot)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        if slot >= 0:
            a_rows = a_ptr + slot.to(tl.int64) * stride_as + safe_r[:, None] * stride_ar  # [BLOCK_R, 1]
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < K
                xk = tl.load(x_ptr + safe_rows[:, None] * stride_xt + k[None, :],
                             mask=match[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
                ak = tl.load(a_rows + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
                acc = tl.dot(xk, tl.trans(ak.to(xk.dtype)), acc, input_precision=PRECISION)
        tl.store(h_ptr + safe_rows[:, None] * stride_ht + r[None, :], acc, mask=match[:, None] & r_ok[None, :])
        remaining = tl.where(match, 0, remaining)


@triton.jit
def _expand_segmented_kernel(h_ptr, b_ptr, slots_ptr, scale_ptr, y_ptr, T, N, R, column_offset,
                             stride_ht, stride_bs, stride_bn, stride_yt,
                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    safe_rows = tl.where(row_ok, rows, 0).to(tl.int64)
    slots = tl.load(slots_ptr + rows, mask=row_ok, other=-1)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    safe_n = tl.where(n_ok, n, 0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    remaining = (row_ok & (slots >= 0)).to(tl.int32)  # base-model rows are left alone
    while tl.max(remaining, axis=0) > 0:  # one pass per distinct slot in this token block
        slot = tl.min(tl.where(remaining > 0, slots, _SLOT_MAX), axis=0)
        match = (remaining > 0) & (slots == slot)
        hk = tl.load(h_ptr + safe_rows[:, None] * stride_ht + r[None, :], mask=match[:, None] & r_ok[None, :],
                     other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_R]
        bk = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + safe_n[:, None] * stride_bn + r[None, :],
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
        delta = tl.dot(hk, tl.trans(bk), input_precision=PRECISION) * tl.load(scale_ptr + slot).to(tl.float32)
        y_at = y_ptr + safe_rows[:, None] * stride_yt + column_offset + n[None, :]  # [BLOCK_T, BLOCK_N]
        y_mask = match[:, None] & n_ok[None, :]
        y = tl.load(y_at, mask=y_mask, other=0.0)
        tl.store(y_at, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=y_mask)
        remaining = tl.where(match, 0, remaining)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _choose(kind: str | None) -> str:
    """None means 'gathered': its cost does not depend on how the batch orders its adapters."""
    if kind is None:
        return "gathered"
    if kind not in ("gathered", "segmented"):
        raise ValueError(f"kernel must be 'gathered', 'segmented' or None, got {kind!r}")
    return kind


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor,
                       out: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """``lora_shrink`` through a Triton kernel: ``kernel`` 'gathered' (BGMV), 'segmented' (SGMV) or None
    (= gathered). Allocates only the result when ``out`` is None; never reads the device."""
    _check_shrink(x, lora_a, slots, out)
    x, lora_a = _unit_last_stride(x), _unit_last_stride(lora_a)
    T, K = x.shape
    R = lora_a.shape[1]
    h = torch.empty(T, R, dtype=torch.float32, device=x.device) if out is None else out
    if T == 0:
        return h
    if h.stride(-1) != 1:
        raise ValueError("out needs a unit stride along R")
    if _choose(kernel) == "gathered":
        # Measured on an H200 (benchmarks/lora_kernels.py): up to 64 tokens, one A row a program in
        # wide loads (few loop trips, each a DRAM round trip): 4.5 us against 5.5 for 2 x 512 at q's
        # shape; from 65 tokens there are programs enough, and 4 x 512 tiles did best (6.3 against 6.8 us).
        if T <= 64:
            block_r, block_k = 1, min(_pow2(K), 4096)
        else:
            block_r, block_k = min(_pow2(R), 4 if T <= 256 else 8), min(_pow2(K), 512)
        _shrink_gathered_kernel[(T, triton.cdiv(R, block_r))](
            x, lora_a, slots, h, K, R, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0),
            EVEN_K=K % block_k == 0, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    else:
        block_t = 16 if T < 256 else 32
        block_r = max(16, min(_pow2(R), 64))
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _shrink_segmented_kernel[(triton.cdiv(T, block_t), triton.cdiv(R, block_r))](
            x, lora_a, slots, h, T, K, R, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0),
            BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=64, PRECISION=precision, num_warps=4)
    return h


def lora_expand_triton(h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, scaling: torch.Tensor,
                       y: torch.Tensor, column_offset: int = 0, kernel: str | None = None) -> None:
    """``lora_expand`` through a Triton kernel: ``kernel`` 'gathered' (BGMV), 'segmented' (SGMV) or None
    (= gathered). Allocates nothing; never reads the device."""
    _check_expand(h, lora_b, slots, scaling, y, column_offset)
    if y.stride(-1) != 1:
        raise ValueError("y needs a unit stride along its columns")
    h, lora_b = _unit_last_stride(h), _unit_last_stride(lora_b)
    T, R = h.shape
    N = lora_b.shape[1]
    if T == 0 or N == 0:
        return
    block_r = max(16, _pow2(R))
    if _choose(kernel) == "gathered":
        block_n = max(16, min(256, 4096 // block_r))
        _expand_gathered_kernel[(T, triton.cdiv(N, block_n))](
            h, lora_b, slots, scaling, y, N, R, column_offset,
            h.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
            BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
    else:
        block_t = 16 if T < 256 else 64
        precision = "ieee" if y.dtype == torch.float32 else "tf32"
        _expand_segmented_kernel[(triton.cdiv(T, block_t), triton.cdiv(N, 64))](
            h, lora_b, slots, scaling, y, T, N, R, column_offset,
            h.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
            BLOCK_T=block_t, BLOCK_N=64, BLOCK_R=block_r, PRECISION=precision, num_warps=4)
