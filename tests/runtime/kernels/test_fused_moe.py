"""Fused MoE: the torch reference against a per-token loop; the Triton kernels against the reference.

CPU (interpreter): float32 and float16 activations (the interpreter's bf16 ``tl.dot`` multiplies the
raw bits in Triton 3.6), with float32, bf16, float16 and MXFP4 weights. GPU: bf16 at GPT-OSS-120B
shapes, and a CUDA-graph capture.

Tolerances (relative, norm-wise). The reference and the kernels round at the same places (the
intermediate and each choice's output to x's dtype, the final sum once) and multiply the same
weight values (MXFP4 decoded exactly); they differ only in float32 summation order inside the GEMMs:
~1e-7 in float32 (1e-5 allowed). In 16-bit an intermediate element near a rounding boundary can
round the other way (one ulp: 2^-11 fp16, 2^-8 bf16) and carry into the down GEMM: 2e-3 fp16,
1.2e-2 bf16 allowed (a wrong expert, weight or activation gives errors of order 1).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from plait.runtime.kernels.fused_moe import fused_moe, fused_moe_ref
from plait.runtime.kernels.fused_moe_config import FusedMoeConfig, TileConfig
from plait.runtime.kernels.fused_moe_triton import (
    _e8m0_bf16,
    _e8m0_bf16_folded,
    _e8m0_scale,
    _fp4_pair,
    _fp4_pair_bf16,
)
from plait.runtime.kernels.mxfp4 import Mxfp4Weight, dequantize_mxfp4, quantize_mxfp4

REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def make_problem(T: int, E: int, H: int, I: int, K: int, *, dtype: torch.dtype, mxfp4: bool, bias: bool,
                 seed: int = 0, ids: torch.Tensor | None = None, device: str = "cpu",
                 weight_dtype: torch.dtype | None = None):
    """Random inputs: x [T, H], w13 [E, 2I, H], w2 [E, H, I] (dense in ``weight_dtype``, default x's,
    or MXFP4), routing [T, K] with distinct experts per token unless ``ids`` is given."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)
    w2 = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    if mxfp4:
        w13, w2 = quantize_mxfp4(w13).to(device), quantize_mxfp4(w2).to(device)
    else:
        wd = weight_dtype or dtype
        w13, w2 = w13.to(wd).to(device), w2.to(wd).to(device)
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)  # distinct
    weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    b13 = (torch.randn(E, 2 * I, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    b2 = (torch.randn(E, H, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    return x, w13, w2, weights.to(device), ids.to(device), b13, b2  # given ids keep their dtype


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
                         swiglu_alpha=experts.alpha, swiglu_limit=experts.limit)
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


# ---- the Triton kernels (interpreter on CPU) ----

SMALL = FusedMoeConfig(16, TileConfig(32, 64), TileConfig(64, 64))  # H=96, I=96: ragged N and K tiles
GROUPED = FusedMoeConfig(16, TileConfig(64, 32, 4, 2), TileConfig(32, 128), group_m=2)
NARROW = FusedMoeConfig(32, TileConfig(16, 128, 4, 2), TileConfig(16, 64), group_m=2)
WIDE = FusedMoeConfig(64, TileConfig(64, 64), TileConfig(32, 128))

WEIGHTS = {  # name: (x dtype, MXFP4?, dense weight dtype)
    "fp32": (torch.float32, False, torch.float32),
    "bf16-weights": (torch.float32, False, torch.bfloat16),
    "fp16": (torch.float16, False, torch.float16),
    "mxfp4-fp32": (torch.float32, True, None),
    "mxfp4-fp16": (torch.float16, True, None),
}


def check_kernel(kernel_device, T, E, H, I, K, weights, activation, bias, config, ids=None, seed=0):
    dtype, mxfp4, wdtype = WEIGHTS[weights]
    x, w13, w2, tw, ids, b13, b2 = make_problem(T, E, H, I, K, dtype=dtype, mxfp4=mxfp4, bias=bias, seed=seed,
                                                ids=ids, device=kernel_device, weight_dtype=wdtype)
    out = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation, config=config)
    ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation)
    assert out.shape == (T, H) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < REL_TOL[dtype], (weights, activation, bias, T)
    return out, ref


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_kernel_matches_reference(kernel_device, weights, activation):
    bias = activation == "swiglu_oai" or weights == "fp32"  # both with and without bias per activation
    check_kernel(kernel_device, 17, 6, 96, 96, 2, weights, activation, bias, SMALL)
    check_kernel(kernel_device, 9, 6, 64, 64, 2, weights, activation, not bias, NARROW, seed=1)


@pytest.mark.parametrize("T", [1, 3])
def test_kernel_decode_sizes(kernel_device, T):
    """Few tokens: most experts get no pairs, most rows of a block are padding."""
    check_kernel(kernel_device, T, 8, 64, 64, 2, "mxfp4-fp16", "swiglu_oai", True, SMALL, seed=T)
    check_kernel(kernel_device, T, 8, 64, 64, 2, "fp32", "silu", False, GROUPED, seed=T)
    check_kernel(kernel_device, T, 8, 64, 64, 2, "mxfp4-fp32", "silu", True, NARROW, seed=T)


@triton.jit
def _decode_fp4_pairs(bytes_ptr, scales_ptr, lo_ptr, hi_ptr, N: tl.constexpr):
    """The fused MoE kernels' in-register MXFP4 decode (``_fp4_pair``) of N bytes, each under its scale."""
    offs = tl.arange(0, N)
    scale = _e8m0_scale(tl.load(scales_ptr + offs))
    lo, hi = _fp4_pair(tl.load(bytes_ptr + offs).to(tl.int32), scale, scale)
    tl.store(lo_ptr + offs, lo)
    tl.store(hi_ptr + offs, hi)


SWAPPED = FusedMoeConfig(16, TileConfig(32, 64), TileConfig(64, 64), swap_ab=True)  # MXFP4 decoded as the A operand
SWAPPED_WIDE = FusedMoeConfig(32, TileConfig(16, 128, 4, 2), TileConfig(32, 32), group_m=2, swap_ab=True)


@pytest.mark.parametrize("weights", ["mxfp4-fp32", "mxfp4-fp16", "fp16"])  # dense weights ignore swap_ab
def test_kernel_with_swapped_operands_matches_reference(kernel_device, weights):
    """acc^T = W @ A^T with the weights decoded in registers: ragged K (96 = 1.5 tiles of 64), ragged N,
    decode sizes (most rows padding) and several rows per expert."""
    check_kernel(kernel_device, 17, 6, 96, 96, 2, weights, "swiglu_oai", True, SWAPPED)
    check_kernel(kernel_device, 1, 8, 64, 64, 2, weights, "swiglu_oai", True, SWAPPED, seed=1)
    check_kernel(kernel_device, 9, 6, 64, 128, 2, weights, "silu", False, SWAPPED_WIDE, seed=2)


# K-swizzled MXFP4 (the GPU layout): block_k a multiple of 64; H=128 (two swizzle spans) and I=192 (a
# ragged last tile at block_k 128)
SWIZZLED_CONFIGS = {
    "swapped": FusedMoeConfig(16, TileConfig(32, 64), TileConfig(64, 64), swap_ab=True),
    "swapped-wide": FusedMoeConfig(32, TileConfig(16, 128, 4, 2), TileConfig(32, 128), group_m=2, swap_ab=True),
    "plain": FusedMoeConfig(16, TileConfig(32, 64), TileConfig(64, 128)),
    "split": FusedMoeConfig(16, TileConfig(32, 64, 4, 2, split_k=2), TileConfig(64, 64, 4, 2, split_k=3),
                            swap_ab=True),
}


@pytest.mark.parametrize("pair", [True, False], ids=["row-paired", "unpaired"])
@pytest.mark.parametrize("config", list(SWIZZLED_CONFIGS.values()), ids=list(SWIZZLED_CONFIGS))
def test_kernel_reads_k_swizzled_weights(kernel_device, config, pair):
    """The kernels read codes in swizzle_k's order, row-paired or not, as the same weights: the reference
    runs on the natural order."""
    for T, dtype, activation in ((9, torch.float32, "swiglu_oai"), (2, torch.float16, "silu")):
        x, w13, w2, tw, ids, b13, b2 = make_problem(T, 6, 128, 192, 2, dtype=dtype, mxfp4=True, bias=True,
                                                    device=kernel_device)
        sw13, sw2 = w13.swizzled(pair), w2.swizzled(pair)
        assert sw13.row_paired == pair and sw2.row_paired == pair
        out = fused_moe(x, sw13, sw2, tw, ids, b13=b13, b2=b2, activation=activation, config=config)
        ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation)
        assert rel_err(out, ref) < REL_TOL[dtype], (T, dtype)


