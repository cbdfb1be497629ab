"""One packed bitmask per batch: int32 [B, ceil(V / 32)], bit j of word w = token 32 * w + j allowed.

``build_batch_bitmask`` fills the rows of constrained requests (unconstrained rows are all ones and
are not touched when applying); llguidance's rows in one call on its thread pool. ``apply_batch_bitmask``
sets disallowed logits to -inf: the Triton kernel (``runtime/kernels/bitmask.py``) on CUDA, plain torch
on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from plait.runtime.executor.forward_batch import host_to_device

__all__ = ["apply_batch_bitmask", "build_batch_bitmask", "unpack_rows"]

# From this many rows of one backend with a batch path (``TokenMatcher.fill_many``: llguidance's thread
# pool) their masks are computed in one call, in parallel; fewer are filled one by one
PARALLEL_MIN_ROWS = 4


def build_batch_bitmask(grammars: Sequence[Any | None], words: int, pin: bool = False) -> tuple[torch.Tensor, list[int]] | None:
    """The batch bitmask for ``grammars`` (one ``GrammarState`` or None per row) and the constrained rows;
    None when no row is constrained."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    bitmask = torch.full((len(grammars), words), -1, dtype=torch.int32, pin_memory=pin)
    together: dict[type, list[tuple[Any, int]]] = {}  # backend matcher class -> (matcher, row)
    alone = []
    for i in rows:
        matcher = grammars[i].batch_matcher(words)
        if matcher is None:
            alone.append(i)
        else:
            together.setdefault(type(matcher), []).append((matcher, i))
    for kind, matchers in together.items():
        if len(matchers) < PARALLEL_MIN_ROWS:
            alone.extend(i for _, i in matchers)
            continue
        address = bitmask.data_ptr()
        kind.fill_many(matchers, address, words * 4, len(grammars))
        for _, i in matchers:  # by address: a tensor view per row cost more than most edits
            grammars[i].edit_bitmask_at(address + i * words * 4)
    for i in alone:
        grammars[i].fill_bitmask(bitmask[i])
    return bitmask, rows


def unpack_rows(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 [N, W] -> bool [N, vocab_size], True = allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1  # [N, W, 32]
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()  # [N, W * 32] -> [N, V]


def apply_batch_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """In place: logits [B, V] of ``rows`` keep only the tokens their bitmask row allows (tokens past
    the bitmask's width are disallowed too). Other rows are untouched."""
    if not rows:
        return
    vocab = logits.shape[-1]
    covered = min(vocab, bitmask.shape[-1] * 32)
    device = logits.device
    index = torch.tensor(list(rows), dtype=torch.int64)
    if device.type == "cuda":
        from plait.runtime.kernels.bitmask import apply_token_bitmask_inplace

        index_d = host_to_device(index, device)
        apply_token_bitmask_inplace(logits, bitmask.to(device, non_blocking=True), index_d, covered)
        if covered < vocab:
            logits[index_d, covered:] = float("-inf")
        return
    allowed = unpack_rows(bitmask.index_select(0, index), vocab)  # [N, V]
    if covered < vocab:
        allowed[:, covered:] = False
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
