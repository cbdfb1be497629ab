"""Group (token, choice) pairs by expert for the grouped GEMMs of ``fused_moe_triton``.

``topk_ids [T, K]`` names an expert for each pair ``p = t * K + k``. The GEMM kernels process
``BLOCK_M`` rows of one expert per program, so the pairs are laid out expert by expert, each expert's
run padded to a multiple of ``BLOCK_M``:

- ``sorted_ids`` int32 ``[max_padded]``: pair indices, expert 0's first, in pair order within an
  expert; padding holds ``T * K`` (no pair);
- ``block_expert`` int32 ``[max_padded / BLOCK_M]``: the expert of each block of rows, -1 for a block
  of pairs whose id is outside ``[0, E)`` (an expert held elsewhere: the down kernel writes zeros for
  them) and for blocks past the end;
- ``num_padded`` int32 ``[1]``: the rows in use (a multiple of ``BLOCK_M``).

``max_padded`` is a host bound that needs no look at the ids: ``T*K`` rows plus less than ``BLOCK_M``
of padding for each non-empty group, of which there are at most ``min(E, T*K) + 1`` (the +1 is the
out-of-range group). Up to ``TRITON_MAX_PAIRS`` pairs (decode), one Triton program does it all
(count, prefix-sum, scatter, label blocks) in one launch; it is serial over chunks of pairs, so
above that (on an H200 it took 26 us at 256 pairs and 1.2 ms at 16k) ``moe_align_ref``, the same
layout from torch's sort and a few small kernels, is used. Neither reads anything back to the host:
both are CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TRITON_MAX_PAIRS = 1024
Alignment = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (sorted_ids, block_expert, num_padded)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The host bound on ``num_padded`` (a multiple of ``block_m``)."""
    groups = min(num_experts, num_pairs) + 1
    return triton.cdiv(num_pairs + groups * (block_m - 1), block_m) * block_m


@triton.jit
def _bucket_onehot(ids_ptr, offs, numel, E, buckets):
    """[CHUNK, NUM_BUCKETS] int32 one-hot of each pair's bucket (its expert, or E if out of range)."""
    valid = offs < numel
    e = tl.load(ids_ptr + offs, mask=valid, other=0)
    e = tl.where((e >= 0) & (e < E), e, E)
    return ((e[:, None] == buckets[None, :]) & valid[:, None]).to(tl.int32)


@triton.jit(do_not_specialize=["numel", "max_padded"])  # token counts: one variant for all
def _moe_align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    numel, E, max_padded,
    NUM_BUCKETS: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
):
    buckets = tl.arange(0, NUM_BUCKETS)  # bucket E collects out-of-range ids; those above E stay empty
    counts = tl.zeros([NUM_BUCKETS], dtype=tl.int32)
    for start in range(0, numel, CHUNK):
        onehot = _bucket_onehot(ids_ptr, start + tl.arange(0, CHUNK), numel, E, buckets)
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [NUM_BUCKETS]
    starts = ends - padded
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))

    for start in range(0, max_padded, FILL):  # every row empty first
        rows = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + rows, tl.zeros([FILL], dtype=tl.int32) + numel, mask=rows < max_padded)
    tl.debug_barrier()  # the scatter below overwrites some of those rows from other threads

    placed = starts  # next free row of each bucket
    for start in range(0, numel, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        onehot = _bucket_onehot(ids_ptr, offs, numel, E, buckets)  # [CHUNK, NUM_BUCKETS]
        rank = tl.cumsum(onehot, axis=0) - 1  # rank of each pair among this chunk's pairs of its bucket
        row = tl.sum(onehot * (rank + placed[None, :]), axis=1)  # [CHUNK]
        tl.store(sorted_ptr + row, offs, mask=offs < numel)
        placed += tl.sum(onehot, axis=0)

    for start in range(0, max_padded // BLOCK_M, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        first_row = blocks * BLOCK_M
        bucket = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)  # groups ending before
        expert = tl.where(bucket < E, bucket, -1)  # out-of-range group and past the end: -1
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_padded // BLOCK_M)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """``topk_ids [T, K]`` -> (sorted_ids [max_padded], block_expert [max_padded / block_m], num_padded [1]),
    all int32 on topk_ids' device (see the module docstring)."""
    numel = topk_ids.numel()
    if numel > TRITON_MAX_PAIRS:
        return moe_align_ref(topk_ids, num_experts, block_m)
    max_padded = max_padded_rows(numel, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)  # [T*K]
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_buckets = triton.next_power_of_2(num_experts + 1)
    chunk = max(16, min(128, 16384 // num_buckets))  # the one-hot tile [chunk, buckets] stays <= 16k elements
    _moe_align_kernel[(1,)](
        ids, sorted_ids, block_expert, num_padded, numel, num_experts, max_padded,
        NUM_BUCKETS=num_buckets, BLOCK_M=block_m, CHUNK=chunk, FILL=1024, num_warps=8 if num_buckets >= 128 else 4,
    )
    return sorted_ids, block_expert, num_padded


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """The same layout in torch (stable sort by bucket)."""
    numel = topk_ids.numel()
    max_padded = max_padded_rows(numel, num_experts, block_m)
    device = topk_ids.device
    ids = topk_ids.reshape(-1).long()  # [T*K]
    bucket = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.index_add_(0, bucket, torch.ones_like(bucket))  # [E + 1]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # [E + 1]
    order = torch.sort(bucket, stable=True).indices  # pairs grouped by bucket, pair order within
    first_of_bucket = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=device) - first_of_bucket[bucket[order]]
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=device)
    sorted_ids[starts[bucket[order]] + rank] = order.to(torch.int32)
    ends = torch.cumsum(padded, 0)
    first_rows = torch.arange(max_padded // block_m, device=device) * block_m
    block_bucket = torch.searchsorted(ends, first_rows, right=True)
    block_expert = torch.where(block_bucket < num_experts, block_bucket, -1).to(torch.int32)
    return sorted_ids, block_expert, padded.sum().to(torch.int32).reshape(1)