def test_k_swizzled_weights_need_block_k_a_multiple_of_64(kernel_device):
    x, w13, w2, tw, ids, b13, b2 = make_problem(2, 4, 64, 64, 2, dtype=torch.float32, mxfp4=True, bias=False,
                                                device=kernel_device)
    with pytest.raises(ValueError, match="block_k a multiple of 64"):
        fused_moe(x, w13.swizzled(), w2.swizzled(), tw, ids, config=FusedMoeConfig(16, TileConfig(32, 32),
                                                                                     TileConfig(32, 64)))


def test_row_paired_weights_need_tiles_of_whole_16_row_groups(kernel_device):
    """A program's rows must be whole groups of 16 weight rows for row-paired codes: swiglu_oai's gate/up
    tile spans 2 * block_n rows, silu's block_n of each half, down's block_n."""
    x, w13, w2, tw, ids, b13, b2 = make_problem(2, 4, 128, 64, 2, dtype=torch.float32, mxfp4=True, bias=False,
                                                device=kernel_device)
    sw13, sw2 = w13.swizzled(), w2.swizzled()
    assert sw13.row_paired and sw2.row_paired
    ref = {act: fused_moe_ref(x, w13, w2, tw, ids, activation=act) for act in ("silu", "swiglu_oai")}
    with pytest.raises(ValueError, match="multiple of 16"):  # down: 8 rows a program
        fused_moe(x, sw13, sw2, tw, ids, config=FusedMoeConfig(16, TileConfig(16, 64), TileConfig(8, 64), swap_ab=True))
    eight = FusedMoeConfig(16, TileConfig(8, 64), TileConfig(16, 64), swap_ab=True)  # gate/up: 8 columns
    with pytest.raises(ValueError, match="multiple of 16"):  # silu: 8 gate rows and 8 up rows
        fused_moe(x, sw13, sw2, tw, ids, activation="silu", config=eight)
    out = fused_moe(x, sw13, sw2, tw, ids, activation="swiglu_oai", config=eight)  # 16 interleaved rows
    assert rel_err(out, ref["swiglu_oai"]) < REL_TOL[torch.float32]
    out = fused_moe(x, sw13, sw2, tw, ids, activation="silu", config=FusedMoeConfig(16, TileConfig(16, 64),
                                                                                   TileConfig(16, 64), swap_ab=True))
    assert rel_err(out, ref["silu"]) < REL_TOL[torch.float32]


