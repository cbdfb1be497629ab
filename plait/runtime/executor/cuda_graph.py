"""CUDA graphs for decode: one graph per batch size of a ladder, padded batches replayed.

A decode-only step reads and writes fixed addresses: the static input buffers here, and the
attention backend's persistent metadata buffers (``TritonAttentionBackend`` refills them in place in
``prepare``). So the forward is captured once per batch size and replayed with one launch, which
removes the per-kernel CPU launch cost that dominates small-batch decode.

Padding rows decode token 0 at position 0 into the padding slot 0, reading one key through the
reserved padding row of the request-to-slot table (all zeros), so they touch no real request's KV.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from plait.runtime.executor.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from plait.runtime.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def default_batch_ladder(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 128, of 32 beyond (like SGLang's capture list)."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, 129, 16)) + list(range(160, 1025, 32))
    return [s for s in sizes if s < max_bs] + [max_bs]


class CudaGraphRunner:
    """Captures ``model -> logits`` for decode batches and replays the smallest graph that fits."""

    def __init__(self, runner: "ModelRunner", max_batch_size: int):
        self.runner = runner
        self.batch_sizes = default_batch_ladder(max_batch_size)
        self.max_batch_size = max_batch_size
        device = runner.device
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        # a hybrid KV pool: the new tokens' sliding slots (sliding-window layers), filled like out_cache_loc
        self.sliding_out_cache_loc = (torch.zeros(max_batch_size, dtype=torch.int64, device=device)
                                      if runner.pool.hybrid else None)
        self.req_rows = torch.full((max_batch_size,), runner.pad_row, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(max_batch_size, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.mempool = None

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode_only and batch.batch_size <= self.max_batch_size

    def _static_batch(self, bs: int, seq_lens: list[int]) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_rows=self.req_rows[:bs],
            prefix_lens=[n - 1 for n in seq_lens],
            extend_lens=[1] * bs,
            seq_lens=seq_lens,
            extend_starts=list(range(bs)),
            logits_indices=self.logits_indices[:bs],
            pool=self.runner.pool,
            slot_table=self.runner.slot_table.table,
            sliding_slot_table=self.runner.slot_table.sliding_table,
            sliding_out_cache_loc=None if self.sliding_out_cache_loc is None else self.sliding_out_cache_loc[:bs],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size of the ladder, largest first (smaller ones reuse its memory pool)."""
        start = time.perf_counter()
        model, backend = self.runner.model, self.runner.attn_backend
        stream = torch.cuda.Stream(self.runner.device)
        for bs in sorted(self.batch_sizes, reverse=True):
            batch = self._static_batch(bs, [1] * bs)
            backend.prepare(batch)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (Triton autotuning, allocator) outside the graph
                    model.compute_logits(model(batch))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool, stream=stream):
                logits = model.compute_logits(model(batch))
            if self.mempool is None:
                self.mempool = graph.pool()
            self.graphs[bs], self.outputs[bs] = graph, logits
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured %d decode CUDA graphs in %.1f s", len(self.graphs), time.perf_counter() - start)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay for a decode-only batch; returns logits [batch_size, vocab]."""
        n = batch.batch_size
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_cache_loc[:n].copy_(batch.out_cache_loc)
        if self.sliding_out_cache_loc is not None:
            assert batch.sliding_out_cache_loc is not None
            self.sliding_out_cache_loc[:n].copy_(batch.sliding_out_cache_loc)
        self.req_rows[:n].copy_(batch.req_rows)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.out_cache_loc[n:bs].zero_()
            if self.sliding_out_cache_loc is not None:
                self.sliding_out_cache_loc[n:bs].zero_()
            self.req_rows[n:bs].fill_(self.runner.pad_row)
        static = self._static_batch(bs, list(batch.seq_lens) + [1] * (bs - n))
        self.runner.attn_backend.prepare(static)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
