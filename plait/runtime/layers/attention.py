"""Attention over the token-slot KV pool, behind a backend interface.

``AttentionBackend`` is the contract a backend (torch here, Triton on GPU) implements:
``prepare(batch)`` builds per-step metadata once (shared by all layers), ``forward`` writes the new
tokens' K/V into the pool and attends each new token to its request's cached prefix and causally to
the request's other new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from plait.runtime.executor.forward_batch import ForwardBatch


class AttentionBackend(Protocol):
    def prepare(self, batch: ForwardBatch) -> None:
        """Fill ``batch.attn_metadata``; called once per step before the layers run."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scale: float, batch: ForwardBatch
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> attention output [T, H, D]."""


@dataclass
class _TorchAttnMetadata:
    # decode rows (one new token each), attended in one padded SDPA call
    decode_token_idx: torch.Tensor | None  # [Bd] flat token indices; None when every token is a decode token
    decode_kv_slots: torch.Tensor | None  # [Bd, Kmax] slots (padding points at slot 0)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, Kmax] bool, True = attend
    # extend rows: (token start, token end, kv slots [S], causal mask [E, S] or None for plain causal)
    extends: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]


def _gather_rows(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """buf [S, KVH, D] rows at ``slots`` (any shape) -> [*slots.shape, KVH, D].

    ``index_select`` on a 2-D view copies whole rows; it is about 3x faster on the CPU than advanced
    indexing (``buf[slots]``), which dominated batched decode with long contexts.
    """
    rows = buf.view(buf.shape[0], -1).index_select(0, slots.reshape(-1))  # [N, KVH * D]
    return rows.view(*slots.shape, buf.shape[1], buf.shape[2])


class TorchAttentionBackend:
    """Reference backend in plain torch (CPU and GPU): padded SDPA for decode rows, one call per extend row."""

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        decode_rows = [i for i, n in enumerate(batch.extend_lens) if n == 1]
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
        tok_idx = slots = mask = None
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
            if len(decode_rows) < batch.batch_size:
                tok_idx = torch.tensor([batch.extend_starts[i] for i in decode_rows], device=device)
        batch.attn_metadata = _TorchAttnMetadata(tok_idx, slots, mask, extends)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scale: float, batch: ForwardBatch
    ) -> torch.Tensor:
        md: _TorchAttnMetadata = batch.attn_metadata
        pool = batch.pool
        pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
        out = torch.empty_like(q)
        if md.decode_kv_slots is not None:
            qd = q if md.decode_token_idx is None else q[md.decode_token_idx]
            kd = _gather_rows(k_buf, md.decode_kv_slots).transpose(1, 2)  # [Bd, KVH, Kmax, D]
            vd = _gather_rows(v_buf, md.decode_kv_slots).transpose(1, 2)
            od = F.scaled_dot_product_attention(
                qd.unsqueeze(2), kd, vd, attn_mask=md.decode_mask, scale=scale, enable_gqa=True
            )  # [Bd, H, 1, D]
            if md.decode_token_idx is None:
                out = od.squeeze(2)
            else:
                out[md.decode_token_idx] = od.squeeze(2)
        for start, end, slots, mask in md.extends:
            qe = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, E, D]
            ke = _gather_rows(k_buf, slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, S, D]
            ve = _gather_rows(v_buf, slots).transpose(0, 1).unsqueeze(0)
            oe = F.scaled_dot_product_attention(
                qe, ke, ve, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
            out[start:end] = oe[0].transpose(0, 1)
        return out


class Attention(nn.Module):
    """Per-layer attention front: delegates to the batch's backend with this layer's id and scale."""

    def __init__(self, layer_id: int, head_dim: int, backend: AttentionBackend):
        super().__init__()
        self.layer_id = layer_id
        self.scale = head_dim**-0.5
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.layer_id, self.scale, batch)

    def can_fuse_rope_store(self, rope: object) -> bool:
        """Whether ``rope_store_attend`` serves this step: a fused (CUDA) rope and a backend that reads
        the new tokens' K/V from the pool only (it then skips its own store)."""
        from plait.runtime.layers.rotary import FusedRope

        return isinstance(rope, FusedRope) and getattr(self.backend, "accepts_stored_kv", False)

    def rope_store_attend(
        self, rope: object, qkv_heads: torch.Tensor, num_q_heads: int, num_kv_heads: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """Rotary on q/k and the K/V pool write in one kernel, then attention: ``qkv_heads``
        [T, H + 2 KVH, D] -> [T, H, D]. Same result as ``apply`` + ``forward``, one launch fewer per layer."""
        from plait.runtime.kernels.fused_rotary import rotary_store_kv

        pool = batch.pool
        rotary_store_kv(
            qkv_heads, num_q_heads, num_kv_heads, rope.positions, rope.cos_cache, rope.sin_cache,
            pool.k_buffers[self.layer_id], pool.v_buffers[self.layer_id], batch.out_cache_loc,
        )
        q = qkv_heads[:, :num_q_heads]
        k = qkv_heads[:, num_q_heads : num_q_heads + num_kv_heads]
        v = qkv_heads[:, num_q_heads + num_kv_heads :]
        return self.backend.forward(q, k, v, self.layer_id, self.scale, batch, kv_stored=True)