# split-K: K=96 over 3 splits of one 32-chunk each; K=64 into 4 splits of 32 leaves two empty (bias once)
SPLIT = FusedMoeConfig(16, TileConfig(32, 32, 4, 2, split_k=3), TileConfig(64, 32, 4, 2, split_k=4))
SPLIT_UP = FusedMoeConfig(16, TileConfig(32, 32, 4, 2, split_k=2), TileConfig(64, 64))
SPLIT_DOWN = FusedMoeConfig(32, TileConfig(16, 64), TileConfig(32, 32, 4, 2, split_k=2), swap_ab=True)


@pytest.mark.parametrize("config", [SPLIT, SPLIT_UP, SPLIT_DOWN], ids=["both", "up", "down-swapped"])
def test_kernel_with_split_k_matches_reference(kernel_device, config):
    """The reduction split over programs (float32 partials, summed by a second pass): ragged K, a split
    with no chunk at all, bias added once, decode sizes, experts held elsewhere, top-1 (no choice sum)."""
    check_kernel(kernel_device, 17, 6, 96, 96, 2, "mxfp4-fp32", "swiglu_oai", True, config)
    check_kernel(kernel_device, 1, 8, 64, 64, 2, "fp16", "silu", True, config, seed=1)
    ids = torch.tensor([[0, -1], [9, 4], [3, 1], [-1, 8]])
    out, _ = check_kernel(kernel_device, 4, 4, 64, 64, 2, "fp32", "silu", True, config, ids=ids)
    assert torch.equal(out[3].cpu(), torch.zeros(64))
    check_kernel(kernel_device, 5, 8, 64, 64, 1, "mxfp4-fp16", "swiglu_oai", True, config, seed=2)


