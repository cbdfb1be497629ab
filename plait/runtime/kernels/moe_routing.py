"""MoE routing in one kernel: router logits ``[T, E]`` -> top-k weights ``[T, K]`` (float32) and expert
ids ``[T, K]``, for both routings of ``MoEConfig``:

- ``"topk_then_softmax"`` (GPT-OSS): the k largest logits, softmax over those k;
- ``"softmax_then_topk"`` (Mixtral, Qwen3-MoE): softmax over all E in float32, the k largest
  probabilities, divided by their sum when ``norm_topk_prob``.

``round_to`` (a 16-bit dtype or None) rounds the weights to it and back, as the reference models use
them in the activation dtype. In torch this is five to seven small kernels per layer (top-k, softmax,
casts, a division); at decode they cost more GPU time than the router's GEMV (on an H200, ~18 us a
layer for GPT-OSS-120B at batch 1, 13% of the step). ``route_topk`` does it in one launch, one program
per token; ``route_topk_ref`` is the torch definition and the CPU path.

Ids: the k largest in descending order; equal values go to the lower expert id (torch.topk leaves ties
unspecified). The kernel returns int32 ids (what the alignment kernel reads), the reference int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUTINGS = ("softmax_then_topk", "topk_then_softmax")
MAX_EXPERTS = 1024  # one program holds a token's logits in registers


def route_topk_ref(logits: torch.Tensor, k: int, routing: str, norm_topk_prob: bool = False,
                   round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch definition: (weights [T, k] float32, ids [T, k] int64)."""
    if routing == "softmax_then_topk":
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, k, dim=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif routing == "topk_then_softmax":
        top_logits, ids = torch.topk(logits, k, dim=-1)
        weights = torch.softmax(top_logits.float(), dim=-1)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if round_to is not None:
        weights = weights.to(round_to).float()
    return weights, ids


@triton.jit
def _route_topk_kernel(
    logits_ptr, weights_ptr, ids_ptr, E, stride_t,
    K: tl.constexpr, BLOCK_E: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, NORMALIZE: tl.constexpr,
    ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    x = tl.load(logits_ptr + t * stride_t + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if SOFTMAX_FIRST:
        p = tl.exp(x - tl.max(x, axis=0))
        x = tl.where(valid, p / tl.sum(p, axis=0), float("-inf"))
    ks = tl.arange(0, K)
    chosen = tl.zeros([K], dtype=tl.float32)
    chosen_ids = tl.zeros([K], dtype=tl.int32)
    for i in tl.static_range(K):  # k rounds of argmax; a taken expert drops out
        best = tl.max(x, axis=0)
        best_id = tl.min(tl.where(x == best, offs, BLOCK_E), axis=0)  # ties: the lower id
        chosen = tl.where(ks == i, best, chosen)
        chosen_ids = tl.where(ks == i, best_id, chosen_ids)
        x = tl.where(offs == best_id, float("-inf"), x)
    if SOFTMAX_FIRST:
        w = chosen
        if NORMALIZE:
            w = w / tl.sum(w, axis=0)
    else:
        e = tl.exp(chosen - tl.max(chosen, axis=0))
        w = e / tl.sum(e, axis=0)
    if ROUND_BF16:  # round to nearest even from the bits (the interpreter's bf16 cast truncates)
        bits = w.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        w = bits.to(tl.float32, bitcast=True)
    if ROUND_FP16:
        w = w.to(tl.float16).to(tl.float32)
    tl.store(weights_ptr + t * K + ks, w)
    tl.store(ids_ptr + t * K + ks, chosen_ids)


def route_topk(logits: torch.Tensor, k: int, routing: str, norm_topk_prob: bool = False,
               round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: (weights [T, k] float32, ids [T, k] int32). ``k`` must be a power of two (GPT-OSS 4,
    Mixtral 2, Qwen3-MoE 8) and E at most ``MAX_EXPERTS``; otherwise, and for T = 0, the reference."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")
    if T == 0 or k & (k - 1) or E > MAX_EXPERTS:
        weights, ids = route_topk_ref(logits, k, routing, norm_topk_prob, round_to)
        return weights, ids.to(torch.int32)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int32, device=logits.device)
    _route_topk_kernel[(T,)](
        logits, weights, ids, E, logits.stride(0),
        K=k, BLOCK_E=triton.next_power_of_2(E), SOFTMAX_FIRST=routing == "softmax_then_topk",
        NORMALIZE=norm_topk_prob, ROUND_BF16=round_to == torch.bfloat16, ROUND_FP16=round_to == torch.float16,
        num_warps=1 if E <= 256 else 4,
    )
    return weights, ids
