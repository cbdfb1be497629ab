"""Fused MoE: the torch reference against a per-token loop; the Triton kernels against the reference.

Tolerances. The reference and the kernels round at the same places (the intermediate and each
choice's output to x's dtype, the final sum once); they differ only in float32 summation order inside
the two GEMMs. In float32 that is ~1e-6 relative; in bf16 an intermediate element that lands near a
rounding boundary can round the other way (one bf16 ulp, 2^-8 relative) and carry into the down GEMM,
so outputs agree to ~1e-2 relative (norm-wise) and every element within a few bf16 ulps of the
output's scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from plait.runtime.kernels.fused_moe import fused_moe_ref
from plait.runtime.kernels.mxfp4 import Mxfp4Weight, dequantize_mxfp4, quantize_mxfp4

REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def make_problem(T: int, E: int, H: int, I: int, K: int, *, dtype: torch.dtype, mxfp4: bool, bias: bool,
                 seed: int = 0, ids: torch.Tensor | None = None, device: str = "cpu"):
    """Random inputs: x [T, H], w13 [E, 2I, H], w2 [E, H, I] (dense or MXFP4), routing [T, K]."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)
    w2 = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    if mxfp4:
        w13, w2 = quantize_mxfp4(w13).to(device), quantize_mxfp4(w2).to(device)
    else:
        w13, w2 = w13.to(dtype).to(device), w2.to(dtype).to(device)
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])  # distinct per token
    weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    b13 = (torch.randn(E, 2 * I, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    b2 = (torch.randn(E, H, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    return x, w13, w2, weights.to(device), ids.to(torch.int32).to(device), b13, b2


def naive_moe(x, w13, w2, topk_weights, topk_ids, b13, b2, activation, alpha=1.702, limit=7.0):
    """One token and one choice at a time, float64 math, rounding where the kernels round."""
    dense13 = w13.dequantize(x.dtype) if isinstance(w13, Mxfp4Weight) else w13.to(x.dtype)
    dense2 = w2.dequantize(x.dtype) if isinstance(w2, Mxfp4Weight) else w2.to(x.dtype)
    E, two_i, H = dense13.shape
    I = two_i // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if not 0 <= e < E:
                continue
            h = torch.mv(dense13[e].double(), x[t].double())
            if b13 is not None:
                h += b13[e].double()
            if activation == "silu":
                gate, up = h[:I], h[I:]
                a = gate / (1 + torch.exp(-gate)) * up
            else:
                gate, up = torch.minimum(h[0::2], torch.tensor(limit)), torch.clamp(h[1::2], -limit, limit)
                a = (up + 1) * gate / (1 + torch.exp(-alpha * gate))
            o = torch.mv(dense2[e].double(), a.to(x.dtype).double())
            if b2 is not None:
                o += b2[e].double()
            out[t] += (o * float(topk_weights[t, k])).to(x.dtype).double()
    return out.to(x.dtype)


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("dtype,mxfp4", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_matches_per_token_loop(activation, dtype, mxfp4, bias):
    x, w13, w2, tw, ids, b13, b2 = make_problem(9, 6, 64, 32, 2, dtype=dtype, mxfp4=mxfp4, bias=bias)
    ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation)
    naive = naive_moe(x, w13, w2, tw, ids, b13, b2, activation)
    assert ref.shape == x.shape and ref.dtype == dtype
    assert rel_err(ref, naive) < REL_TOL[dtype]


def test_reference_swiglu_is_transformers_gpt_oss_experts():
    """fp32: the reference equals transformers' GptOssExperts on the same (transposed) weights."""
    modeling = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    E, H, I, K, T = 4, 64, 32, 2, 7
    x, w13, w2, tw, ids, b13, b2 = make_problem(T, E, H, I, K, dtype=torch.float32, mxfp4=False, bias=True)
    cfg = GptOssConfig(num_local_experts=E, hidden_size=H, intermediate_size=I, num_experts_per_tok=K)
    experts = modeling.GptOssExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13.transpose(1, 2))  # transformers holds [E, H, 2I] for x @ W
        experts.gate_up_proj_bias.copy_(b13)
        experts.down_proj.copy_(w2.transpose(1, 2))
        experts.down_proj_bias.copy_(b2)
        theirs = experts(x, ids.long(), tw)
    ours = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai",
                         swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit)
    assert rel_err(ours, theirs) < 1e-5


def test_reference_skips_experts_held_elsewhere():
    """Ids outside [0, E) contribute nothing (expert parallelism hands each rank a local range)."""
    x, w13, w2, tw, ids, b13, b2 = make_problem(5, 4, 64, 32, 2, dtype=torch.float32, mxfp4=False, bias=True)
    ids[:, 1] = -1
    ids[0, 0] = 4
    ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2)
    assert torch.equal(ref[0], torch.zeros(64))
    only_first = fused_moe_ref(x[1:], w13, w2, tw[1:, :1], ids[1:, :1], b13=b13, b2=b2)
    assert torch.allclose(ref[1:], only_first, rtol=1e-6, atol=1e-7)


def test_reference_mxfp4_equals_dequantized_dense():
    x, w13, w2, tw, ids, b13, b2 = make_problem(6, 4, 64, 64, 2, dtype=torch.bfloat16, mxfp4=True, bias=True)
    dense13 = dequantize_mxfp4(w13.blocks, w13.scales, torch.bfloat16)
    dense2 = dequantize_mxfp4(w2.blocks, w2.scales, torch.bfloat16)
    a = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
    b = fused_moe_ref(x, dense13, dense2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
    assert torch.equal(a, b)


def test_inputs_are_checked():
    x, w13, w2, tw, ids, b13, b2 = make_problem(3, 4, 64, 32, 2, dtype=torch.float32, mxfp4=False, bias=True)
    with pytest.raises(ValueError, match="activation"):
        fused_moe_ref(x, w13, w2, tw, ids, activation="gelu")
    with pytest.raises(ValueError, match=r"w2 must be \[E, H, I\]"):
        fused_moe_ref(x, w13, w2.transpose(1, 2), tw, ids)
    with pytest.raises(ValueError, match="b13"):
        fused_moe_ref(x, w13, w2, tw, ids, b13=b13[:, :-1])
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        fused_moe_ref(x, w13, w2, tw[:2], ids[:2])