@pytest.mark.parametrize("config", [SPLIT_UP, SPLIT], ids=["up", "both"])
def test_split_up_gives_zero_partials_to_experts_held_elsewhere(kernel_device, config, monkeypatch):
    """The up GEMM's finish kernel activates every pair's partial sums: a pair whose expert is held
    elsewhere gets zeros there (its intermediate row is 0), not whatever the buffer held."""
    allocated = []
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(1e30)
        allocated.append(t)
        return t

    ids = torch.tensor([[0, -1], [9, 4], [3, 1], [-1, 8]])  # E=8: -1, 8 and 9 held elsewhere
    x, w13, w2, tw, ids, b13, b2 = make_problem(4, 8, 64, 64, 2, dtype=torch.float32, mxfp4=False, bias=True,
                                                ids=ids, device=kernel_device)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    out = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="silu", config=config)
    monkeypatch.undo()
    inter = next(t for t in allocated if tuple(t.shape) == (8, 64) and t.dtype == x.dtype)  # [T*K, I]
    held_elsewhere = (ids.reshape(-1) < 0) | (ids.reshape(-1) >= 8)
    assert int(held_elsewhere.sum()) == 4
    assert torch.equal(inter[held_elsewhere.to(inter.device)].cpu(), torch.zeros(4, 64))
    ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="silu")
    assert rel_err(out, ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("config", [SMALL, SWAPPED, SPLIT_DOWN], ids=["small", "swapped", "split-down"])
def test_direct_row_blocks_equal_the_aligned_layout(kernel_device, config, monkeypatch):
    """Up to DIRECT_MAX_PAIRS pairs each pair is its own row block (no alignment): the same output as the
    moe_align layout, with pairs sharing an expert, ids out of range, and int64 ids."""
    from plait.runtime.kernels import fused_moe_triton

    ids = torch.tensor([[2, 2], [5, -1], [2, 7], [9, 0]])  # E=8: expert 2 thrice, -1 and 9 held elsewhere
    x, w13, w2, tw, ids, b13, b2 = make_problem(4, 8, 64, 64, 2, dtype=torch.float32, mxfp4=True, bias=True,
                                                ids=ids, device=kernel_device)
    assert ids.dtype == torch.int64 and ids.numel() <= fused_moe_triton.DIRECT_MAX_PAIRS
    direct = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai", config=config)
    monkeypatch.setattr(fused_moe_triton, "DIRECT_MAX_PAIRS", 0)
    aligned = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai", config=config)
    ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
    assert rel_err(direct, ref) < REL_TOL[torch.float32] and rel_err(aligned, ref) < REL_TOL[torch.float32]
    assert torch.allclose(direct, aligned, rtol=1e-6, atol=1e-6)


def test_split_k_must_be_positive():
    with pytest.raises(ValueError, match="split_k"):
        TileConfig(32, 64, split_k=0)


def test_register_cap_is_a_compiled_launch_option_only():
    """``max_registers`` reaches the compiler as ``maxnreg``; the interpreter gets no such option, and a cap
    outside what the hardware allows is refused when the tiling is made."""
    capped = TileConfig(64, 128, 4, 3, 2, max_registers=128)
    assert capped.launch_options(compiled=True) == {"num_warps": 4, "num_stages": 3, "maxnreg": 128}
    assert capped.launch_options(compiled=False) == {"num_warps": 4, "num_stages": 3}
    assert TileConfig(64, 128).launch_options(compiled=True) == {"num_warps": 4, "num_stages": 3}
    assert "r128" in capped.short()
    for bad in (0, 16, 256):
        with pytest.raises(ValueError, match="max_registers"):
            TileConfig(64, 128, max_registers=bad)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 6 * 2^127 is inf, as in the reference
def test_fp4_bit_decode_is_exact_for_every_code_and_scale(kernel_device):
    """Every E2M1 code under scales spanning the E8M0 range (0 = 2^-127, 255 = the largest) decodes
    exactly as ``dequantize_mxfp4`` does: the kernel's decode from bits equals the float32 table."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(8)  # every byte (two codes) ...
    scales = torch.tensor([0, 1, 100, 120, 127, 128, 200, 254], dtype=torch.uint8).repeat_interleave(256)  # x 8 scales
    lo, hi = torch.empty(2048, device=kernel_device), torch.empty(2048, device=kernel_device)
    _decode_fp4_pairs[(1,)](codes.to(kernel_device), scales.to(kernel_device), lo, hi, N=2048)
    # the same bytes as 128 rows of one 32-value block each, every row under one scale
    ref = dequantize_mxfp4(codes.view(128, 1, 16), scales.view(128, 16)[:, :1], torch.float32)  # [128, 32]
    assert torch.equal(lo.cpu().view(128, 16), ref[:, 0::2]) and torch.equal(hi.cpu().view(128, 16), ref[:, 1::2])


@triton.jit
def _decode_fp4_pairs_bf16(bytes_ptr, scales_ptr, lo_ptr, hi_ptr, N: tl.constexpr, FOLD: tl.constexpr = False):
    """The PTX bf16 decode (``_fp4_pair_bf16``) of N bytes a program, each under its scale; ``FOLD``: the
    variant with the 2^126 folded into the scales."""
    offs = tl.program_id(0) * N + tl.arange(0, N)
    s = tl.load(scales_ptr + offs)
    scale = _e8m0_bf16_folded(s) if FOLD else _e8m0_bf16(s)
    lo, hi = _fp4_pair_bf16(tl.load(bytes_ptr + offs), scale, scale, FOLD)
    tl.store(lo_ptr + offs, lo)
    tl.store(hi_ptr + offs, hi)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_fp4_ptx_bf16_decode_is_exact_for_every_code_and_scale():
    """The compiled decode straight to bf16 (shifts, lop3, two bf16x2 multiplies; subnormal bf16
    intermediates and results included) equals ``dequantize_mxfp4`` to bf16 for every byte and scale."""
    _cuda()
    codes = torch.arange(256, dtype=torch.uint8).repeat(8)
    scales = torch.tensor([0, 1, 2, 100, 127, 128, 200, 254], dtype=torch.uint8).repeat_interleave(256)
    lo = torch.empty(2048, device="cuda", dtype=torch.bfloat16)
    hi = torch.empty_like(lo)
    _decode_fp4_pairs_bf16[(1,)](codes.cuda(), scales.cuda(), lo, hi, N=2048)
    ref = dequantize_mxfp4(codes.view(128, 1, 16), scales.view(128, 16)[:, :1], torch.float32).bfloat16()
    assert torch.equal(lo.cpu().view(128, 16), ref[:, 0::2]) and torch.equal(hi.cpu().view(128, 16), ref[:, 1::2])


@pytest.mark.gpu
def test_fp4_ptx_folded_decode_is_exact_for_every_code_and_small_scale():
    """The folded decode (one multiply by bf16 2^(s - 1)) equals ``dequantize_mxfp4`` to bf16 for every
    byte and every scale exponent it is used for (0 .. SMALL_SCALE_MAX), subnormal results included."""
    from plait.runtime.kernels.mxfp4 import SMALL_SCALE_MAX

    _cuda()
    scales = torch.arange(SMALL_SCALE_MAX + 1, dtype=torch.uint8).repeat_interleave(256)  # 129 x every byte
    codes = torch.arange(256, dtype=torch.uint8).repeat(SMALL_SCALE_MAX + 1)
    n = codes.numel()  # 129 * 256: a multiple of the 256 bytes a program decodes
    lo = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    hi = torch.empty_like(lo)
    _decode_fp4_pairs_bf16[(n // 256,)](codes.cuda(), scales.cuda(), lo, hi, N=256, FOLD=True)
    rows = n // 16
    ref = dequantize_mxfp4(codes.view(rows, 1, 16), scales.view(rows, 16)[:, :1], torch.float32).bfloat16()
    assert torch.equal(lo.cpu().view(rows, 16), ref[:, 0::2]) and torch.equal(hi.cpu().view(rows, 16), ref[:, 1::2])


def test_kernel_all_tokens_on_one_expert(kernel_device):
    """17 tokens choose expert 2 first: its rows span two row blocks; the other experts get few."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.tensor([2, int(torch.randint(0, 4, (1,), generator=gen)) % 3 + 3])
                       for _ in range(17)])  # second choice in {3, 4, 5}, never 2
    check_kernel(kernel_device, 17, 6, 64, 64, 2, "fp32", "swiglu_oai", True, GROUPED, ids=ids)
    check_kernel(kernel_device, 17, 6, 64, 64, 2, "mxfp4-fp32", "silu", True, SMALL, ids=ids)


