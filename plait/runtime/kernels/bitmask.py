"""Apply a packed token bitmask (constrained decoding) to logits, in place.

The bitmask is int32 ``[B, ceil(V / 32)]``: bit ``j`` of word ``w`` set means token ``32 * w + j`` is
allowed. Disallowed tokens' logits become ``-inf``. With ``indices``, only those rows of the logits
are masked, each with the bitmask row of the same index (xgrammar's convention); other rows are left
untouched. Tokens at or past ``vocab_size`` (default: what both the logits and the bitmask cover) are
left untouched too, so logits padded past the tokenizer's vocabulary can be masked by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048


# Index arguments (positions, slots, rows) are often slices of one per-step tensor at offsets that move with
# the batch; they are read one value at a time, so no kernel variant per 16-byte alignment (compiled mid-serving).
@triton.jit(do_not_specialize_on_alignment=["Indices"])
def _apply_bitmask_kernel(
    Logits, Bitmask, Indices,
    vocab_size,
    stride_lb, stride_bb,
    HAS_INDICES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_INDICES:
        row = tl.load(Indices + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab_size
    words = tl.load(Bitmask + row * stride_bb + offs // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    neg_inf = tl.full([BLOCK], float("-inf"), dtype=Logits.dtype.element_ty)
    tl.store(Logits + row * stride_lb + offs, neg_inf, mask=in_vocab & ~allowed)


def _vocab_size(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int | None) -> int:
    covered = min(logits.shape[-1], bitmask.shape[-1] * 32)
    if vocab_size is None:
        return covered
    if vocab_size > covered:
        raise ValueError(f"vocab_size {vocab_size} exceeds what logits and bitmask cover ({covered})")
    return vocab_size


def _check(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(f"expected 2-D logits and bitmask, got {tuple(logits.shape)} and {tuple(bitmask.shape)}")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows, logits {logits.shape[0]}")


def apply_token_bitmask_inplace(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    indices: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> None:
    """Set disallowed tokens' logits [B, V] to -inf, in place (Triton).

    Args:
        logits: [B, V] float logits (unit last stride).
        bitmask: [B, ceil(V / 32)] int32 packed allowed-token bits (unit last stride).
        indices: optional [N] rows to mask (the others are left untouched).
        vocab_size: tokens at or past it are left untouched (see the module doc).
    """
    _check(logits, bitmask)
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("logits and bitmask need a unit last stride")
    vocab = _vocab_size(logits, bitmask, vocab_size)
    rows = logits.shape[0] if indices is None else indices.shape[0]
    if rows == 0 or vocab == 0:
        return
    grid = (rows, triton.cdiv(vocab, BLOCK_V))
    _apply_bitmask_kernel[grid](
        logits, bitmask, indices if indices is not None else bitmask,
        vocab, logits.stride(0), bitmask.stride(0),
        HAS_INDICES=indices is not None, BLOCK=BLOCK_V, num_warps=8,
    )


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 [B, W] -> bool [B, vocab_size], True = allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask[:, :, None] >> bits) & 1  # [B, W, 32]
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()  # [B, W * 32] -> [B, V]


def apply_token_bitmask_ref(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    indices: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> None:
    """Pure-torch reference of ``apply_token_bitmask_inplace`` (same arguments, in place)."""
    _check(logits, bitmask)
    vocab = _vocab_size(logits, bitmask, vocab_size)
    rows = torch.arange(logits.shape[0], device=logits.device) if indices is None else indices.long()
    allowed = unpack_bitmask(bitmask[rows], vocab)  # [N, vocab]
    sub = logits[rows, :vocab]
    logits[rows, :vocab] = sub.masked_fill(~allowed, float("-inf"))


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """Bool [B, V] (True = allowed) -> packed int32 [B, ceil(V / 32)] (for tests and grammar code)."""
    B, V = allowed.shape
    W = -(-V // 32)
    padded = torch.zeros((B, W * 32), dtype=torch.int64, device=allowed.device)
    padded[:, :V] = allowed.long()
    words = (padded.view(B, W, 32) << torch.arange(32, device=allowed.device)).sum(-1)  # [B, W] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


__all__ = ["apply_token_bitmask_inplace", "apply_token_bitmask_ref", "pack_bitmask", "unpack_bitmask"]
