"""Hand-built ForwardBatches over a real KV pool, for attention backend tests.

``make_pool_and_table`` fills a pool with random K/V (cached prefixes) and scatters requests' slots;
``build_batch`` allocates each request's rows and slots and returns random q/k/v for its new tokens.
``reference_output`` attends every token of a batch (decode rows included) with the kernels' float32
reference, reading the pool after the new K/V were written.
"""

from __future__ import annotations

import torch

from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.table import ReqToSlotTable


def make_pool_and_table(specs, KVH, D, dtype, device, gen, *, num_layers=2, hybrid_window=0):
    """A pool holding every request of ``specs`` ((prefix_len, extend_len) each), random K/V, shuffled slots.
    ``hybrid_window``: a hybrid pool whose last layer is a sliding-window layer of that window, with
    nearly as many sliding slots as full ones (also shuffled, so that the two indices differ)."""
    total = sum(p + n for p, n in specs)
    hybrid = dict(sliding_layers=(num_layers - 1,), num_sliding_slots=total + 12,
                  sliding_window=hybrid_window) if hybrid_window else {}
    pool = KVPool(total + 16, num_layers, KVH, D, dtype, device, **hybrid)
    for buf in pool.k_buffers + pool.v_buffers:  # cached prefixes: random K/V everywhere
        buf.copy_(torch.randn(buf.shape, generator=gen).to(dtype))
    # shuffle the free list so that requests' slots are scattered
    pool._free_slots = pool._free_slots[torch.randperm(pool.num_free, generator=gen).to(device)]
    if hybrid:
        pool._free_sliding = pool._free_sliding[torch.randperm(pool.num_sliding_free, generator=gen).to(device)]
    table = ReqToSlotTable(len(specs) + 3, max(p + n for p, n in specs) + 5, device,
                           full_to_sliding=pool.full_to_sliding)
    table.alloc()  # row 0 unused: rows are not batch positions
    return pool, table


def build_batch(pool, table, specs, H, gen):
    """specs: (prefix_len, extend_len) per request. Allocates rows and slots; returns (batch, q, k, v)."""
    device = pool.device
    KVH, D = pool.num_kv_heads, pool.head_dim
    rows, out_slots = [], []
    for prefix, n in specs:
        row = table.alloc()
        slots = pool.alloc(prefix + n)
        table.write(row, 0, slots)
        rows.append(row)
        out_slots.append(slots[prefix:])
    ext = [n for _, n in specs]
    T = sum(ext)
    starts = [sum(ext[:i]) for i in range(len(specs))]
    positions = torch.cat([torch.arange(p, p + n) for p, n in specs]).to(device)
    batch = ForwardBatch(
        input_ids=torch.zeros(T, dtype=torch.int64, device=device),
        positions=positions,
        out_cache_loc=torch.cat(out_slots),
        req_rows=torch.tensor(rows, dtype=torch.int64, device=device),
        prefix_lens=[p for p, _ in specs],
        extend_lens=ext,
        seq_lens=[p + n for p, n in specs],
        extend_starts=starts,
        logits_indices=torch.tensor([s + n - 1 for s, n in zip(starts, ext)], device=device),
        pool=pool,
        slot_table=table.table,
        sliding_slot_table=table.sliding_table,
        sliding_out_cache_loc=None if pool.full_to_sliding is None else pool.full_to_sliding[torch.cat(out_slots)],
    )

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(pool.dtype).to(device)

    return batch, rand(T, H, D), rand(T, KVH, D), rand(T, KVH, D)


def reference_output(batch, q, layer_id, scale, *, sliding_window=None, sinks=None):
    """[T, H, D] float32: every token attended by ``attention_rows_ref`` (the pool must hold the new K/V)."""
    from plait.runtime.kernels.common import attention_rows_ref

    pool = batch.pool
    k_buf, v_buf = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
    table = batch.kv_slots(sliding_window if layer_id in pool.sliding_layers else None)[0]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, n in enumerate(batch.extend_lens):
        start, prefix, seq = batch.extend_starts[i], batch.prefix_lens[i], batch.seq_lens[i]
        slots = table[int(batch.req_rows[i]), :seq].long()
        q_pos = torch.arange(prefix, seq, device=q.device)
        out[start : start + n] = attention_rows_ref(
            q[start : start + n], k_buf[slots], v_buf[slots], q_pos, scale, sliding_window=sliding_window, sinks=sinks
        )
    return out