def test_kernel_experts_held_elsewhere(kernel_device):
    """Ids outside [0, E) give zero contributions, also for a token with no local expert at all."""
    ids = torch.tensor([[0, -1], [9, 4], [3, 1], [-1, 8]])
    out, _ = check_kernel(kernel_device, 4, 4, 64, 64, 2, "fp32", "silu", True, SMALL, ids=ids)
    assert torch.equal(out[3].cpu(), torch.zeros(64))


def test_kernel_top1_and_top4(kernel_device):
    check_kernel(kernel_device, 5, 8, 64, 64, 1, "fp16", "silu", True, SMALL)
    check_kernel(kernel_device, 5, 8, 64, 64, 4, "mxfp4-fp32", "swiglu_oai", False, GROUPED)


def test_kernel_default_config_int64_ids_and_no_tokens(kernel_device):
    ids = torch.tensor([[1, 3], [0, 1], [2, 0]])  # int64, as torch.topk returns them
    check_kernel(kernel_device, 3, 4, 64, 64, 2, "fp32", "silu", False, None, ids=ids)
    x, w13, w2, tw, ids, _, _ = make_problem(1, 4, 64, 64, 2, dtype=torch.float32, mxfp4=False, bias=False,
                                             device=kernel_device)
    assert fused_moe(x[:0], w13, w2, tw[:0], ids[:0]).shape == (0, 64)


