"""Triton attention backend (GPU path), behind the same contract as ``TorchAttentionBackend``.

``prepare(batch)`` runs once per step and turns the batch's host lists into device metadata with one
host-to-device copy; ``forward`` then, per layer:

1. writes the new tokens' K/V into the pool (``kernels.kv_store.store_kv``);
2. decode rows (one new token): flash-decoding over the pool (``kernels.decode_attention``);
3. extend rows (several new tokens, or a prefill): ``kernels.extend_attention``, which writes its rows
   of the output in place.

A layer's sliding window (a Python int) and sinks (a parameter: a fixed address) are kernel arguments,
so layers with and without them share the per-step metadata.

Decode metadata lives in buffers allocated once (``max_batch_size`` rows) and refilled in place by
``prepare``, and the flash-decoding workspace is allocated once too, so a decode-only forward reads
and writes the same addresses every step of the same batch size: it can be captured in a CUDA graph
and replayed after ``prepare`` of a later batch of that size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.runtime.executor.forward_batch import ForwardBatch, host_to_device
from plait.runtime.kernels.decode_attention import (
    DEFAULT_MAX_KV_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    alloc_decode_workspace,
    decode_attention,
    num_kv_splits_cap,
)
from plait.runtime.kernels.extend_attention import extend_attention
from plait.runtime.kernels.kv_store import store_kv


@dataclass
class TritonAttnMetadata:
    """Per-step metadata shared by all layers (device tensors, plus host ints for grid sizes)."""

    # decode rows; None fields when the batch has none
    decode_token_idx: torch.Tensor | None  # [Bd] flat token indices; None when every row is a decode row
    decode_req_rows: torch.Tensor | None  # [Bd] table rows
    decode_seq_lens: torch.Tensor | None  # [Bd] int32
    decode_num_splits: torch.Tensor | None  # [Bd] int32
    decode_max_splits: int  # the stage-1 grid's splits (a function of Bd only: CUDA graphs keep it); 1: one pass
    # extend rows; None fields when the batch has none
    extend_req_rows: torch.Tensor | None  # [Be] table rows
    extend_starts: torch.Tensor | None  # [Be] int32 flat offset of each row's first new token
    extend_prefix_lens: torch.Tensor | None  # [Be] int32
    extend_lens: torch.Tensor | None  # [Be] int32
    max_extend_len: int


class TritonAttentionBackend:
    """Triton kernels for decode and extend attention over the token-slot pool.

    Args:
        num_heads: query heads per layer (sizes the decode workspace).
        head_dim: head size.
        max_batch_size: decode rows the persistent buffers hold; larger batches get temporary ones.
        max_kv_splits: most flash-decoding splits per request.
        device: where the buffers live.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        max_batch_size: int = 256,
        max_kv_splits: int = DEFAULT_MAX_KV_SPLITS,
        device: str | torch.device = "cuda",
    ) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_batch_size = max_batch_size
        self.max_kv_splits = max_kv_splits
        self.device = torch.device(device)
        self._workspace = alloc_decode_workspace(max_batch_size, num_heads, head_dim, max_kv_splits, self.device)
        # rows: 0 req_rows, 1 seq_lens, 2 num_splits (int64 so that table rows need no cast)
        self._decode_meta = torch.zeros((3, max_batch_size), dtype=torch.int64, device=self.device)
        self._decode_meta32 = torch.zeros((2, max_batch_size), dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------ prepare

    def prepare(self, batch: ForwardBatch) -> None:
        """Build ``batch.attn_metadata`` (one host-to-device copy; no device-to-host sync)."""
        ext_lens = batch.extend_lens
        decode_rows = [i for i, n in enumerate(ext_lens) if n == 1]
        extend_rows = [i for i, n in enumerate(ext_lens) if n != 1]
        num_kv_heads = batch.pool.num_kv_heads
        Bd, Be = len(decode_rows), len(extend_rows)
        cap = num_kv_splits_cap(Bd, num_kv_heads, self.max_kv_splits, self.device)
        host = torch.tensor(
            [
                decode_rows,  # batch row of each decode row
                [batch.seq_lens[i] for i in decode_rows],
                [min(cap, max(1, -(-batch.seq_lens[i] // MIN_TOKENS_PER_SPLIT))) for i in decode_rows],
                [batch.extend_starts[i] for i in decode_rows],
            ],
            dtype=torch.int64,
        ).reshape(4, Bd)  # [4, Bd]
        host_ext = torch.tensor(
            [
                extend_rows,
                [batch.extend_starts[i] for i in extend_rows],
                [batch.prefix_lens[i] for i in extend_rows],
                [ext_lens[i] for i in extend_rows],
            ],
            dtype=torch.int64,
        ).reshape(4, Be)  # [4, Be]
        dev = host_to_device(torch.cat((host, host_ext), dim=1), self.device)  # [4, Bd + Be]
        dec, ext = dev[:, :Bd], dev[:, Bd:]
        md = TritonAttnMetadata(None, None, None, None, 0, None, None, None, None, 0)
        if Bd:
            rows = batch.req_rows if Bd == batch.batch_size else batch.req_rows.index_select(0, dec[0])
            if Bd <= self.max_batch_size:
                meta, meta32 = self._decode_meta[:, :Bd], self._decode_meta32[:, :Bd]
            else:
                meta = torch.empty((3, Bd), dtype=torch.int64, device=self.device)
                meta32 = torch.empty((2, Bd), dtype=torch.int32, device=self.device)
            meta[0].copy_(rows)
            meta32.copy_(dec[1:3])
            md.decode_req_rows, md.decode_seq_lens, md.decode_num_splits = meta[0], meta32[0], meta32[1]
            md.decode_max_splits = cap
            if Bd < batch.batch_size:
                md.decode_token_idx = dec[3]
        if Be:
            ext32 = ext[1:].to(torch.int32)  # [3, Be]
            md.extend_req_rows = batch.req_rows.index_select(0, ext[0])
            md.extend_starts, md.extend_prefix_lens, md.extend_lens = ext32[0], ext32[1], ext32[2]
            md.max_extend_len = max(ext_lens[i] for i in extend_rows)
        batch.attn_metadata = md

    # ------------------------------------------------------------------ forward

    def _decode_workspace(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows <= self.max_batch_size:
            return self._workspace
        return alloc_decode_workspace(rows, self.num_heads, self.head_dim, self.max_kv_splits, self.device)

    # Attention reads the new tokens' K/V from the pool only, so a caller may write them there itself
    # (``Attention.rope_store_attend``) and pass ``kv_stored=True``.
    accepts_stored_kv = True

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scale: float, batch: ForwardBatch,
        kv_stored: bool = False, *, sliding_window: int | None = None, sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> attention output [T, H, D] (new K/V written to the pool first,
        unless ``kv_stored``). ``sliding_window``: a token sees only the ``W`` keys up to its own;
        ``sinks``: [H] per-head sink logits (see ``layers.attention``)."""
        md: TritonAttnMetadata = batch.attn_metadata
        k_buf, v_buf = batch.pool.k_buffers[layer_id], batch.pool.v_buffers[layer_id]
        table, out_loc = batch.kv_slots(sliding_window)
        if not kv_stored:
            store_kv(k_buf, v_buf, out_loc, k, v)
        options = dict(sliding_window=sliding_window, sinks=sinks)
        if md.extend_req_rows is None:  # decode only: one token per row, in row order
            return self._decode(q, k_buf, v_buf, table, scale, md, **options)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if md.decode_req_rows is not None:
            assert md.decode_token_idx is not None
            qd = q.index_select(0, md.decode_token_idx)  # [Bd, H, D]
            out.index_copy_(0, md.decode_token_idx, self._decode(qd, k_buf, v_buf, table, scale, md, **options))
        extend_attention(
            q, k_buf, v_buf, table, md.extend_req_rows, md.extend_starts, md.extend_prefix_lens, md.extend_lens,
            scale, md.max_extend_len, out=out, **options,
        )
        return out

    def _decode(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, table: torch.Tensor, scale: float,
        md: TritonAttnMetadata, *, sliding_window: int | None, sinks: torch.Tensor | None,
    ) -> torch.Tensor:
        return decode_attention(
            q, k_buf, v_buf, table, md.decode_req_rows, md.decode_seq_lens, scale,
            num_kv_splits=md.decode_num_splits, max_kv_splits=md.decode_max_splits,
            workspace=self._decode_workspace(q.shape[0]), sliding_window=sliding_window, sinks=sinks,
        )


__all__ = ["TritonAttentionBackend", "TritonAttnMetadata"]
