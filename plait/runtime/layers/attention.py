"""Attention over the token-slot KV pool, behind a backend interface.

``AttentionBackend`` is the contract a backend (torch here, Triton on GPU) implements:
``prepare(batch)`` builds per-step metadata once (shared by all layers), ``forward`` writes the new
tokens' K/V into the pool and attends each new token to its request's cached prefix and causally to
the request's other new tokens.

Two per-layer options (GPT-OSS): a sliding window ``W`` (the query at position ``i`` sees the keys at
positions ``j`` with ``i - W < j <= i``, as transformers' ``sliding_window_causal`` mask) and learned
per-head sinks ``s [H]`` (each head's softmax runs over its visible logits and ``s_h``; the sink takes
probability mass but adds no value). Both default to off, which is the plain causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from plait.runtime.executor.forward_batch import ForwardBatch

# extend rows of a layer with a window or sinks attend in chunks of this many queries, each to the keys
# its window can reach (this bounds the explicit masks and sink biases)
WINDOW_QUERY_CHUNK = 1024
_UNBOUNDED = 1 << 62  # the window of a full-attention layer with sinks: larger than any sequence


class AttentionBackend(Protocol):
    def prepare(self, batch: ForwardBatch) -> None:
        """Fill ``batch.attn_metadata``; called once per step before the layers run."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scale: float, batch: ForwardBatch,
        kv_stored: bool = False, *, sliding_window: int | None = None, sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> attention output [T, H, D].

        ``kv_stored``: the new tokens' K/V are already in the pool (skip the write). ``sliding_window``:
        keys more than ``W - 1`` positions before the query are not seen (None: all). ``sinks``: [H]
        per-head sink logits (None: no sink).
        """


@dataclass
class _AttnPlan:
    """Which keys each new token attends to, for one window size (None: the full causal prefix)."""

    # decode rows (one new token each), attended in one padded SDPA call
    decode_kv_slots: torch.Tensor | None  # [Bd, K] slots (padding points at slot 0)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, K] bool, True = attend; None: every key
    # extend rows or query chunks: (token start, token end, kv slots [S], mask [E, S] or None for causal)
    extends: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]


@dataclass
class _TorchAttnMetadata:
    decode_rows: list[int]  # batch rows with one new token
    decode_token_idx: torch.Tensor | None  # [Bd] flat token indices; None when every token is a decode token
    plans: dict[int | None, _AttnPlan] = field(default_factory=dict)  # by window; None built in prepare


def _gather_rows(buf: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """buf [S, KVH, D] rows at ``slots`` (any shape) -> [*slots.shape, KVH, D] in ``dtype`` (the queries':
    an FP8 cache is read in it).

    ``index_select`` on a 2-D view copies whole rows; it is about 3x faster on the CPU than advanced
    indexing (``buf[slots]``), which dominated batched decode with long contexts.
    """
    rows = buf.view(buf.shape[0], -1).index_select(0, slots.reshape(-1))  # [N, KVH * D]
    return rows.view(*slots.shape, buf.shape[1], buf.shape[2]).to(dtype)


def _full_plan(batch: ForwardBatch, decode_rows: list[int]) -> _AttnPlan:
    """Plain causal attention: every new token sees its whole prefix."""
    device = batch.input_ids.device
    extends = []
    for i, n in enumerate(batch.extend_lens):
        if n == 1:
            continue
        start, prefix, seq = batch.extend_starts[i], batch.prefix_lens[i], batch.seq_lens[i]
        slots = batch.slot_table[int(batch.req_rows[i]), :seq]
        mask = None
        if prefix > 0:
            q_pos = torch.arange(prefix, seq, device=device)
            mask = torch.arange(seq, device=device)[None, :] <= q_pos[:, None]  # [E, S]
        extends.append((start, start + n, slots, mask))
    slots = mask = None
    if decode_rows:
        lens = [batch.seq_lens[i] for i in decode_rows]
        kmax = max(lens)  # from the host list: no device sync
        rows = batch.req_rows[decode_rows] if len(decode_rows) < batch.batch_size else batch.req_rows
        if all(batch.seq_lens[i] == kmax for i in decode_rows):
            slots = batch.slot_table[rows, :kmax]  # no padding: no mask
        else:
            seq_lens = torch.tensor(lens, device=device)
            valid = torch.arange(kmax, device=device)[None, :] < seq_lens[:, None]  # [Bd, Kmax]
            slots = torch.where(valid, batch.slot_table[rows, :kmax], 0)
            mask = valid[:, None, None, :]
    return _AttnPlan(slots, mask, extends)


def _window_plan(batch: ForwardBatch, decode_rows: list[int], window: int, table: torch.Tensor) -> _AttnPlan:
    """Sliding window ``window``: decode rows read only their last ``window`` keys; extend rows attend in
    query chunks of ``WINDOW_QUERY_CHUNK``, each to the keys its window can reach (``_UNBOUNDED``: all).
    ``table``: the request-to-slot table of the layers (``ForwardBatch.kv_slots``)."""
    device = batch.input_ids.device
    extends = []
    for i, n in enumerate(batch.extend_lens):
        if n == 1:
            continue
        start, prefix, seq = batch.extend_starts[i], batch.prefix_lens[i], batch.seq_lens[i]
        table_row = table[int(batch.req_rows[i])]
        for c0 in range(0, n, WINDOW_QUERY_CHUNK):
            c1 = min(n, c0 + WINDOW_QUERY_CHUNK)
            q_first, q_end = prefix + c0, prefix + c1  # absolute positions of this chunk's queries
            k_first = max(0, q_first - window + 1)
            slots = table_row[k_first:q_end]
            mask = None
            if k_first != q_first or q_end - 1 - k_first >= window:  # plain causal unless this holds
                q_pos = torch.arange(q_first, q_end, device=device)[:, None]
                k_pos = torch.arange(k_first, q_end, device=device)[None, :]
                mask = (k_pos <= q_pos) & (q_pos - k_pos < window)  # [E, S]
            extends.append((start + c0, start + c1, slots, mask))
    slots = mask = None
    if decode_rows:
        lens = [batch.seq_lens[i] for i in decode_rows]
        counts = [min(n, window) for n in lens]
        kmax = max(counts)
        rows = batch.req_rows[decode_rows] if len(decode_rows) < batch.batch_size else batch.req_rows
        first = torch.tensor([n - c for n, c in zip(lens, counts)], device=device)  # [Bd]
        offs = torch.arange(kmax, device=device)[None, :]  # [1, K]
        valid = offs < torch.tensor(counts, device=device)[:, None]  # [Bd, K]
        pos = torch.where(valid, first[:, None] + offs, 0)  # [Bd, K]
        slots = torch.where(valid, table[rows[:, None], pos], 0)  # [Bd, K]
        if not all(c == kmax for c in counts):
            mask = valid[:, None, None, :]
    return _AttnPlan(slots, mask, extends)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """SDPA on q [B, H, E, D], k/v [B, KVH, S, D] with a bool mask broadcastable to [B, 1, E, S].

    With ``sinks`` [H], one more key of zeros (logit 0) gets the additive bias ``s_h`` and a value of
    zeros: each head's softmax then includes its sink logit, which adds no value.
    """
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    B, H, E, _ = q.shape
    S = k.shape[2]
    if causal:  # E == S here: a prefill without prefix
        mask = torch.ones((E, S), dtype=torch.bool, device=q.device).tril()
    bias = torch.zeros((B, H, E, S + 1), dtype=q.dtype, device=q.device)
    if mask is not None:
        bias[..., :S].masked_fill_(~mask, float("-inf"))
    bias[..., S] = sinks.to(q.dtype)[None, :, None]
    zero = k.new_zeros((k.shape[0], k.shape[1], 1, k.shape[3]))
    k = torch.cat((k, zero), dim=2)  # [B, KVH, S + 1, D]
    v = torch.cat((v, zero), dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)


class TorchAttentionBackend:
    """Reference backend in plain torch (CPU and GPU): padded SDPA for decode rows, one call per extend row."""

    accepts_stored_kv = False  # the fused rope+store path is for the Triton backend

    def prepare(self, batch: ForwardBatch) -> None:
        decode_rows = [i for i, n in enumerate(batch.extend_lens) if n == 1]
        tok_idx = None
        if decode_rows and len(decode_rows) < batch.batch_size:
            tok_idx = torch.tensor([batch.extend_starts[i] for i in decode_rows], device=batch.input_ids.device)
        md = _TorchAttnMetadata(decode_rows, tok_idx)
        md.plans[None] = _full_plan(batch, decode_rows)
        batch.attn_metadata = md

    def _plan(self, batch: ForwardBatch, window: int | None, sinks: torch.Tensor | None) -> _AttnPlan:
        """This step's plan for ``window``, built by the first layer that asks and shared by the others."""
        md: _TorchAttnMetadata = batch.attn_metadata
        table = batch.kv_slots(window)[0]
        if window is None and sinks is not None:
            window = _UNBOUNDED  # chunked like a windowed layer: bounded sink biases
        plan = md.plans.get(window)
        if plan is None:
            if window < 1:
                raise ValueError(f"sliding_window must be >= 1, got {window}")
            plan = md.plans[window] = _window_plan(batch, md.decode_rows, window, table)
        return plan

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scale: float, batch: ForwardBatch,
        kv_stored: bool = False, *, sliding_window: int | None = None, sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        md: _TorchAttnMetadata = batch.attn_metadata
        plan = self._plan(batch, sliding_window, sinks)
        pool = batch.pool
        if not kv_stored:
            pool.set_kv(layer_id, batch.kv_slots(sliding_window)[1], k, v)
        k_buf, v_buf = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
        out = torch.empty_like(q)
        if plan.decode_kv_slots is not None:
            qd = q if md.decode_token_idx is None else q[md.decode_token_idx]
            kd = _gather_rows(k_buf, plan.decode_kv_slots, q.dtype).transpose(1, 2)  # [Bd, KVH, K, D]
            vd = _gather_rows(v_buf, plan.decode_kv_slots, q.dtype).transpose(1, 2)
            od = _sdpa(qd.unsqueeze(2), kd, vd, plan.decode_mask, False, scale, sinks)  # [Bd, H, 1, D]
            if md.decode_token_idx is None:
                out = od.squeeze(2)
            else:
                out[md.decode_token_idx] = od.squeeze(2)
        for start, end, slots, mask in plan.extends:
            qe = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, E, D]
            ke = _gather_rows(k_buf, slots, q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, S, D]
            ve = _gather_rows(v_buf, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            oe = _sdpa(qe, ke, ve, mask, mask is None, scale, sinks)
            out[start:end] = oe[0].transpose(0, 1)
        return out


class Attention(nn.Module):
    """Per-layer attention front: delegates to the batch's backend with this layer's id, scale and options.

    Args:
        layer_id: index of the layer's K/V buffers in the pool.
        head_dim: head size (the scale is ``head_dim ** -0.5``).
        backend: the attention backend shared by all layers.
        sliding_window: this layer's window ``W`` (None: full causal attention).
    """

    def __init__(self, layer_id: int, head_dim: int, backend: AttentionBackend, *, sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.layer_id = layer_id
        self.scale = head_dim**-0.5
        self.backend = backend
        self.sliding_window = sliding_window

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> [T, H, D]; ``sinks`` [H] per-head sink logits or None."""
        if self.sliding_window is None and sinks is None:  # today's call, unchanged for backends without options
            return self.backend.forward(q, k, v, self.layer_id, self.scale, batch)
        return self.backend.forward(
            q, k, v, self.layer_id, self.scale, batch, sliding_window=self.sliding_window, sinks=sinks
        )

    def can_fuse_rope_store(self, rope: object) -> bool:
        """Whether ``rope_store_attend`` serves this step: a fused (CUDA) rope and a backend that reads
        the new tokens' K/V from the pool only (it then skips its own store)."""
        from plait.runtime.layers.rotary import FusedRope

        return isinstance(rope, FusedRope) and getattr(self.backend, "accepts_stored_kv", False)

    def rope_store_attend(
        self, rope: object, qkv_heads: torch.Tensor, num_q_heads: int, num_kv_heads: int, batch: ForwardBatch,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotary on q/k and the K/V pool write in one kernel, then attention: ``qkv_heads``
        [T, H + 2 KVH, D] -> [T, H, D]. Same result as ``apply`` + ``forward``, one launch fewer per layer."""
        from plait.runtime.kernels.fused_rotary import rotary_store_kv

        pool = batch.pool
        rotary_store_kv(
            qkv_heads, num_q_heads, num_kv_heads, rope.positions, rope.cos_cache, rope.sin_cache,
            pool.k_buffers[self.layer_id], pool.v_buffers[self.layer_id], batch.kv_slots(self.sliding_window)[1],
        )
        q = qkv_heads[:, :num_q_heads]
        k = qkv_heads[:, num_q_heads : num_q_heads + num_kv_heads]
        v = qkv_heads[:, num_q_heads + num_kv_heads :]
        return self.backend.forward(
            q, k, v, self.layer_id, self.scale, batch, kv_stored=True, sliding_window=self.sliding_window, sinks=sinks
        )