def test_align_matches_torch(kernel_device):
    from plait.runtime.kernels.moe_align import max_padded_rows, moe_align, moe_align_ref

    gen = torch.Generator().manual_seed(0)
    # the last is above TRITON_MAX_PAIRS: moe_align is the torch path there; the checks below still apply
    for T, K, E, block_m in [(1, 4, 128, 16), (3, 2, 8, 16), (17, 2, 4, 16), (40, 4, 6, 32), (300, 2, 5, 64),
                             (700, 2, 6, 16)]:
        ids = torch.randint(-1, E + 1, (T, K), generator=gen).to(torch.int32).to(kernel_device)
        got, ref = moe_align(ids, E, block_m), moe_align_ref(ids, E, block_m)
        for a, b in zip(got, ref):
            assert torch.equal(a.cpu(), b.cpu()), (T, K, E, block_m)
        sorted_ids, block_expert, num_padded = (t.cpu() for t in ref)
        n = int(num_padded)
        assert n % block_m == 0 and n <= max_padded_rows(T * K, E, block_m) == sorted_ids.numel()
        real = sorted_ids[:n][sorted_ids[:n] < T * K]
        assert sorted(real.tolist()) == list(range(T * K))  # every pair placed exactly once
        flat = ids.cpu().reshape(-1)
        for b in range(n // block_m):  # a block's pairs all belong to its expert (-1: out of range)
            pairs = sorted_ids[b * block_m:(b + 1) * block_m]
            pairs = pairs[pairs < T * K]
            e = int(block_expert[b])
            assert all((int(flat[p]) == e) if e >= 0 else not 0 <= int(flat[p]) < E for p in pairs)


# ---- GPU ----

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return "cuda"


@pytest.fixture(scope="module")
def gpt_oss_120b_experts():
    """GPT-OSS-120B's expert shapes (E=128, H=I=2880) in MXFP4 (K-swizzled), random, with bf16 biases."""
    from plait.runtime.kernels.mxfp4 import random_mxfp4

    device = _cuda()
    gen = torch.Generator(device=device).manual_seed(0)
    E, H, I = 128, 2880, 2880
    w13, w2 = random_mxfp4(E, 2 * I, H, gen, device), random_mxfp4(E, H, I, gen, device)
    w13, w2 = w13.swizzled(), w2.swizzled()  # as the engine holds them on a GPU
    b13 = (torch.randn(E, 2 * I, device=device, generator=gen) * 0.1).bfloat16()
    b2 = (torch.randn(E, H, device=device, generator=gen) * 0.1).bfloat16()
    yield w13, w2, b13, b2
    torch.cuda.empty_cache()


def gpt_oss_tokens(w13, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, topk_weights, topk_ids) for ``T`` tokens routed uniformly to 4 of the experts of ``w13``."""
    E, H = w13.shape[0], w13.shape[2]
    gen = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(4, dim=-1).indices.to(torch.int32)
    tw = torch.softmax(torch.randn(T, 4, device="cuda", generator=gen), dim=-1)
    return x, tw, ids


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 256])
def test_gpt_oss_120b_shapes_on_gpu(gpt_oss_120b_experts, T):
    w13, w2, b13, b2 = gpt_oss_120b_experts
    x, tw, ids = gpt_oss_tokens(w13, T)
    out = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
    dense13, dense2 = w13.dequantize(torch.bfloat16), w2.dequantize(torch.bfloat16)
    ref = fused_moe_ref(x, dense13, dense2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
    del dense13, dense2
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SMALL, GROUPED, NARROW, WIDE, SWAPPED, SWAPPED_WIDE, SPLIT, SPLIT_DOWN],
                         ids=["small", "grouped", "narrow", "wide", "swapped", "swapped-wide", "split", "split-down"])
@pytest.mark.parametrize("mxfp4", [False, True])
def test_bf16_tilings_on_gpu(config, mxfp4):
    """bf16 (the interpreter cannot): MXFP4 goes through tl.dot_scaled here (block_k >= 64; GROUPED's
    up GEMM, block_k 32, decodes explicitly)."""
    device = _cuda()
    for T, activation in ((3, "swiglu_oai"), (70, "silu")):
        x, w13, w2, tw, ids, b13, b2 = make_problem(T, 8, 96, 96, 4, dtype=torch.bfloat16, mxfp4=mxfp4, bias=True,
                                                    device=device)
        out = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation, config=config)
        ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation)
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16], (T, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(SWIZZLED_CONFIGS.values()), ids=list(SWIZZLED_CONFIGS))
@pytest.mark.parametrize("large_scales", [False, True], ids=["folded", "large-scales"])
def test_k_swizzled_tilings_on_gpu(config, large_scales):
    """bf16 activations (the PTX decode) on K-swizzled codes, against the reference on natural codes;
    with scales past SMALL_SCALE_MAX (x 2^10 here) the decode keeps its separate 2^126 multiply."""
    check_swizzled_on_gpu(config, large_scales, pack=False)


def check_swizzled_on_gpu(config: FusedMoeConfig, large_scales: bool, pack: bool) -> None:
    """K-swizzled (``pack``: and fragment-packed) codes through ``config`` against the reference on natural
    codes, both activations; packed codes must also give the row-paired ones' output exactly."""
    device = _cuda()
    for T, activation in ((3, "swiglu_oai"), (70, "silu")):
        x, w13, w2, tw, ids, b13, b2 = make_problem(T, 8, 128, 192, 4, dtype=torch.bfloat16, mxfp4=True, bias=True,
                                                    device=device)
        if large_scales:
            w13, w2 = (Mxfp4Weight(w.blocks, w.scales + 10) for w in (w13, w2))
        sw13, sw2 = w13.swizzled(pack=pack), w2.swizzled(pack=pack)
        assert sw13.small_scales != large_scales and sw2.small_scales != large_scales
        assert sw13.fragment_packed == pack and sw2.fragment_packed == pack
        out = fused_moe(x, sw13, sw2, tw, ids, b13=b13, b2=b2, activation=activation, config=config)
        ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation)
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16], (T, activation)
        if pack:
            paired = fused_moe(x, w13.swizzled(), w2.swizzled(), tw, ids, b13=b13, b2=b2, activation=activation,
                               config=config)
            assert torch.equal(out, paired), (T, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 70])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gluon_swapped_gemm_matches_reference(T, split_k, monkeypatch):
    """The Gluon MXFP4 GEMM (off by default, ``USE_GLUON``) against the reference: both GEMMs through it
    (K-swizzled codes, folded scales, K a multiple of block_k), direct and aligned row blocks, split K,
    both activations, and experts held elsewhere."""
    from plait.runtime.kernels import fused_moe_gluon, fused_moe_triton

    device = _cuda()
    monkeypatch.setattr(fused_moe_triton, "USE_GLUON", True)
    config = FusedMoeConfig(16, TileConfig(32, 64, 4, 3, split_k), TileConfig(64, 64, 4, 3, split_k), swap_ab=True)
    for activation in ("swiglu_oai", "silu"):
        x, w13, w2, tw, ids, b13, b2 = make_problem(T, 8, 128, 192, 4, dtype=torch.bfloat16, mxfp4=True, bias=True,
                                                    device=device)
        ids[0, 0] = -1  # held elsewhere
        sw13, sw2 = w13.swizzled(pair=False), w2.swizzled(pair=False)  # the Gluon decode reads unpaired codes
        assert fused_moe_gluon.usable(x, sw13, 64, 128, 64, 16) and fused_moe_gluon.usable(x, sw2, 64, 192, 64, 16)
        out = fused_moe(x, sw13, sw2, tw, ids, b13=b13, b2=b2, activation=activation, config=config)
        ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=activation)
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16], (T, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("weights,T", [("bf16", 24), ("mxfp4", 24), ("bf16", 300)])  # 300 * 4: torch alignment
def test_cuda_graph_replay_follows_new_routing(weights, T):
    """Captured once, replayed with other ids, weights and tokens in the same buffers: equals eager."""
    device = _cuda()
    E, H, I, K = 16, 256, 128, 4
    x, w13, w2, tw, ids, b13, b2 = make_problem(T, E, H, I, K, dtype=torch.bfloat16, mxfp4=weights == "mxfp4",
                                                bias=True, device=device)
    fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2)
    for seed in (1, 2):
        x2, _, _, tw2, ids2, _, _ = make_problem(T, E, H, I, K, dtype=torch.bfloat16, mxfp4=False, bias=False,
                                                 seed=seed, device=device)
        ids2[0] = 3  # both choices of token 0 on one expert
        x.copy_(x2), tw.copy_(tw2), ids.copy_(ids2)
        graph.replay()
        torch.testing.assert_close(out, fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2), rtol=0, atol=0)
        assert rel_err(out, fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2)) < REL_TOL[torch.bfloat16]


