"""Piecewise CUDA graphs for prefill and mixed steps: everything but attention replayed, per token count.

A step with prompt tokens (a prefill chunk, a mixed step of prefill and decode rows, jump-forward's
forced tokens) cannot replay a decode graph: its attention depends on how many rows extend by how
many tokens. Run eagerly it is launch-bound: on one H200, Llama-3.1-8B shapes, a 256-token prefill is
7 ms of device work behind 22-25 ms of host time, a few hundred kernel launches (benchmarks/RESULTS.md).

Everything else in the forward (embedding, norms, projections, rotary with the K/V store, MLP or MoE,
residuals) depends only on the number of tokens. So, as vLLM's piecewise graphs and SGLang's piecewise
CUDA graph do, the forward is captured per token bucket as a chain of graphs split at each layer's
attention call, and a step replays the pieces of the smallest bucket that holds it, running each
layer's attention eagerly between them with this step's metadata:

    piece 0 (embedding ... layer 0's q/k/v, rotary, K/V store) -> attention 0 ->
    piece 1 (o_proj 0 ... layer 1's q/k/v) -> attention 1 -> ... -> piece L (final norm)

How the split is made: during capture every ``Attention`` module's backend is swapped for
``_SplitPoint``, which copies the layer's queries (and keys and values, where the backend stores them
itself) into static buffers, ends the current graph, begins the next, and hands the layer a static
buffer for its attention output. At replay the real backend reads those static queries and its output
is copied into that buffer. All pieces of all buckets share one memory pool; they replay one bucket at
a time, in capture order, on one stream.

Padding tokens (a bucket larger than the step) embed token 0 at position 0 and write their K/V to the
padding slot 0, as the decode graphs' padding rows do; attention runs on the step's real tokens only,
and nothing reads the padding rows' outputs.

The logits (a gather of the rows that sample, then the LM head) run eagerly after the last piece.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.layers.attention import Attention

if TYPE_CHECKING:
    from plait.runtime.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def piecewise_token_ladder(max_tokens: int) -> list[int]:
    """Token buckets captured: 8 to 64 by 8, then four steps per doubling (80, 96, 112, 128, 160, ...),
    cut at ``max_tokens``, which is always the last (padding costs at most a quarter of a step beyond 64)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes = list(range(8, 65, 8))
    step = 16
    while sizes[-1] < max_tokens:
        sizes += [sizes[-1] + step * i for i in range(1, 5)]
        step *= 2
    return [s for s in sizes if s < max_tokens] + [max_tokens]


@dataclass(frozen=True)
class _AttentionCall:
    """One layer's attention call as the model made it during capture (what to replay eagerly)."""

    layer_id: int
    scale: float
    kv_stored: bool
    sliding_window: int | None
    sinks: torch.Tensor | None


class _SplitPoint:
    """Stands in for the attention backend while a bucket is captured: ends the running graph at each
    attention call, records the call, and begins the next graph (see the module docstring)."""

    def __init__(self, runner: "PiecewiseCudaGraphRunner", backend: object):
        self.runner = runner
        self.accepts_stored_kv = getattr(backend, "accepts_stored_kv", False)  # keeps the fused rope+store path

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scale: float, batch: ForwardBatch,
        kv_stored: bool = False, *, sliding_window: int | None = None, sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.runner._split(q, k, v, _AttentionCall(layer_id, scale, kv_stored, sliding_window, sinks))


