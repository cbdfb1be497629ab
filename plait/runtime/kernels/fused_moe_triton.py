"""The fused MoE kernels (Triton): two grouped GEMMs over the expert-sorted (token, choice) pairs.

1. ``moe_align`` lays the pairs out expert by expert, each run padded to ``BLOCK_M`` rows.
2. Up kernel, grid ``(row blocks x I / BLOCK_N)``: a program takes ``BLOCK_M`` pairs of one expert and
   ``BLOCK_N`` intermediate columns, multiplies the pairs' token rows by that expert's gate and up rows
   in one ``[BLOCK_M, 2 * BLOCK_N]`` product (weight rows chosen so gate and up interleave), adds the
   bias, applies the activation in float32 and stores ``[BLOCK_M, BLOCK_N]`` of the intermediate
   (x's dtype), indexed by pair.
3. Down kernel, grid ``(row blocks x H / BLOCK_N)``: intermediate rows times the expert's down rows,
   plus bias, times the routing weight, stored per pair (x's dtype); pairs of experts held elsewhere
   get zeros.
4. ``y.view(T, K, H).sum(1)`` (float32 accumulation) sums the choices.

MXFP4 weights are decoded in registers: each byte's two codes go to an even-k and an odd-k tile, and
the activations are loaded at even and odd k to match, so no interleave is needed; the value is
``code value * 2^(s - 127)`` built from bits (exactly ``dequantize_mxfp4``'s), cast to x's dtype for
the MMA (Hopper has no FP4 tensor cores). Every expert's weight rows are read by one program per
(row block, column block), so at decode (one row block per touched expert) each touched byte is
read once per call.

``FusedMoeConfig.swap_ab`` computes the transposed product instead (weights decoded from bits as the
MMA's register operand, activations from shared memory: see ``_expert_gemm``). On an H200 with the
table's tilings it ran at the same 0.6-1.1 TB/s as ``tl.dot_scaled`` (5% faster at T=1, 3-16% slower
at 64-256 tokens), so no tuned entry uses it; ``benchmarks/moe_kernel.py`` times it next to the
table's choice for MXFP4 shapes and ``--tune`` tries it.

Grids depend on T, K and the tiling only; the row blocks past ``num_padded`` exit at once. No host
reads: CUDA-graph capturable.

Measured on an H200 (``benchmarks/moe_kernel.py``, tuned table): bf16 experts (Qwen3-30B-A3B) run at
86% of the bytes floor at 8-64 tokens, 46% at 1 token (four launches of fixed cost against 18 us of
weights), 36% of the FLOP floor at 4096. MXFP4 experts (GPT-OSS-120B) run at only 14-24% of their
floor at every size: ``tl.dot_scaled`` on Hopper upcasts through registers and shared memory each
tile with no pipelining of the packed loads, so programs stream ~0.6-1 TB/s. Closing that needs a
pre-swizzled weight layout or an upcast written for the MMA operand layout (what triton_kernels'
matmul_ogs does), not more tiling.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from plait.runtime.kernels.fused_moe_config import FusedMoeConfig, MoeShape, TileConfig, get_config
from plait.runtime.kernels.moe_align import moe_align
from plait.runtime.kernels.mxfp4 import Mxfp4Weight

ACT_SILU, ACT_SWIGLU_OAI = 0, 1


@triton.jit
def _fp4_pair(byte, scale):
    """A byte's two E2M1 codes (int32 0..255; low nibble first) times ``scale`` (float32 2^(s - 127)),
    as float32, from bits: a code's magnitude bits (e1 e0 m) placed at float32 bits 24..22 give
    exactly code value * 2^-126 (e = 0 lands on the subnormals, 0 and 0.5 * 2^-126), its sign at bit 31;
    two exact multiplies (2^126, the scale) finish: five integer and two float operations a value."""
    lo = ((byte << 22) & 0x1C00000) | ((byte << 28) & -2147483648)
    hi = ((byte << 18) & 0x1C00000) | ((byte << 24) & -2147483648)
    two_126 = 8.507059173023462e37
    lo = lo.to(tl.float32, bitcast=True) * two_126 * scale
    hi = hi.to(tl.float32, bitcast=True) * two_126 * scale
    return lo, hi


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b; float32 inputs at full precision (not TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _expert_gemm(
    a_rows, a_ok, stride_ak, w_base, s_base, w_rows, w_ok, K, stride_wn, stride_wk, stride_sn,
    BLOCK_M: tl.constexpr, NW: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr, SCALED_DOT: tl.constexpr,
    IEEE: tl.constexpr, SWAP_AB: tl.constexpr,
):
    """acc [BLOCK_M, NW] = A[rows] @ W[w_rows]^T over all of K, float32.

    ``a_rows`` [BLOCK_M] pointers to the A rows, ``w_rows`` [NW] the weight rows, ``w_ok`` [NW];
    ``w_base``/``s_base`` point at the expert's weight (MXFP4: bytes ``[N, K/2]``, scales
    ``[N, K/32]``). ``SCALED_DOT`` (bf16 A, BLOCK_K >= 64, compiled only): MXFP4 through
    ``tl.dot_scaled``, whose upcast to bf16 is Triton's own; the explicit decode below (the
    interpreter's path, and fp16/fp32 A) is ``_fp4_pair`` (seven operations a value; an earlier
    decode of ~17 was ALU-bound on an H200, 2x slower than dot_scaled at decode).

    ``SWAP_AB`` (MXFP4 only; ignored for dense weights): the transposed product acc^T [NW, BLOCK_M] =
    W[w_rows] @ A[rows]^T, so the weights decoded in registers (``_fp4_pair``) are the MMA's first
    operand, which Hopper's wgmma takes from registers, and the few activation rows the second (from
    shared memory); NW >= 64 fills a wgmma tile at any BLOCK_M >= 16. The way decode-sized GEMMs with
    narrow weights are usually arranged on Hopper. Returned transposed back to [BLOCK_M, NW]."""
    if MXFP4 and SWAP_AB:
        return _expert_gemm_swapped(a_rows, a_ok, stride_ak, w_base, s_base, w_rows, w_ok, K, stride_wn,
                                    stride_sn, BLOCK_M, NW, BLOCK_K, IEEE)
    acc = tl.zeros((BLOCK_M, NW), dtype=tl.float32)
    w_ptrs = w_base + w_rows[None, :].to(tl.int64) * stride_wn  # [1, NW]
    w_ok = w_ok[None, :]  # [1, NW]
    for k0 in range(0, K, BLOCK_K):
        if MXFP4:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds k = 2j (low nibble), 2j + 1 (high)
            kb_ok = kb < K // 2
            codes = tl.load(w_ptrs + kb[:, None], mask=kb_ok[:, None] & w_ok, other=0)  # [BLOCK_K/2, NW]
            if SCALED_DOT:
                kk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_rows[:, None] + kk[None, :] * stride_ak, mask=a_ok[:, None] & (kk < K)[None, :],
                            other=0.0)  # [BLOCK_M, BLOCK_K]
                ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                s_ptrs = s_base + w_rows[:, None].to(tl.int64) * stride_sn + ks[None, :]  # [NW, BLOCK_K/32]
                scales = tl.load(s_ptrs, mask=tl.trans(w_ok) & (ks < K // 32)[None, :], other=127)
                acc = tl.dot_scaled(a, None, "bf16", codes, scales, "e2m1", acc)
            else:
                a_mask = a_ok[:, None] & kb_ok[None, :]
                a_even = tl.load(a_rows[:, None] + (2 * kb)[None, :] * stride_ak, mask=a_mask, other=0.0)
                a_odd = tl.load(a_rows[:, None] + (2 * kb + 1)[None, :] * stride_ak, mask=a_mask, other=0.0)
                codes = codes.to(tl.int32)
                s_ptrs = s_base + w_rows[None, :].to(tl.int64) * stride_sn + (kb // 16)[:, None]
                s = tl.load(s_ptrs, mask=kb_ok[:, None] & w_ok, other=127).to(tl.int32)  # [BLOCK_K/2, NW]
                scale = tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)  # 2^(s - 127)
                lo, hi = _fp4_pair(codes, scale)  # even k, odd k
                acc = _dot(a_even, lo.to(a_even.dtype), acc, IEEE)
                acc = _dot(a_odd, hi.to(a_even.dtype), acc, IEEE)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            kk_ok = kk < K
            a = tl.load(a_rows[:, None] + kk[None, :] * stride_ak, mask=a_ok[:, None] & kk_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + kk[:, None] * stride_wk, mask=kk_ok[:, None] & w_ok, other=0.0)  # [BLOCK_K, NW]
            acc = _dot(a, w.to(a.dtype), acc, IEEE)
    return acc


@triton.jit
def _expert_gemm_swapped(
    a_rows, a_ok, stride_ak, w_base, s_base, w_rows, w_ok, K, stride_wn, stride_sn,
    BLOCK_M: tl.constexpr, NW: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """``_expert_gemm`` for MXFP4 weights with the operands swapped (see its ``SWAP_AB``)."""
    acc_t = tl.zeros((NW, BLOCK_M), dtype=tl.float32)
    w_ptrs = w_base + w_rows[:, None].to(tl.int64) * stride_wn  # [NW, 1]
    s_ptrs = s_base + w_rows[:, None].to(tl.int64) * stride_sn  # [NW, 1]
    w_ok = w_ok[:, None]  # [NW, 1]
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds k = 2j (low nibble), 2j + 1 (high)
        kb_ok = kb < K // 2
        codes = tl.load(w_ptrs + kb[None, :], mask=w_ok & kb_ok[None, :], other=0).to(tl.int32)  # [NW, BK/2]
        ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = tl.load(s_ptrs + ks[None, :], mask=w_ok & (ks < K // 32)[None, :], other=127).to(tl.int32)
        scale = tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)  # [NW, BK/32] 2^(s - 127)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (NW, BLOCK_K // 32, 16)), (NW, BLOCK_K // 2))
        a_mask = kb_ok[:, None] & a_ok[None, :]
        a_even = tl.load(a_rows[None, :] + (2 * kb)[:, None] * stride_ak, mask=a_mask, other=0.0)  # [BK/2, BM]
        a_odd = tl.load(a_rows[None, :] + (2 * kb + 1)[:, None] * stride_ak, mask=a_mask, other=0.0)
        lo, hi = _fp4_pair(codes, scale)
        acc_t = _dot(lo.to(a_even.dtype), a_even, acc_t, IEEE)
        acc_t = _dot(hi.to(a_even.dtype), a_odd, acc_t, IEEE)
    return tl.trans(acc_t)


@triton.jit
def _block_coords(num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row block, column block), row blocks walked ``GROUP_M`` at a time."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _moe_up_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, top_k, num_m_blocks, H, I, alpha, limit,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_be, stride_om,
    ACT: tl.constexpr, MXFP4: tl.constexpr, SCALED_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, I, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return  # pairs of experts held elsewhere: the down kernel writes their zeros
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    pair_ok = pairs < num_pairs
    a_rows = x_ptr + (tl.where(pair_ok, pairs, 0) // top_k).to(tl.int64) * stride_xm  # [BLOCK_M] token rows
    # weight rows, gate and up interleaved: column j of the product is gate (j even) or up (j odd) of
    # intermediate column pid_n * BLOCK_N + j // 2
    j = tl.arange(0, 2 * BLOCK_N)
    col = pid_n * BLOCK_N + j // 2
    col_ok = col < I
    if ACT == 0:  # silu: gate rows [0, I), up rows [I, 2I)
        w_rows = col + (j % 2) * I
    else:  # swiglu_oai: gate rows 2c, up rows 2c + 1
        w_rows = 2 * col + (j % 2)
    w_rows = tl.where(col_ok, w_rows, 0)
    acc = _expert_gemm(a_rows, pair_ok, stride_xk, w_ptr + expert * stride_we, s_ptr + expert * stride_se,
                       w_rows, col_ok, H, stride_wn, stride_wk, stride_sn,
                       BLOCK_M, 2 * BLOCK_N, BLOCK_K, MXFP4, SCALED_DOT, IEEE, SWAP_AB)  # [BLOCK_M, 2 * BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + w_rows).to(tl.float32)[None, :]
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # [BLOCK_M, BLOCK_N] each
    if ACT == 0:
        act = gate / (1.0 + tl.exp(-gate)) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, act.to(out_ptr.dtype.element_ty), mask=pair_ok[:, None] & (cols < I)[None, :])


@triton.jit
def _moe_down_kernel(
    a_ptr, w_ptr, s_ptr, b_ptr, tw_ptr, y_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_m_blocks, H, I,
    stride_am, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_be, stride_ym,
    MXFP4: tl.constexpr, SCALED_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, H, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    pair_ok = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    y = y_ptr + pairs.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    y_mask = pair_ok[:, None] & col_ok[None, :]
    if expert < 0:  # experts held elsewhere contribute nothing
        tl.store(y, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=y_mask)
        return
    a_rows = a_ptr + tl.where(pair_ok, pairs, 0).to(tl.int64) * stride_am  # [BLOCK_M] intermediate rows
    w_rows = tl.where(col_ok, cols, 0)
    acc = _expert_gemm(a_rows, pair_ok, 1, w_ptr + expert * stride_we, s_ptr + expert * stride_se,
                       w_rows, col_ok, I, stride_wn, stride_wk, stride_sn,
                       BLOCK_M, BLOCK_N, BLOCK_K, MXFP4, SCALED_DOT, IEEE, SWAP_AB)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + w_rows).to(tl.float32)[None, :]
    weight = tl.load(tw_ptr + tl.where(pair_ok, pairs, 0)).to(tl.float32)  # [BLOCK_M]
    tl.store(y, (acc * weight[:, None]).to(y_ptr.dtype.element_ty), mask=y_mask)


def _weight_args(w):
    """(weight pointer tensor, scales tensor, stride_e, stride_n, stride_k, scale stride_e, stride_n, mxfp4)."""
    if isinstance(w, Mxfp4Weight):
        blocks, scales = w.blocks, w.scales
        if blocks.stride(3) != 1 or blocks.stride(2) != 16 or scales.stride(2) != 1:
            raise ValueError("MXFP4 blocks must be contiguous along K (strides [.., .., 16, 1]) and scales too")
        return blocks, scales, blocks.stride(0), blocks.stride(1), 1, scales.stride(0), scales.stride(1), True
    return w, w, w.stride(0), w.stride(1), w.stride(2), 0, 0, False


def fused_moe_triton(
    x: torch.Tensor, w13, w2, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
    b13: torch.Tensor | None, b2: torch.Tensor | None, activation: str, swiglu_alpha: float,
    swiglu_limit: float, config: FusedMoeConfig | None,
) -> torch.Tensor:
    """See ``fused_moe.fused_moe`` (which validates the inputs and calls this)."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    I = two_i // 2
    if T == 0:
        return torch.empty_like(x)
    if config is None:
        fmt = "mxfp4" if isinstance(w13, Mxfp4Weight) else str(w13.dtype).removeprefix("torch.")
        config = get_config(MoeShape(E, H, I, K, fmt, str(x.dtype).removeprefix("torch.")), T)
    bm = config.block_m
    sorted_ids, block_expert, num_padded = moe_align(topk_ids, E, bm)
    num_pairs = T * K
    num_m_blocks = block_expert.shape[0]
    inter = torch.empty(num_pairs, I, dtype=x.dtype, device=x.device)  # [T*K, I], row per pair
    y = torch.empty(num_pairs, H, dtype=x.dtype, device=x.device)  # [T*K, H], row per pair
    ieee = x.dtype == torch.float32
    scaled_dot = x.dtype == torch.bfloat16 and config.scaled_dot and os.environ.get("TRITON_INTERPRET") != "1"
    tw = topk_weights.reshape(-1).contiguous()  # [T*K]
    b13 = b13.contiguous() if b13 is not None else None  # the kernels index biases with unit stride
    b2 = b2.contiguous() if b2 is not None else None

    w, s, swe, swn, swk, sse, ssn, mx = _weight_args(w13)
    up: TileConfig = config.up
    _moe_up_kernel[(num_m_blocks * triton.cdiv(I, up.block_n),)](
        x, w, s, b13 if b13 is not None else x, inter, sorted_ids, block_expert, num_padded,
        num_pairs, K, num_m_blocks, H, I, swiglu_alpha, swiglu_limit,
        x.stride(0), x.stride(1), swe, swn, swk, sse, ssn, b13.stride(0) if b13 is not None else 0, inter.stride(0),
        ACT=0 if activation == "silu" else 1, MXFP4=mx, SCALED_DOT=mx and scaled_dot and up.block_k >= 64,
        HAS_BIAS=b13 is not None, IEEE=ieee, SWAP_AB=mx and config.swap_ab,
        BLOCK_M=bm, BLOCK_N=up.block_n, BLOCK_K=up.block_k, GROUP_M=config.group_m,
        num_warps=up.num_warps, num_stages=up.num_stages,
    )
    w, s, swe, swn, swk, sse, ssn, mx = _weight_args(w2)
    down: TileConfig = config.down
    _moe_down_kernel[(num_m_blocks * triton.cdiv(H, down.block_n),)](
        inter, w, s, b2 if b2 is not None else x, tw, y, sorted_ids, block_expert, num_padded,
        num_pairs, num_m_blocks, H, I,
        inter.stride(0), swe, swn, swk, sse, ssn, b2.stride(0) if b2 is not None else 0, y.stride(0),
        MXFP4=mx, SCALED_DOT=mx and scaled_dot and down.block_k >= 64, HAS_BIAS=b2 is not None, IEEE=ieee,
        SWAP_AB=mx and config.swap_ab,
        BLOCK_M=bm, BLOCK_N=down.block_n, BLOCK_K=down.block_k, GROUP_M=config.group_m,
        num_warps=down.num_warps, num_stages=down.num_stages,
    )
    if K == 1:
        return y
    return y.view(T, K, H).sum(dim=1)  # float32 accumulation inside torch's reduction