# ------------------------------------------------------------------ fragment-packed codes (sm_90 decode)
PACKED_CONFIGS = {  # swapped tilings that read fragment-packed codes: >= 64 weight rows, whole warpgroups
    "decode": FusedMoeConfig(16, TileConfig(32, 64), TileConfig(64, 64), swap_ab=True),
    "split": FusedMoeConfig(16, TileConfig(64, 128, 4, 3, 2), TileConfig(128, 64, 4, 3, 2), swap_ab=True),
    "prefill": FusedMoeConfig(64, TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 4), swap_ab=True),
}


def test_packed_weights_are_refused_where_the_sm90_decode_does_not_run(kernel_device):
    """The interpreter (and any path but the swapped product's sm_90 bf16 decode) cannot read
    fragment-packed codes: a clear error, not wrong numbers."""
    x, w13, w2, tw, ids, _, _ = make_problem(3, 4, 64, 64, 2, dtype=torch.float32, mxfp4=True, bias=False,
                                              device=kernel_device)
    pw13, pw2 = w13.swizzled(pack=True), w2.swizzled(pack=True)
    assert pw13.fragment_packed and pw2.fragment_packed
    with pytest.raises(ValueError, match="fragment-packed"):
        fused_moe(x, pw13, pw2, tw, ids, config=PACKED_CONFIGS["decode"])


def test_packed_tilings_are_the_wgmma_ones():
    from plait.runtime.kernels.fused_moe_triton import packed_tiling_ok

    assert packed_tiling_ok(64, 4) and packed_tiling_ok(256, 8)
    assert not packed_tiling_ok(32, 4) and not packed_tiling_ok(64, 2)


def test_every_mxfp4_tiling_the_table_can_pick_reads_packed_codes():
    """The MoE layer packs MXFP4 codes on sm_90 (moe.PACK_FRAGMENTS) for every token count, so each
    tiling the table or the default can choose for an MXFP4 shape must be a packed one (gate/up tiles
    span 2 * block_n weight rows, down tiles block_n); else a batch size would raise mid-serving."""
    from plait.runtime.kernels.fused_moe_config import TUNED, MoeShape, default_config, get_config
    from plait.runtime.kernels.fused_moe_triton import packed_tiling_ok
    from plait.runtime.layers import moe

    assert moe.PACK_FRAGMENTS
    shapes = {shape for shape, _ in TUNED if shape.weight_format == "mxfp4"}
    shapes.add(MoeShape(8, 2880, 2880, 4, "mxfp4"))  # an untuned MXFP4 shape: the defaults
    assert len(shapes) >= 3
    for shape in shapes:
        for tokens in [1, 3, 16, 100, 256, 300, 512, 1000, 2048, 4096, 10_000]:
            for config in (get_config(shape, tokens), default_config(shape, tokens)):
                assert config.swap_ab, (shape, tokens)
                assert packed_tiling_ok(2 * config.up.block_n, config.up.num_warps), (shape, tokens, config.short())
                assert packed_tiling_ok(config.down.block_n, config.down.num_warps), (shape, tokens, config.short())


# Compiles the swapped MXFP4 kernels for sm_90 (no GPU needed: ptxas ships with Triton) in a process of
# its own, without the interpreter this test session runs Triton under, and prints, per tiling, the first
# register bases of the layout Triton gives the decode's code bytes: the order in which each thread's
# bytes are packed four to a word for the PTX.
_COMPILE_AND_REPORT_LAYOUTS = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from plait.runtime.kernels import fused_moe_triton

pointers = {"x_ptr": "*bf16", "a_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "b_ptr": "*bf16", "out_ptr": "*bf16",
            "part_ptr": "*fp32", "tw_ptr": "*fp32", "y_ptr": "*bf16", "sorted_ptr": "*i32",
            "block_expert_ptr": "*i32", "num_padded_ptr": "*i32"}
