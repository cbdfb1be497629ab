"""Fused mixture-of-experts MLP: ``fused_moe`` (Triton, CUDA) and ``fused_moe_ref`` (torch: the CPU path
and the reference).

For each token t and each of its top-k choices (expert e = ``topk_ids[t, k]``, weight
``topk_weights[t, k]``)::

    h   = w13[e] @ x[t] + b13[e]                 # [2I], float32 accumulation, bias in float32
    a   = act(h)                                 # [I], float32, then rounded to x's dtype
    y_k = topk_weights[t, k] * (w2[e] @ a + b2[e])   # [H], float32, rounded to x's dtype
    out[t] = sum_k y_k                           # float32 sum of the rounded y_k, rounded once

``act``:

- ``"silu"`` (Llama/Qwen/Mixtral): gate = h[:I], up = h[I:] (concatenated); ``silu(gate) * up``.
- ``"swiglu_oai"`` (GPT-OSS, transformers' ``GptOssExperts._apply_gate``): gate = h[0::2], up = h[1::2]
  (interleaved); gate = min(gate, limit), up = clamp(up, -limit, limit);
  ``(up + 1) * gate * sigmoid(alpha * gate)``. The bias is added before the activation, as there.

Rounding: transformers rounds every op to the model dtype (bf16 matmul outputs, bias add, each
activation op, each sum); here everything up to ``a`` and up to ``y_k`` is float32, and rounding
happens at the two places a fused kernel must store (the intermediate, which is the down GEMM's
input, and each choice's output) and once at the end.

Weights: ``w13`` ``[E, 2I, H]`` and ``w2`` ``[E, H, I]`` as tensors (any float dtype; cast to x's dtype
for the products) or ``Mxfp4Weight`` (decoded to x's dtype, exactly the dequantized values). E, I and
H are whatever the caller holds: a local expert range or an N-slice of I works the same way.
``topk_ids`` outside ``[0, E)`` (experts held elsewhere) contribute nothing.

This module imports no Triton: ``fused_moe`` loads the kernels on first call.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from plait.runtime.kernels.mxfp4 import Mxfp4Weight


def sm90_bf16_decode(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels decode MXFP4 codes with their sm_90 PTX (``mul.bf16x2``): bf16
    activations, compiled (not under ``TRITON_INTERPRET``) on a CUDA device of compute capability 9.0 or
    later; the interpreter and older cards decode in float32. Fragment-packed codes are read only so."""
    return (dtype == torch.bfloat16 and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device) >= (9, 0))

ACTIVATIONS = ("silu", "swiglu_oai")
Weight = torch.Tensor | Mxfp4Weight


def weight_shape(w: Weight) -> tuple[int, int, int]:
    """(E, N, K) of a dense or MXFP4 expert weight."""
    E, N, K = w.shape
    return (E, N, K)


def check_moe_inputs(
    x: torch.Tensor, w13: Weight, w2: Weight, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    b13: torch.Tensor | None, b2: torch.Tensor | None, activation: str,
) -> tuple[int, int, int]:
    """Validate shapes; returns (E, I, H). Raises ValueError with the offending shapes."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    E, two_i, H = weight_shape(w13)
    if two_i % 2 != 0:
        raise ValueError(f"w13's N must be 2 * I, got {two_i}")
    I = two_i // 2
    if x.shape[1] != H:
        raise ValueError(f"x has H={x.shape[1]} but w13 is {(E, two_i, H)}")
    if weight_shape(w2) != (E, H, I):
        raise ValueError(f"w2 must be [E, H, I] = {(E, H, I)}, got {weight_shape(w2)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must be [T, K] with T={x.shape[0]}, got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if b13 is not None and tuple(b13.shape) != (E, two_i):
        raise ValueError(f"b13 must be [E, 2I] = {(E, two_i)}, got {tuple(b13.shape)}")
    if b2 is not None and tuple(b2.shape) != (E, H):
        raise ValueError(f"b2 must be [E, H] = {(E, H)}, got {tuple(b2.shape)}")
    return E, I, H


def apply_activation(h: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """``h [M, 2I]`` float32 -> ``[M, I]`` float32 (see the module docstring for the two layouts)."""
    if activation == "silu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    gate, up = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _expert_weight(w: Weight, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's weight [N, K] as the kernel multiplies it: in ``dtype``, then float32."""
    if isinstance(w, Mxfp4Weight):
        return w.expert(e).dequantize(dtype)[0].float()
    return w[e].to(dtype).float()


def fused_moe_ref(
    x: torch.Tensor, w13: Weight, w2: Weight, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
    b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, activation: str = "silu",
    swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """The MoE MLP in plain torch, one expert at a time (each touched expert's weights are made dense
    once). ``x [T, H]`` -> ``[T, H]`` in x's dtype. Reads the routed expert ids back to the host."""
    E, I, H = check_moe_inputs(x, w13, w2, topk_weights, topk_ids, b13, b2, activation)
    T, K = topk_ids.shape
    dtype = x.dtype
    y = torch.zeros(T * K, H, dtype=dtype, device=x.device)  # each (token, choice)'s weighted output
    flat_ids = topk_ids.reshape(-1)  # [T*K], pair p = t*K + k
    flat_weights = topk_weights.reshape(-1).float()
    for e in torch.unique(flat_ids).tolist():
        if not 0 <= e < E:
            continue  # an expert held elsewhere
        pairs = (flat_ids == e).nonzero().squeeze(1)  # [M]
        xe = x[pairs // K].float()  # [M, H]
        h = xe @ _expert_weight(w13, e, dtype).t()  # [M, 2I]
        if b13 is not None:
            h = h + b13[e].float()
        a = apply_activation(h, activation, swiglu_alpha, swiglu_limit).to(dtype).float()  # [M, I]
        o = a @ _expert_weight(w2, e, dtype).t()  # [M, H]
        if b2 is not None:
            o = o + b2[e].float()
        y[pairs] = (o * flat_weights[pairs, None]).to(dtype)
    return y.view(T, K, H).float().sum(dim=1).to(dtype)


def fused_moe(
    x: torch.Tensor, w13: Weight, w2: Weight, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
    b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, activation: str = "silu",
    swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, config=None,
) -> torch.Tensor:
    """The MoE MLP with the Triton kernels: ``x [T, H]`` -> ``[T, H]`` in x's dtype.

    ``config``: a ``fused_moe_config.FusedMoeConfig`` (tile sizes), or None for the table's choice
    for this shape. No host reads, no host-dependent shapes beyond T and K: CUDA-graph capturable.
    """
    from plait.runtime.kernels import fused_moe_triton  # imports triton

    check_moe_inputs(x, w13, w2, topk_weights, topk_ids, b13, b2, activation)
    return fused_moe_triton.fused_moe_triton(
        x, w13, w2, topk_weights, topk_ids, b13=b13, b2=b2, activation=activation,
        swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, config=config,
    )
