"""Byte and FLOP counts of the served model: what one decode step must read, what prefill must compute.

Dense models read every weight each step. A mixture-of-experts model reads its dense weights (attention,
norms, routers, the LM head) every step, but of each MoE layer only the experts the batch's tokens are
routed to. Under uniform routing (what random router weights give: dummy weights route near-uniformly)
a batch of B tokens with top-k of E experts touches on average ``E * (1 - (1 - k/E)^B)`` distinct experts
per layer: k at batch 1, all E at large batches. Real routing is skewed, so real batches touch fewer
experts and have a lower floor than this one.

KV reads: full-attention layers read the whole context; a sliding-window layer reads at most its window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.runtime.models.config import MXFP4_BYTES_PER_PARAM


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Mean number of distinct experts ``tokens`` tokens touch when each picks ``top_k`` of ``num_experts``
    uniformly at random (without replacement per token): ``E * (1 - (1 - k/E)^tokens)``."""
    if num_experts == 0 or tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass(frozen=True)
class ModelFacts:
    """Byte and FLOP counts of the served model, from its ModelConfig and the engine's dtype.

    ``weight_bytes`` is what a batch-1 step reads (dense weights + ``top_k`` experts per MoE layer);
    ``step_weight_bytes(batch)`` what a batch reads. For a dense model the two are equal.
    """

    dense_weight_bytes: int  # read every step: all non-expert weights but the input embedding (unless tied)
    expert_bytes: int  # one expert of one MoE layer (weights, scales, biases)
    moe_layers: int
    num_experts: int
    top_k: int
    kv_bytes_per_token_layer: int  # K and V of one token in one layer
    layer_windows: tuple[int | None, ...]  # per layer: sliding window, or None for full attention
    gemm_params: int  # weights multiplied per token in the layers (no embedding, no head; active experts only)
    head_params: int
    layer_attn_width: int  # q_size: causal attention costs 4 * q_size FLOPs per (query, key) pair per layer
    max_running: int

    @classmethod
    def from_engine(cls, engine) -> "ModelFacts":
        cfg = engine.model_config
        elt = torch.empty(0, dtype=engine.runner.dtype).element_size()
        kv_elt = torch.empty(0, dtype=engine.runner.kv_dtype()).element_size()  # 1 for an FP8 KV cache
        emb = cfg.vocab_size * cfg.hidden_size
        moe = cfg.moe
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        total_bytes = cfg.weight_bytes(elt)
        expert_bytes = num_experts = top_k = 0
        if moe is not None and moe_layers:
            num_experts, top_k = moe.num_experts, moe.top_k
            per_expert_params = moe.expert_parameters(cfg.hidden_size) // num_experts
            per_param = MXFP4_BYTES_PER_PARAM if cfg.quantization == "mxfp4" else elt
            expert_bytes = int(per_expert_params * per_param)
            if moe.expert_bias:
                expert_bytes += (2 * moe.intermediate_size + cfg.hidden_size) * elt
        all_expert_bytes = moe_layers * num_experts * expert_bytes
        dense = total_bytes - all_expert_bytes - (0 if cfg.tie_word_embeddings else emb * elt)
        active = cfg.num_active_parameters()
        windows = tuple(cfg.layer_sliding_window(i) for i in range(cfg.num_layers))
        return cls(
            dense_weight_bytes=int(dense),
            expert_bytes=expert_bytes,
            moe_layers=moe_layers,
            num_experts=num_experts,
            top_k=top_k,
            kv_bytes_per_token_layer=2 * cfg.num_kv_heads * cfg.head_dim * kv_elt,
            layer_windows=windows,
            gemm_params=active - emb * (1 if cfg.tie_word_embeddings else 2),
            head_params=emb,
            layer_attn_width=cfg.q_size,
            max_running=engine.config.max_running_requests,
        )

    # ------------------------------------------------------------------ bytes

    @property
    def is_moe(self) -> bool:
        return self.moe_layers > 0

    def step_weight_bytes(self, batch: int) -> float:
        """Weight bytes one decode step of ``batch`` tokens reads (uniform routing for MoE layers)."""
        experts = expected_distinct_experts(self.num_experts, self.top_k, batch)
        return self.dense_weight_bytes + self.moe_layers * experts * self.expert_bytes

    @property
    def weight_bytes(self) -> int:
        """Weight bytes of a batch-1 decode step."""
        return int(self.step_weight_bytes(1))

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (what the KV cache stores per token)."""
        return self.kv_bytes_per_token_layer * len(self.layer_windows)

    def kv_read_tokens(self, context: float) -> float:
        """Token-layers of KV one query at ``context`` reads, summed over layers (windows cap it)."""
        return sum(context if w is None else min(context, w) for w in self.layer_windows)

    # ------------------------------------------------------------------ floors

    def attention_flops(self, new_tokens: int, cached: int = 0) -> float:
        """Causal attention FLOPs of extending ``cached`` tokens by ``new_tokens`` (windows respected)."""
        total = 0.0
        for window in self.layer_windows:
            if window is None:
                pairs = new_tokens * (cached + (new_tokens + 1) / 2)
            else:  # query i (1-based) sees min(cached + i, window) keys
                below = max(0, min(new_tokens, window - cached))  # queries not yet capped by the window
                pairs = below * cached + below * (below + 1) / 2 + (new_tokens - below) * window
            total += 4 * self.layer_attn_width * pairs
        return total

    def prefill_flops(self, new_tokens: int, cached: int = 0) -> float:
        """FLOPs to extend a sequence of ``cached`` tokens by ``new_tokens`` (head on the last token only)."""
        return 2 * self.gemm_params * new_tokens + self.attention_flops(new_tokens, cached) + 2 * self.head_params

    def decode_step(self, machine, batch: int, avg_context: float) -> tuple[float, str]:
        """(seconds, "memory" | "compute"): the floor of one decode step of ``batch`` sequences."""
        kv = batch * self.kv_read_tokens(avg_context) * self.kv_bytes_per_token_layer
        memory = (self.step_weight_bytes(batch) + kv) / machine.bandwidth
        attention = 4 * self.layer_attn_width * self.kv_read_tokens(avg_context)
        flops = batch * (2 * (self.gemm_params + self.head_params) + attention)
        compute = flops / machine.matmul_rate
        return (memory, "memory") if memory >= compute else (compute, "compute")

    def workload_floor(self, machine, prefill_flops: float, requests: int, prompt_len: int,
                       output_len: int) -> float:
        """Seconds: all prefill at the matmul rate, then (output_len - 1) decode steps per wave of requests."""
        seconds = prefill_flops / machine.matmul_rate
        for start in range(0, requests, self.max_running):
            batch = min(self.max_running, requests - start)
            seconds += (output_len - 1) * self.decode_step(machine, batch, prompt_len + output_len / 2)[0]
        return seconds