class PiecewiseCudaGraphRunner:
    """Captures the forward of every token bucket up to ``max_tokens`` as pieces split at attention, and
    replays them for steps that are not decode-only batches of the decode graphs.

    Args:
        runner: the model runner (model, attention backend, KV pool, request-to-slot table).
        max_tokens: the largest step replayed; larger steps run eagerly.
        pool: a CUDA graph memory pool to share (the decode graphs'), or None for a new one.
    """

    def __init__(self, runner: "ModelRunner", max_tokens: int, pool=None):
        self.runner = runner
        self.token_buckets = piecewise_token_ladder(max_tokens)
        self.max_tokens = max_tokens
        cfg, device, dtype = runner.local_config, runner.device, runner.dtype
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.sliding_out_cache_loc = (torch.zeros(max_tokens, dtype=torch.int64, device=device)
                                      if runner.pool.hybrid else None)
        # what crosses a split: the layer's q (and k, v where the backend stores them), its attention
        # output, and the last piece's hidden states; one set for all layers and buckets
        self.q = torch.zeros(max_tokens, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(max_tokens, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.attn_out = torch.zeros_like(self.q)
        self.hidden = torch.zeros(max_tokens, cfg.hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.calls: dict[int, list[_AttentionCall]] = {}
        self.mempool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self._capturing: tuple[list[torch.cuda.CUDAGraph], list[_AttentionCall]] | None = None  # (graphs, calls)

    def can_run(self, batch: ForwardBatch) -> bool:
        return 0 < batch.num_tokens <= self.max_tokens

    def _static_batch(self, n: int) -> ForwardBatch:
        """A batch of ``n`` tokens on the static buffers: one prompt on the reserved padding row writing
        slot 0 (what the capture's warm-up runs; the capture itself runs no attention)."""
        runner = self.runner
        return ForwardBatch(
            input_ids=self.input_ids[:n], positions=self.positions[:n], out_cache_loc=self.out_cache_loc[:n],
            req_rows=torch.full((1,), runner.pad_row, dtype=torch.int64, device=runner.device),
            prefix_lens=[0], extend_lens=[n], seq_lens=[n], extend_starts=[0],
            logits_indices=torch.zeros(1, dtype=torch.int64, device=runner.device),
            pool=runner.pool, slot_table=runner.slot_table.table, sliding_slot_table=runner.slot_table.sliding_table,
            sliding_out_cache_loc=None if self.sliding_out_cache_loc is None else self.sliding_out_cache_loc[:n],
        )

    def _attention_modules(self) -> list[Attention]:
        return [m for m in self.runner.model.modules() if isinstance(m, Attention)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first; each is run eagerly twice first (Triton compiles and
        autotunes outside the graphs)."""
        start = time.perf_counter()
        runner, model = self.runner, self.runner.model
        modules = self._attention_modules()
        backend = runner.attn_backend
        split = _SplitPoint(self, backend)
        stream = torch.cuda.Stream(runner.device)
        for n in sorted(self.token_buckets, reverse=True):
            batch = self._static_batch(n)
            backend.prepare(batch)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    model(batch)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize(runner.device)
            graphs: list[torch.cuda.CUDAGraph] = []
            calls: list[_AttentionCall] = []
            for module in modules:
                module.backend = split
            try:
                with torch.cuda.stream(stream):
                    self._capturing = (graphs, calls)
                    self._begin_piece()
                    hidden = model(batch)
                    self.hidden[:n].copy_(hidden)
                    graphs[-1].capture_end()
            finally:
                self._capturing = None
                for module in modules:
                    module.backend = backend
            self.graphs[n], self.calls[n] = graphs, calls
        torch.cuda.synchronize(runner.device)
        logger.info("captured piecewise CUDA graphs for %d token counts up to %d (%d pieces each) in %.1f s",
                    len(self.graphs), self.max_tokens, len(self.calls[self.max_tokens]) + 1,
                    time.perf_counter() - start)

    def _begin_piece(self) -> None:
        """Open the next piece's graph (on the current stream: the capture's) in the shared pool."""
        assert self._capturing is not None
        graphs, _ = self._capturing
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.mempool)
        graphs.append(graph)

    def _split(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: _AttentionCall) -> torch.Tensor:
        """At a layer's attention during capture: park q (k, v) in the static buffers, close this piece,
        open the next, and return the static attention output that the next piece reads."""
        assert self._capturing is not None, "the split point is only installed while capturing"
        graphs, calls = self._capturing
        n = q.shape[0]
        self.q[:n].copy_(q)
        if not call.kv_stored:
            self.k[:n].copy_(k)
            self.v[:n].copy_(v)
        graphs[-1].capture_end()
        calls.append(call)
        self._begin_piece()
        return self.attn_out[:n]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The step's hidden states [num_tokens, hidden] (a view of a static buffer, valid until the next
        replay). ``batch.attn_metadata`` must be prepared (``attn_backend.prepare(batch)``)."""
        n = batch.num_tokens
        bucket = self.token_buckets[bisect.bisect_left(self.token_buckets, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_cache_loc[:n].copy_(batch.out_cache_loc)
        if bucket > n:  # padding tokens write their K/V to slot 0, never to a slot an earlier step left here
            self.out_cache_loc[n:bucket].zero_()
        if self.sliding_out_cache_loc is not None:
            assert batch.sliding_out_cache_loc is not None
            self.sliding_out_cache_loc[:n].copy_(batch.sliding_out_cache_loc)
            if bucket > n:
                self.sliding_out_cache_loc[n:bucket].zero_()
        backend = self.runner.attn_backend
        graphs, calls = self.graphs[bucket], self.calls[bucket]
        q, k, v, out = self.q[:n], self.k[:n], self.v[:n], self.attn_out[:n]
        for graph, call in zip(graphs, calls):
            graph.replay()
            out.copy_(backend.forward(q, k, v, call.layer_id, call.scale, batch, call.kv_stored,
                                      sliding_window=call.sliding_window, sinks=call.sinks))
        graphs[-1].replay()
        return self.hidden[:n]
