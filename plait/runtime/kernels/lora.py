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
                out: torch.Tensor | None = None) -> torch.Tensor:
    """h [T, R] float32 with ``h[t] = lora_a[slots[t]] @ x[t]`` (fp32 accumulation), 0 where ``slots[t] == -1``.

    Args:
        x: [T, K] the layer's input, any T (a decode batch or a prefill chunk, any mix of adapters).
        lora_a: [S, R, K] the A matrices of the S resident slots, zero rows past each adapter's rank.
        slots: int32 [T] each token's slot, -1 for the base model.
        out: an optional float32 [T, R] to write into (and return).

    CUDA tensors go through the Triton kernel (no host sync, no allocation when ``out`` is given: safe
    inside a CUDA graph); CPU tensors through ``lora_shrink_reference``.
    """
    if x.is_cuda:
        return lora_shrink_triton(x, lora_a, slots, out)
    return lora_shrink_reference(x, lora_a, slots, out)


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, scaling: torch.Tensor,
                y: torch.Tensor, column_offset: int = 0) -> None:
    """In place: ``y[t, off:off+N] += scaling[slots[t]] * lora_b[slots[t]] @ h[t]`` for tokens with a slot >= 0.

    Args:
        h: [T, R] the shrink's output (float32, or the model dtype).
        lora_b: [S, N, R] the B matrices of the resident slots, zero columns past each adapter's rank.
        slots: int32 [T] each token's slot, -1 for the base model (its row of ``y`` is left alone).
        scaling: [S] float32 per-slot factor (alpha / r, or alpha / sqrt(r) for rsLoRA).
        y: [T, Ny] the layer's output in the model dtype, updated in place (float32 sums, one rounding).
        column_offset: first column of ``y`` written; a merged linear (packed q/k/v, gate/up) applies each
            shard's B to its own column slice.

    CUDA tensors go through the Triton kernel (CUDA-graph safe); CPU tensors through the reference.
    """
    if y.is_cuda:
        lora_expand_triton(h, lora_b, slots, scaling, y, column_offset)
    else:
        lora_expand_reference(h, lora_b, slots, scaling, y, column_offset)


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``lora_shrink`` through the Triton kernel (not yet written: the reference for now)."""
    return lora_shrink_reference(x, lora_a, slots, out)


def lora_expand_triton(h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, scaling: torch.Tensor,
                       y: torch.Tensor, column_offset: int = 0) -> None:
    """``lora_expand`` through the Triton kernel (not yet written: the reference for now)."""
    lora_expand_reference(h, lora_b, slots, scaling, y, column_offset)