out = []
for kernel_name, block_n, block_k, num_warps in json.loads(sys.argv[1]):
    kernel = getattr(fused_moe_triton, kernel_name)
    const = dict(MXFP4=True, SCALED_DOT=False, HAS_BIAS=True, IEEE=False, SWAP_AB=True, BLOCK_M=16, BLOCK_N=block_n,
                 BLOCK_K=block_k, GROUP_M=1, SPLIT_K=1, BF16_ASM=True, SWIZZLED=True, DIRECT=False, FOLD=True,
                 EVEN_K=True, ROW_PAIRED=fused_moe_triton.CODES_FRAGMENT_PACKED)
    if kernel_name == "_moe_up_kernel":
        const["ACT"] = 1
    signature = {name: pointers.get(name, "constexpr" if name in const else
                                    "fp32" if name in ("alpha", "limit") else "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=const),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    ttgir = compiled.asm["ttgir"]
    layout = re.search(r"tt\\.elementwise_inline_asm .*?: tensor<\\d+x\\d+xi8, #(\\w+)>", ttgir).group(1)
    bases = re.search(r"#%s = .*?register = (\\[\\[.*?\\]\\])" % layout, ttgir).group(1)
    out.append(json.loads(bases)[:2])
print(json.dumps(out))
"""

PACKED_LAYOUT_CASES = [  # (kernel, block_n, block_k, num_warps, whether packed_tiling_ok admits it)
    ("_moe_up_kernel", 64, 128, 4, True), ("_moe_down_kernel", 128, 64, 8, True),
    ("_moe_down_kernel", 32, 64, 4, False), ("_moe_down_kernel", 64, 64, 2, False),
]


@pytest.mark.slow
def test_packed_words_are_the_bytes_pack_fragments_groups():
    """What fragment packing rests on, checked on the compiler itself: in tilings ``packed_tiling_ok``
    admits, each thread's four packed code bytes are (r, c), (r + 8, c), (r, c + 4), (r + 8, c + 4)
    (register bases: row + 8, then byte + 4); in the others (the older MMA) they are not."""
    import json
    import os
    import subprocess
    import sys

    from plait.runtime.kernels.fused_moe_triton import packed_tiling_ok

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = [case[:4] for case in PACKED_LAYOUT_CASES]
    result = subprocess.run([sys.executable, "-c", _COMPILE_AND_REPORT_LAYOUTS, json.dumps(cases)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for (kernel_name, block_n, _, num_warps, wgmma), bases in zip(PACKED_LAYOUT_CASES,
                                                                  json.loads(result.stdout.splitlines()[-1])):
        rows = 2 * block_n if kernel_name == "_moe_up_kernel" else block_n
        assert packed_tiling_ok(rows, num_warps) == wgmma
        assert (bases == [[8, 0], [0, 4]]) == wgmma, (kernel_name, block_n, num_warps, bases)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 256])
def test_packed_weights_give_the_row_paired_results_exactly_on_gpu(gpt_oss_120b_experts, T):
    """GPT-OSS-120B shapes, the default tables: fragment-packed codes decode to the same values as the
    row-paired ones, so the outputs are identical."""
    w13, w2, b13, b2 = gpt_oss_120b_experts
    pw13 = Mxfp4Weight(w13.natural_blocks(), w13.scales).swizzled(pack=True)
    pw2 = Mxfp4Weight(w2.natural_blocks(), w2.scales).swizzled(pack=True)
    assert pw13.fragment_packed and pw2.fragment_packed
    x, tw, ids = gpt_oss_tokens(w13, T)
    paired = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
    packed = fused_moe(x, pw13, pw2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
    assert torch.equal(packed, paired)


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(PACKED_CONFIGS.values()), ids=list(PACKED_CONFIGS))
@pytest.mark.parametrize("large_scales", [False, True], ids=["folded", "large-scales"])
def test_packed_tilings_on_gpu(config, large_scales):
    """Fragment-packed codes against the reference on natural codes, both activations, small and large
    scales, and bit for bit against the row-paired codes."""
    check_swizzled_on_gpu(config, large_scales, pack=True)


@pytest.mark.gpu
@pytest.mark.parametrize(("config", "swizzled"), [(SWAPPED, True), (SPLIT, False)], ids=["swapped", "split"])
def test_token_counts_of_one_tiling_share_one_compiled_variant(config, swizzled):
    """A serving step's token count moves with every batch; the kernels' count arguments are not
    specialized, so counts odd, even and multiples of 16 run the first count's compiled kernels (each new
    variant once cost its compile, ~2 s on an H200 host, in the TTFT of a whole step of requests)."""
    from plait.runtime.kernels import fused_moe_triton, moe_align

    device = _cuda()
    kernels = [fused_moe_triton._moe_up_kernel, fused_moe_triton._moe_down_kernel,
               fused_moe_triton._moe_up_finish_kernel, fused_moe_triton._moe_down_finish_kernel,
               moe_align._moe_align_kernel]

    def variants() -> list[int]:
        return [sum(len(caches[0]) for caches in kernel.device_caches.values()) for kernel in kernels]

    counts = []
    for T in (64, 37, 100, 129, 33, 250):
        x, w13, w2, tw, ids, b13, b2 = make_problem(T, 8, 128, 192, 4, dtype=torch.bfloat16, mxfp4=True, bias=True,
                                                    device=device)
        held13, held2 = (w13.swizzled(), w2.swizzled()) if swizzled else (w13, w2)
        out = fused_moe(x, held13, held2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai", config=config)
        ref = fused_moe_ref(x, w13, w2, tw, ids, b13=b13, b2=b2, activation="swiglu_oai")
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16], T
        counts.append(variants())
    assert all(c == counts[0] for c in counts), counts
