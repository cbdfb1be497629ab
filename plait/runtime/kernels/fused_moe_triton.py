"""The fused MoE kernels (Triton): two grouped GEMMs over the expert-sorted (token, choice) pairs.

1. ``moe_align`` lays the pairs out expert by expert, each run padded to ``BLOCK_M`` rows; up to
   ``DIRECT_MAX_PAIRS`` pairs (decode) each pair is its own row block instead and nothing is aligned.
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

``FusedMoeConfig.swap_ab`` computes the transposed product instead (weights decoded in registers as
the MMA's first operand, activations from shared memory: see ``_expert_gemm``); each byte's two values
are joined back into k order there, one MMA per tile. Compiled with bf16 activations on sm_90 the
decode is PTX straight to bf16 (``_fp4_pair_bf16``: about three operations a value); elsewhere
``_fp4_pair`` in float32. K-swizzled codes (``mxfp4.swizzle_k``, how the MoE layer holds them on a
GPU) are loaded as stored and put in logical order by a reshape and a transpose (``_unswizzle_k``),
which for the swapped operand moves no data. ``TileConfig.split_k`` splits a GEMM's reduction over
programs: float32 partials, summed with the activation by ``_moe_up_finish_kernel`` (up) or with the
choices by ``_moe_down_finish_kernel`` (down).

Grids depend on T, K and the tiling only; the row blocks past ``num_padded`` exit at once. No host
reads: CUDA-graph capturable.

Measured on an H200 (``benchmarks/moe_kernel.py``, tuned table; benchmarks/RESULTS.md): bf16 experts
(Qwen3-30B-A3B) run at 86% of the bytes floor at 8-64 tokens, 46% at 1 token, 36% of the FLOP floor at
4096. MXFP4 experts (GPT-OSS-120B, K-swizzled and row-paired) at 33-50% of their floor at decode sizes
(T=1 38.2 us against 12.6, T=64 693 against 350), 35% of the FLOP floor at 4096 (the swapped product). Nsight Compute on the swapped kernels: at 1 token the up GEMM
(31 us of 52) is latency-bound, 164 registers a thread leaving 3 programs an SM, 0.9 waves, issue
slots 46% busy; from 16 tokens on the integer pipe binds (62% busy, 13 instructions per weight byte,
two thirds of them the decode and its byte permutes). So the decode's instruction count is the
lever: the scales' 2^126 folded in (``FOLD``) and unmasked weight loads cut the loop by 20% (425 ->
340 instructions a K step, sm_90 SASS); row-paired codes (``ROW_PAIRED``, ``mxfp4.pair_rows``) remove the
byte permutes that joined each decoded pair (another 11-14%); the scales and activations are loaded a
step ahead (Triton pipelined only the codes and waited out the other loads' latency every step).
Fragment-packed codes (``CODES_FRAGMENT_PACKED``, ``mxfp4.pack_fragments``) make the decode rotations
and masks of each thread's 32-bit fragment word: loops 511 -> 399 (T=1 up tile), 290 -> 226, 287 -> 233
instructions a K step in sm_90 SASS, 3-6% off the kernel's time on an H200 (on by default:
``moe.PACK_FRAGMENTS``). A word-level decode without byte permutes (~6 instructions per two values)
was tried; Triton 3.6 then routed the decoded tile to the MMA layout through shared memory or warp
shuffles (its layouts follow the load, not the MMA), which cost more than it saved.
With explicit layouts (``fused_moe_gluon``) that decode reaches the MMA with no data movement, but that
kernel is still slower as a whole (its docstring says why) and is off (``USE_GLUON``).
Earlier measurements: with no decode at all the natural-order kernel still ran at 0.9-1.7 TB/s; a
CUDA-core variant without MMAs was 1.8-4x slower.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from plait.runtime.kernels.fused_moe import sm90_bf16_decode
from plait.runtime.kernels.fused_moe_config import FusedMoeConfig, MoeShape, TileConfig, get_config
from plait.runtime.kernels.moe_align import moe_align
from plait.runtime.kernels.mxfp4 import (
    FRAGMENT_MAGNITUDE_ROTATION,
    FRAGMENT_SIGN_ROTATION,
    ROW_PAIR_SPAN,
    Mxfp4Weight,
)

ACT_SILU, ACT_SWIGLU_OAI = 0, 1

# How MXFP4 codes are arranged (the kernels' ``ROW_PAIRED`` constexpr): natural, row-paired
# (``mxfp4.pair_rows``), or row-paired and fragment-packed (``mxfp4.pack_fragments``: the same values as
# row-paired, their bits moved for the sm_90 decode, which is the only one that reads them).
CODES_NATURAL, CODES_ROW_PAIRED, CODES_FRAGMENT_PACKED = 0, 1, 2

# Up to this many (token, choice) pairs, each pair is its own row block (``DIRECT``): no alignment pass
# (a single-program kernel of ~8 us on an H200, 8% of a GPT-OSS-120B batch-1 step), at the cost of
# reading an expert once per pair that chose it rather than once per call. At 16 pairs over 128
# experts about 1 pair in 16 shares its expert (6% more expert bytes); at batch 1 none does.
DIRECT_MAX_PAIRS = 16

# The swapped MXFP4 GEMMs through the Gluon kernel (fused_moe_gluon.py) where it applies. Off: measured on an
# H200 at GPT-OSS-120B's shapes it is 12-16% slower than the Triton kernels here at T = 4-256 (that module's
# docstring says why); benchmarks/moe_kernel.py times both, tests keep it correct.
USE_GLUON = False


@triton.jit
def _fp4_pair(byte, scale_lo, scale_hi):
    """A byte's two E2M1 codes (int32 0..255; low nibble first), the low one times ``scale_lo`` and the
    high one times ``scale_hi`` (float32 2^(s - 127); the same scale but for row-paired codes), as
    float32, from bits: a code's magnitude bits (e1 e0 m) placed at float32 bits 24..22 give exactly code
    value * 2^-126 (e = 0 lands on the subnormals, 0 and 0.5 * 2^-126), its sign at bit 31; two exact
    multiplies (2^126, the scale) finish: five integer and two float operations a value."""
    lo = ((byte << 22) & 0x1C00000) | ((byte << 28) & -2147483648)
    hi = ((byte << 18) & 0x1C00000) | ((byte << 24) & -2147483648)
    two_126 = 8.507059173023462e37
    lo = lo.to(tl.float32, bitcast=True) * two_126 * scale_lo
    hi = hi.to(tl.float32, bitcast=True) * two_126 * scale_hi
    return lo, hi


# Four bytes (eight E2M1 codes) -> bf16 pairs, in PTX (compiled only; sm_90 for mul.bf16x2). Per 16-bit
# lane: magnitude bits e1 e0 m at bf16 bits 8..6 (code value * 2^-126, e = 0 on the subnormals) and the
# sign at bit 15: two shifts, an and, a lop3 ((a & mask) | b) per bf16x2; then two exact multiplies, by
# 2^126 and by the scale (bf16 2^(s - 127), per byte). About three operations a value against
# ``_fp4_pair``'s seven plus the float32 -> bf16 conversion. $0,$1 the low nibbles' values (bytes 0,1 and
# 2,3), $2,$3 the high nibbles', $4 the four bytes, $5,$6 the low nibbles' scales, $7,$8 the high ones'.
def _fp4_bf16_ptx(registers: str, decode: str, fold: bool) -> str:
    """A bf16 decode's PTX: ``decode`` (integer operations only, using the scratch ``registers``) leaves
    code value * 2^-126 in $0..$3; then the two exact multiplies, by 2^126 unless ``fold`` (the 2^126 is
    already in the scales: bf16 ``2^(s - 1)``, ``_e8m0_bf16_folded``; one multiply a value fewer, the same
    exact result, valid where every scale exponent is at most 128, ``Mxfp4Weight.small_scales``) and by
    the scales $5..$8."""
    times_2_126 = "" if fold else """mov.b32 two126, 0x7E807E80;
mul.rn.bf16x2 $0, $0, two126; mul.rn.bf16x2 $1, $1, two126;
mul.rn.bf16x2 $2, $2, two126; mul.rn.bf16x2 $3, $3, two126;
"""
    return ("\n{\n.reg .b32 " + registers + ", two126;\n" + decode + times_2_126
            + "mul.rn.bf16x2 $0, $0, $5; mul.rn.bf16x2 $1, $1, $6;\n"
            + "mul.rn.bf16x2 $2, $2, $7; mul.rn.bf16x2 $3, $3, $8;\n}\n")


def _fp4_bf16_asm(fold: bool) -> str:
    """The PTX of ``_fp4_pair_bf16`` (``fold`` as in ``_fp4_bf16_ptx``)."""
    return _fp4_bf16_ptx("t0, t1, a, b", """prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shl.b32 a, t0, 6; shl.b32 b, t0, 12; and.b32 b, b, 0x80008000; lop3.b32 $0, a, 0x01C001C0, b, 0xEA;
shl.b32 a, t1, 6; shl.b32 b, t1, 12; and.b32 b, b, 0x80008000; lop3.b32 $1, a, 0x01C001C0, b, 0xEA;
shl.b32 a, t0, 2; shl.b32 b, t0, 8; and.b32 b, b, 0x80008000; lop3.b32 $2, a, 0x01C001C0, b, 0xEA;
shl.b32 a, t1, 2; shl.b32 b, t1, 8; and.b32 b, b, 0x80008000; lop3.b32 $3, a, 0x01C001C0, b, 0xEA;
""", fold)


def _fp4_bf16_packed_asm(fold: bool) -> str:
    """``_fp4_bf16_asm`` for a fragment-packed word (``mxfp4.pack_fragments``): the same four outputs,
    each the word rotated and masked, magnitudes and signs by their own rotations where these differ
    (``FRAGMENT_*_ROTATION``): five rotations and six masks for eight values, no byte permute. $0..$3,
    $5..$8 as there; $4 the packed word."""
    magnitude, sign = FRAGMENT_MAGNITUDE_ROTATION, FRAGMENT_SIGN_ROTATION

    def rotated(reg: str, by: int) -> str:
        return f"shf.r.wrap.b32 {reg}, $4, $4, {by};\n" if by else f"mov.b32 {reg}, $4;\n"

    body = ""
    for j in range(4):
        if magnitude[j] == sign[j]:
            body += rotated("m", magnitude[j]) + f"and.b32 ${j}, m, 0x81C081C0;\n"
        else:
            body += (rotated("m", magnitude[j]) + rotated("s", sign[j]) + "and.b32 s, s, 0x80008000;\n"
                     + f"lop3.b32 ${j}, m, 0x01C001C0, s, 0xEA;\n")
    return _fp4_bf16_ptx("m, s", body, fold)


_FP4_BF16_ASM = tl.constexpr(_fp4_bf16_asm(fold=False))
_FP4_BF16_FOLDED_ASM = tl.constexpr(_fp4_bf16_asm(fold=True))
_FP4_BF16_PACKED_ASM = tl.constexpr(_fp4_bf16_packed_asm(fold=False))
_FP4_BF16_PACKED_FOLDED_ASM = tl.constexpr(_fp4_bf16_packed_asm(fold=True))


@triton.jit
def _e8m0_bf16_folded(s):
    """E8M0 exponents (uint8, at most 128) as bf16 ``2^(s - 1)``: the scale times the 2^126 of the bit
    decode (exponent field s + 126; s = 0, the subnormal 2^-127, gives 2^-1 as it should)."""
    return ((s.to(tl.int32) + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e8m0_bf16(s):
    """E8M0 exponents (uint8) as bf16 ``2^(s - 127)``, from bits (s = 0 is the subnormal 2^-127)."""
    return tl.where(s == 0, 0x40, s.to(tl.int32) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fp4_pair_bf16(codes, scale_lo, scale_hi, FOLD: tl.constexpr = False, PACKED: tl.constexpr = False):
    """``_fp4_pair`` for bf16 MMAs, compiled only: ``codes`` uint8 bytes, ``scale_lo``/``scale_hi`` the bf16
    scales of their low and high nibbles (``_e8m0_bf16``, or ``_e8m0_bf16_folded`` with ``FOLD``; same
    shape, convert before broadcasting a scale over its bytes; the same tensor twice but for row-paired
    codes); the low and high nibbles' values as bf16, exactly (products of a power of two). ``PACKED``:
    the codes are fragment-packed (``mxfp4.pack_fragments``) and each four consecutive bytes of a thread
    are one packed word, as the swapped product's operand layout groups them; the values returned are
    those of the row-paired bytes."""
    if PACKED:
        if FOLD:
            return tl.inline_asm_elementwise(_FP4_BF16_PACKED_FOLDED_ASM, "=r,=r,=r,=r,r,r,r,r,r",
                                             [codes, scale_lo, scale_hi], dtype=(tl.bfloat16, tl.bfloat16),
                                             is_pure=True, pack=4)
        return tl.inline_asm_elementwise(_FP4_BF16_PACKED_ASM, "=r,=r,=r,=r,r,r,r,r,r", [codes, scale_lo, scale_hi],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    if FOLD:
        return tl.inline_asm_elementwise(_FP4_BF16_FOLDED_ASM, "=r,=r,=r,=r,r,r,r,r,r", [codes, scale_lo, scale_hi],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    return tl.inline_asm_elementwise(_FP4_BF16_ASM, "=r,=r,=r,=r,r,r,r,r,r", [codes, scale_lo, scale_hi],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _row_pair_split(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``t [ROWS, COLS]`` (ROWS a multiple of 16) -> (its rows 16g + i, its rows 16g + 8 + i), each
    ``[ROWS / 16, 8, COLS]``, i < 8."""
    t4 = tl.permute(tl.reshape(t, (ROWS // 16, 2, 8, COLS)), (0, 2, 3, 1))  # [G, i, c, h]
    return tl.split(t4)


@triton.jit
def _row_pair_join(top, bottom, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The inverse of ``_row_pair_split``."""
    return tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (ROWS, COLS))


@triton.jit
def _row_pair_scales(scale, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Row-paired codes (``mxfp4.pair_rows``): a byte of tile row 16g + 8h + i holds values of row
    16g + i (low nibble) and 16g + 8 + i (high); the per-byte scales ``[ROWS, COLS]`` for each nibble."""
    top, bottom = _row_pair_split(scale, ROWS, COLS)
    return _row_pair_join(top, top, ROWS, COLS), _row_pair_join(bottom, bottom, ROWS, COLS)


@triton.jit
def _row_paired_operand(lo, hi, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[ROWS, BLOCK_K]`` weight tile from row-paired values (``lo``/``hi`` ``[ROWS, BLOCK_K/2]``, the
    low and high nibbles' values of each byte): ``w[16g + i, 2c + h] = lo[16g + 8h + i, c]`` and
    ``w[16g + 8 + i, 2c + h] = hi[16g + 8h + i, c]``. Two consecutive k of a row come from one register
    of the decode: no data moves."""
    lo4 = tl.reshape(lo, (ROWS // 16, 2, 8, BLOCK_K // 2))  # [G, h, i, c]
    hi4 = tl.reshape(hi, (ROWS // 16, 2, 8, BLOCK_K // 2))
    w = tl.permute(tl.join(lo4, hi4), (0, 4, 2, 3, 1))  # [G, lo/hi (row + 8), i, c, h]
    return tl.reshape(w, (ROWS, BLOCK_K))


@triton.jit
def _unpair_rows(codes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Row-paired codes ``[ROWS, COLS]`` back to the natural pairing (``mxfp4.pair_rows``, its own inverse)."""
    top, bottom = _row_pair_split(codes, ROWS, COLS)
    new_top = (top & 0x0F) | ((bottom & 0x0F) << 4)
    new_bottom = (top >> 4) | (bottom & 0xF0)
    return _row_pair_join(new_top, new_bottom, ROWS, COLS)


@triton.jit
def _e8m0_scale(s):
    """E8M0 exponents (uint8) as float32 ``2^(s - 127)``, from bits (s = 0 is the subnormal 2^-127)."""
    s = s.to(tl.int32)
    return tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)


@triton.jit
def _activation(gate, up, alpha, limit, ACT: tl.constexpr):
    """The gated activation in float32: silu(gate) * up (``ACT`` 0), or GPT-OSS's clamped SwiGLU (1)."""
    if ACT == 0:
        act = gate / (1.0 + tl.exp(-gate)) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))
    return act


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b; float32 inputs at full precision (not TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _expert_gemm(
    a_rows, a_ok, stride_ak, w_base, s_base, w_rows, w_ok, K, k_begin, k_end, stride_wn, stride_wk, stride_sn,
    BLOCK_M: tl.constexpr, NW: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr, SCALED_DOT: tl.constexpr,
    IEEE: tl.constexpr, SWAP_AB: tl.constexpr, BF16_ASM: tl.constexpr, SWIZZLED: tl.constexpr, FOLD: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_PAIRED: tl.constexpr,
):
    """acc [BLOCK_M, NW] = A[rows] @ W[w_rows]^T over k in [k_begin, k_end) (k_begin a multiple of
    BLOCK_K; K bounds the loads), float32.

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
    narrow weights are usually arranged on Hopper. Returned transposed back to [BLOCK_M, NW].

    ``SWIZZLED`` (MXFP4, BLOCK_K a multiple of 64): the codes are stored K-swizzled (``mxfp4.swizzle_k``);
    each tile is loaded as stored (contiguous) and put back in logical order in registers
    (``_unswizzle_k``), which for the swapped product is where the MMA wants the bytes anyway.

    ``ROW_PAIRED`` (MXFP4, ``mxfp4.pair_rows``; ``CODES_*``): the tile's rows 16g + i and 16g + 8 + i (i < 8)
    are the weight's rows R and R + 8 of one aligned 16 (the callers keep this). The swapped product
    decodes them as they are (``_row_paired_operand``); the other one pairs the nibbles back first.
    ``CODES_FRAGMENT_PACKED`` (2): row-paired and fragment-packed, read by the swapped product's sm_90
    decode only (``BF16_ASM``; the launcher refuses the others)."""
    if MXFP4 and SWAP_AB:
        return _expert_gemm_swapped(a_rows, a_ok, stride_ak, w_base, s_base, w_rows, K, k_begin, k_end,
                                    stride_wn, stride_sn, BLOCK_M, NW, BLOCK_K, IEEE, BF16_ASM, SWIZZLED, FOLD,
                                    EVEN_K, ROW_PAIRED)
    acc = tl.zeros((BLOCK_M, NW), dtype=tl.float32)
    w_ptrs = w_base + w_rows[None, :].to(tl.int64) * stride_wn  # [1, NW]
    w_ok = w_ok[None, :]  # [1, NW]
    for k0 in range(k_begin, k_end, BLOCK_K):
        if MXFP4:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds k = 2j (low nibble), 2j + 1 (high)
            kb_ok = kb < K // 2
            codes = tl.load(w_ptrs + kb[:, None], mask=kb_ok[:, None] & w_ok, other=0)  # [BLOCK_K/2, NW]
            if ROW_PAIRED:
                codes = tl.trans(_unpair_rows(tl.trans(codes), NW, BLOCK_K // 2))
            if SWIZZLED:  # spans are whole in a tile (k0, K multiples of 64): the mask is the same
                codes = tl.trans(_unswizzle_k(tl.trans(codes), NW, BLOCK_K))
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
                s_ptrs = s_base + w_rows[None, :].to(tl.int64) * stride_sn + (kb // 16)[:, None]
                s = tl.load(s_ptrs, mask=kb_ok[:, None] & w_ok, other=127)  # [BLOCK_K/2, NW]
                if BF16_ASM:
                    scale = _e8m0_bf16(s)
                    lo, hi = _fp4_pair_bf16(codes, scale, scale)
                else:
                    scale = _e8m0_scale(s)
                    lo, hi = _fp4_pair(codes.to(tl.int32), scale, scale)  # even k, odd k
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
def _unswizzle_k(codes, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """A K-swizzled tile of codes ``[ROWS, BLOCK_K/2]`` (as stored) in logical byte order: within each
    32-byte span, position ``8c + i`` holds logical byte ``4i + c``. A reshape and a transpose: for the
    swapped MMA operand the compiler lays the stored tile out so that this moves no data."""
    codes = tl.reshape(codes, (ROWS, BLOCK_K // 64, 4, 8))
    return tl.reshape(tl.permute(codes, (0, 1, 3, 2)), (ROWS, BLOCK_K // 2))


@triton.jit
def _scales_and_activations(s_ptrs, a_rows, a_ok, stride_ak, K, k0, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The swapped GEMM's scales ``[NW, BLOCK_K/32]`` (``s_ptrs`` [NW, 1]) and activations ``[BLOCK_K,
    BLOCK_M]`` (``a_rows`` [BLOCK_M]) for the K chunk at ``k0``; masked past K unless ``EVEN_K``."""
    ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    kk = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        s = tl.load(s_ptrs + ks[None, :])
        a = tl.load(a_rows[None, :] + kk[:, None] * stride_ak, mask=a_ok[None, :], other=0.0)
    else:
        s = tl.load(s_ptrs + ks[None, :], mask=(ks < K // 32)[None, :], other=127)
        a = tl.load(a_rows[None, :] + kk[:, None] * stride_ak, mask=(kk < K)[:, None] & a_ok[None, :], other=0.0)
    return s, a


@triton.jit
def _expert_gemm_swapped(
    a_rows, a_ok, stride_ak, w_base, s_base, w_rows, K, k_begin, k_end, stride_wn, stride_sn,
    BLOCK_M: tl.constexpr, NW: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, BF16_ASM: tl.constexpr,
    SWIZZLED: tl.constexpr, FOLD: tl.constexpr, EVEN_K: tl.constexpr, ROW_PAIRED: tl.constexpr,
):
    """``_expert_gemm`` for MXFP4 weights with the operands swapped (see its ``SWAP_AB``): each byte's
    two values are joined back into k order (even, odd), one ``[NW, BLOCK_K]`` operand per MMA.

    Weight loads are unmasked along rows (the callers clamp columns past N to row 0, whose products are
    never stored) and, with ``EVEN_K`` (K a multiple of BLOCK_K), along K too; the activation rows stay
    masked (a decode block holds one real pair in 16 rows: unmasked, each step loads up to 16x the
    activations; measured on an H200 at GPT-OSS-120B's shapes, 16-28% slower at 1-64 tokens). ``FOLD``
    (``Mxfp4Weight.small_scales``): the decode's 2^126 is folded into the scales."""
    acc_t = tl.zeros((NW, BLOCK_M), dtype=tl.float32)
    w_ptrs = w_base + w_rows[:, None].to(tl.int64) * stride_wn  # [NW, 1]
    s_ptrs = s_base + w_rows[:, None].to(tl.int64) * stride_sn  # [NW, 1]
    # The scales and activations are loaded one step ahead, into registers: Triton pipelines the codes
    # (cp.async, 16 bytes a thread) but not these narrow loads (a byte or two a thread), whose global
    # latency each step otherwise waited out.
    s_next, a_next = _scales_and_activations(s_ptrs, a_rows, a_ok, stride_ak, K, k_begin, BLOCK_K, EVEN_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        s = s_next
        a = a_next
        if EVEN_K:  # the last step fetches its own chunk again: in range, no masks
            k_ahead = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
        else:  # past K the masks give nothing; between a split's end and K the bytes are in range
            k_ahead = k0 + BLOCK_K
        s_next, a_next = _scales_and_activations(s_ptrs, a_rows, a_ok, stride_ak, K, k_ahead, BLOCK_K, EVEN_K)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds k = 2j (low nibble), 2j + 1 (high)
        if EVEN_K:
            codes = tl.load(w_ptrs + kb[None, :])  # uint8 [NW, BK/2]
        else:
            codes = tl.load(w_ptrs + kb[None, :], mask=(kb < K // 2)[None, :], other=0)
        if SWIZZLED:
            codes = _unswizzle_k(codes, NW, BLOCK_K)
        # [NW, BK/32], converted once per 16 bytes, then one per byte
        if BF16_ASM and FOLD:
            scale = _e8m0_bf16_folded(s)
        elif BF16_ASM:
            scale = _e8m0_bf16(s)
        else:
            scale = _e8m0_scale(s)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (NW, BLOCK_K // 32, 16)), (NW, BLOCK_K // 2))
        if ROW_PAIRED:  # a byte's two nibbles belong to rows r and r + 8
            scale_lo, scale_hi = _row_pair_scales(scale, NW, BLOCK_K // 2)
        else:
            scale_lo, scale_hi = scale, scale
        if BF16_ASM:
            lo, hi = _fp4_pair_bf16(codes, scale_lo, scale_hi, FOLD, ROW_PAIRED == 2)  # CODES_FRAGMENT_PACKED
        else:
            lo, hi = _fp4_pair(codes.to(tl.int32), scale_lo, scale_hi)
        if ROW_PAIRED:
            w = _row_paired_operand(lo.to(a.dtype), hi.to(a.dtype), NW, BLOCK_K)
        else:
            w = tl.reshape(tl.join(lo.to(a.dtype), hi.to(a.dtype)), (NW, BLOCK_K))  # k = 2j, 2j + 1
        acc_t = _dot(w, a, acc_t, IEEE)
    return tl.trans(acc_t)


@triton.jit
def _block_coords(num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row block, column block, split), row blocks walked ``GROUP_M`` at a time; the
    grid is ``SPLIT_K`` copies of the (row block x column block) grid, split-major."""
    num_n = tl.cdiv(N, BLOCK_N)
    per_split = num_m_blocks * num_n
    split = tl.program_id(0) // per_split
    pid = tl.program_id(0) % per_split
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n, split


@triton.jit
def _split_range(split, K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The reduction range [k_begin, k_end) of split ``split`` of ``SPLIT_K`` (whole BLOCK_K chunks)."""
    if SPLIT_K == 1:
        return 0, K
    chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = split * chunk
    return k_begin, tl.minimum(K, k_begin + chunk)


@triton.jit
def _program_rows(pid_m, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_experts,
                  BLOCK_M: tl.constexpr, DIRECT: tl.constexpr):
    """(expert, pairs [BLOCK_M], live) of row block ``pid_m``. ``DIRECT``: block b is pair b alone
    (``block_expert_ptr`` is the flat ``topk_ids``; out-of-range ids give expert -1); else the
    ``moe_align`` layout, and ``live`` is False for a block past ``num_padded``."""
    if DIRECT:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        expert = tl.where((expert >= 0) & (expert < num_experts), expert, -1)
        pairs = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
        live = pid_m < num_pairs
    else:
        live = pid_m * BLOCK_M < tl.load(num_padded_ptr)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, pairs, live


# The counts that move with the batch's token count are not specialized (Triton's default makes a variant
# per value-is-1 and per divisibility by 16): the start-up warm-up runs power-of-two token counts, and a
# variant first met mid-serving costs its compile (about 2 s a kernel on an H200 host) in the TTFT of
# every request in that step.
@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def _moe_up_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, top_k, num_m_blocks, num_experts, H, I, alpha, limit,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_be, stride_om,
    ACT: tl.constexpr, MXFP4: tl.constexpr, SCALED_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, BF16_ASM: tl.constexpr, SWIZZLED: tl.constexpr, DIRECT: tl.constexpr,
    FOLD: tl.constexpr, EVEN_K: tl.constexpr, ROW_PAIRED: tl.constexpr,
):
    """``SPLIT_K > 1``: each split stores its float32 partial product (gate and up interleaved, the bias
    added by split 0) to ``part_ptr`` ``[SPLIT_K, num_pairs, 2I]``; ``_moe_up_finish_kernel`` sums the
    splits and applies the activation."""
    pid_m, pid_n, split = _block_coords(num_m_blocks, I, BLOCK_N, GROUP_M)
    expert, pairs, live = _program_rows(pid_m, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_experts,
                                        BLOCK_M, DIRECT)  # pairs [BLOCK_M]
    if not live:
        return
    pair_ok = pairs < num_pairs
    if expert < 0:  # pairs of experts held elsewhere: the down kernel writes their zeros
        if SPLIT_K > 1:  # and the finish kernel activates these partials: zeros, not what the buffer held
            pc = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # this program's interleaved columns
            part = part_ptr + (split * num_pairs + pairs.to(tl.int64))[:, None] * (2 * I) + pc[None, :]
            tl.store(part, tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32),
                     mask=pair_ok[:, None] & (pc < 2 * I)[None, :])
        return
    a_rows = x_ptr + (tl.where(pair_ok, pairs, 0) // top_k).to(tl.int64) * stride_xm  # [BLOCK_M] token rows
    # weight rows, gate and up interleaved: column j of the product is gate (j even) or up (j odd) of
    # intermediate column pid_n * BLOCK_N + j // 2; with silu and row-paired codes (whose pairs are rows
    # R, R + 8 of an aligned 16) in runs of 16 instead: gate of 16 columns, then up of the same 16
    j = tl.arange(0, 2 * BLOCK_N)
    if ACT == 0 and ROW_PAIRED:
        col = pid_n * BLOCK_N + (j // 32) * 16 + j % 16
        is_up = (j // 16) % 2
    else:
        col = pid_n * BLOCK_N + j // 2
        is_up = j % 2
    col_ok = col < I
    if ACT == 0:  # silu: gate rows [0, I), up rows [I, 2I)
        w_rows = col + is_up * I
    else:  # swiglu_oai: gate rows 2c, up rows 2c + 1
        w_rows = 2 * col + is_up
    w_rows = tl.where(col_ok, w_rows, 0)
    k_begin, k_end = _split_range(split, H, SPLIT_K, BLOCK_K)
    acc = _expert_gemm(a_rows, pair_ok, stride_xk, w_ptr + expert * stride_we, s_ptr + expert * stride_se,
                       w_rows, col_ok, H, k_begin, k_end, stride_wn, stride_wk, stride_sn,
                       BLOCK_M, 2 * BLOCK_N, BLOCK_K, MXFP4, SCALED_DOT, IEEE, SWAP_AB, BF16_ASM, SWIZZLED, FOLD, EVEN_K,
                       ROW_PAIRED)
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(b_ptr + expert * stride_be + w_rows).to(tl.float32)[None, :]
    if SPLIT_K > 1:
        pc = 2 * col + is_up  # interleaved column: 2c gate, 2c + 1 up
        part = part_ptr + (split * num_pairs + pairs.to(tl.int64))[:, None] * (2 * I) + pc[None, :]
        tl.store(part, acc, mask=pair_ok[:, None] & col_ok[None, :])
        return
    if ACT == 0 and ROW_PAIRED:  # [BLOCK_M, BLOCK_N / 16, gate/up, 16] -> [BLOCK_M, BLOCK_N, gate/up]
        acc = tl.permute(tl.reshape(acc, (BLOCK_M, BLOCK_N // 16, 2, 16)), (0, 1, 3, 2))
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # [BLOCK_M, BLOCK_N] each
    act = _activation(gate, up, alpha, limit, ACT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, act.to(out_ptr.dtype.element_ty), mask=pair_ok[:, None] & (cols < I)[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_up_finish_kernel(
    part_ptr, out_ptr, num_pairs, I, alpha, limit, stride_om,
    ACT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):
    """Split-K up GEMM, second pass: sum the ``SPLIT_K`` partials of one pair (grid: pairs x I / BLOCK)
    and apply the activation, as the up kernel does without a split."""
    pair = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        row = part_ptr + (split * num_pairs + pair) * (2 * I)
        gate += tl.load(row + 2 * cols, mask=ok, other=0.0)
        up += tl.load(row + 2 * cols + 1, mask=ok, other=0.0)
    act = _activation(gate, up, alpha, limit, ACT)
    tl.store(out_ptr + pair * stride_om + cols, act.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["num_tokens"])
def _moe_down_finish_kernel(part_ptr, out_ptr, num_tokens, top_k, H, stride_om,
                            SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """Split-K down GEMM, second pass: a token's output is the float32 sum of its choices' weighted
    partials over the splits (``part_ptr`` ``[SPLIT_K, T*K, H]``), rounded once (grid: T x H / BLOCK). One
    launch where torch needed a reduction and a cast."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(top_k):
        for split in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + ((split * num_tokens + token) * top_k + k) * H + cols, mask=ok, other=0.0)
    tl.store(out_ptr + token * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def _moe_down_kernel(
    a_ptr, w_ptr, s_ptr, b_ptr, tw_ptr, y_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_m_blocks, num_experts, H, I,
    stride_am, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_be, stride_ym,
    MXFP4: tl.constexpr, SCALED_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, BF16_ASM: tl.constexpr, SWIZZLED: tl.constexpr, DIRECT: tl.constexpr,
    FOLD: tl.constexpr, EVEN_K: tl.constexpr, ROW_PAIRED: tl.constexpr,
):
    """``SPLIT_K > 1``: ``y_ptr`` is float32 ``[SPLIT_K, num_pairs, H]``, one weighted partial per split
    (the bias in split 0's); the caller sums the splits with the choices."""
    pid_m, pid_n, split = _block_coords(num_m_blocks, H, BLOCK_N, GROUP_M)
    expert, pairs, live = _program_rows(pid_m, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_experts,
                                        BLOCK_M, DIRECT)  # pairs [BLOCK_M]
    if not live:
        return
    pair_ok = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    y = y_ptr + (split * num_pairs + pairs.to(tl.int64))[:, None] * stride_ym + cols[None, :]
    y_mask = pair_ok[:, None] & col_ok[None, :]
    if expert < 0:  # experts held elsewhere contribute nothing
        tl.store(y, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=y_mask)
        return
    a_rows = a_ptr + tl.where(pair_ok, pairs, 0).to(tl.int64) * stride_am  # [BLOCK_M] intermediate rows
    w_rows = tl.where(col_ok, cols, 0)
    k_begin, k_end = _split_range(split, I, SPLIT_K, BLOCK_K)
    acc = _expert_gemm(a_rows, pair_ok, 1, w_ptr + expert * stride_we, s_ptr + expert * stride_se,
                       w_rows, col_ok, I, k_begin, k_end, stride_wn, stride_wk, stride_sn,
                       BLOCK_M, BLOCK_N, BLOCK_K, MXFP4, SCALED_DOT, IEEE, SWAP_AB, BF16_ASM, SWIZZLED, FOLD, EVEN_K,
                       ROW_PAIRED)
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(b_ptr + expert * stride_be + w_rows).to(tl.float32)[None, :]
    weight = tl.load(tw_ptr + tl.where(pair_ok, pairs, 0)).to(tl.float32)  # [BLOCK_M]
    tl.store(y, (acc * weight[:, None]).to(y_ptr.dtype.element_ty), mask=y_mask)


def _weight_args(w, tile: TileConfig, rows_per_block: int):
    """(weight pointer tensor, scales tensor, stride_e, stride_n, stride_k, scale stride_e, stride_n, mxfp4,
    K-swizzled, scales small enough to fold the decode's 2^126 into them, the codes' arrangement
    (``CODES_*``)).

    ``rows_per_block``: the weight rows a program's tile spans, a multiple of ``ROW_PAIR_SPAN`` for
    row-paired codes (a tile's rows 16g + i and 16g + 8 + i must be the weight's rows R and R + 8 of an
    aligned 16)."""
    if isinstance(w, Mxfp4Weight):
        blocks, scales = w.blocks, w.scales
        if blocks.stride(3) != 1 or blocks.stride(2) != 16 or scales.stride(2) != 1:
            raise ValueError("MXFP4 blocks must be contiguous along K (strides [.., .., 16, 1]) and scales too")
        if w.k_swizzled and tile.block_k % 64:
            raise ValueError(f"K-swizzled MXFP4 weights need block_k a multiple of 64, got {tile.block_k}")
        if w.row_paired and rows_per_block % ROW_PAIR_SPAN:
            raise ValueError(f"row-paired MXFP4 weights need {rows_per_block} rows a program to be a multiple of "
                             f"{ROW_PAIR_SPAN} (block_n {tile.block_n})")
        arrangement = (CODES_FRAGMENT_PACKED if w.fragment_packed else CODES_ROW_PAIRED if w.row_paired
                       else CODES_NATURAL)
        return (blocks, scales, blocks.stride(0), blocks.stride(1), 1, scales.stride(0), scales.stride(1), True,
                w.k_swizzled, w.small_scales, arrangement)
    return w, w, w.stride(0), w.stride(1), w.stride(2), 0, 0, False, False, False, CODES_NATURAL


def packed_tiling_ok(rows_per_program: int, num_warps: int) -> bool:
    """Whether a swapped tiling reads fragment-packed codes right: Triton then multiplies with wgmma (at
    least 64 weight rows, whole warpgroups), whose register operand groups each thread's bytes (r, c),
    (r + 8, c), (r, c + 4), (r + 8, c + 4) into one word, as ``mxfp4.pack_fragments`` packs them. Smaller
    tilings use the older MMA, which groups (r, c), (r + 8, c), (r, c + 1), (r + 8, c + 1)
    (tests/runtime/kernels/test_fused_moe.py compiles both kinds and checks)."""
    return rows_per_program >= 64 and num_warps % 4 == 0


def _check_packed_readable(w, swap_ab: bool, bf16_asm: bool, rows_per_program: int, tile: TileConfig) -> None:
    """Fragment-packed codes are read by the swapped product's sm_90 decode only, with wgmma tilings."""
    if not (isinstance(w, Mxfp4Weight) and w.fragment_packed):
        return
    if not (swap_ab and bf16_asm):
        raise ValueError("fragment-packed MXFP4 weights (mxfp4.pack_fragments) need the swapped product "
                         "(swap_ab) and the sm_90 bf16 decode (bf16 activations on a compiled sm_90 GPU); "
                         "use Mxfp4Weight.swizzled(pack=False) elsewhere")
    if not packed_tiling_ok(rows_per_program, tile.num_warps):
        raise ValueError(f"fragment-packed MXFP4 weights need tiles of at least 64 weight rows and a multiple of "
                         f"4 warps (got {rows_per_program} rows, {tile.num_warps} warps: {tile.short()})")


def _gluon_module():
    """``fused_moe_gluon`` where it can run (``USE_GLUON``, Triton's Gluon importable), else None."""
    if not USE_GLUON:
        return None
    try:
        from plait.runtime.kernels import fused_moe_gluon
    except ImportError:  # a Triton without Gluon's Hopper support
        return None
    return fused_moe_gluon


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
    num_pairs = T * K
    direct = num_pairs <= DIRECT_MAX_PAIRS
    if direct:  # one row block per pair: no alignment pass (see DIRECT_MAX_PAIRS)
        ids = topk_ids.reshape(-1)
        sorted_ids = block_expert = num_padded = ids if ids.is_contiguous() else ids.contiguous()
        num_m_blocks = num_pairs
    else:
        sorted_ids, block_expert, num_padded = moe_align(topk_ids, E, bm)
        num_m_blocks = block_expert.shape[0]
    inter = torch.empty(num_pairs, I, dtype=x.dtype, device=x.device)  # [T*K, I], row per pair
    up: TileConfig = config.up
    down: TileConfig = config.down
    ieee = x.dtype == torch.float32
    compiled = os.environ.get("TRITON_INTERPRET") != "1" and x.is_cuda
    scaled_dot = x.dtype == torch.bfloat16 and config.scaled_dot and compiled
    bf16_asm = sm90_bf16_decode(x.device, x.dtype)
    tw = topk_weights.reshape(-1).contiguous()  # [T*K]
    b13 = b13.contiguous() if b13 is not None else None  # the kernels index biases with unit stride
    b2 = b2.contiguous() if b2 is not None else None

    _check_packed_readable(w13, config.swap_ab, bf16_asm, 2 * up.block_n, up)
    _check_packed_readable(w2, config.swap_ab, bf16_asm, down.block_n, down)
    gluon = _gluon_module() if config.swap_ab and bf16_asm else None
    # float32 partial sums (split K, or the Gluon GEMM): summed (and, for up, activated) by a finish kernel
    gluon_up = gluon is not None and gluon.usable(x, w13, up.block_k, H, 2 * up.block_n, bm)
    up_partial = gluon_up or up.split_k > 1
    part = (torch.empty(up.split_k, num_pairs, 2 * I, dtype=torch.float32, device=x.device) if up_partial
            else inter)
    if gluon_up:
        gluon.gemm(x, w13, b13, None, part, sorted_ids, block_expert, num_padded, num_pairs=num_pairs, row_div=K,
                   num_m_blocks=num_m_blocks, N=2 * I, I=I, up=True, silu=activation == "silu", direct=direct,
                   block_m=bm, nw=2 * up.block_n, block_k=up.block_k, split_k=up.split_k)
    else:
        # row-paired gate/up rows: swiglu_oai interleaves them (2 * block_n rows from an even row); silu
        # takes runs of 16 gate rows and 16 up rows (its up half starts at row I, a multiple of 32: the
        # reduction size of MXFP4's down weight)
        w, s, swe, swn, swk, sse, ssn, mx, swz, fold, paired = _weight_args(
            w13, up, up.block_n if activation == "silu" else 2 * up.block_n)
        _moe_up_kernel[(up.split_k * num_m_blocks * triton.cdiv(I, up.block_n),)](
            x, w, s, b13 if b13 is not None else x, inter, part, sorted_ids, block_expert, num_padded,
            num_pairs, K, num_m_blocks, E, H, I, swiglu_alpha, swiglu_limit,
            x.stride(0), x.stride(1), swe, swn, swk, sse, ssn, b13.stride(0) if b13 is not None else 0,
            inter.stride(0), ACT=0 if activation == "silu" else 1, MXFP4=mx,
            SCALED_DOT=mx and scaled_dot and up.block_k >= 64, HAS_BIAS=b13 is not None, IEEE=ieee,
            SWAP_AB=mx and config.swap_ab, BLOCK_M=bm, BLOCK_N=up.block_n, BLOCK_K=up.block_k,
            GROUP_M=config.group_m, SPLIT_K=up.split_k, BF16_ASM=bf16_asm, SWIZZLED=swz, DIRECT=direct,
            FOLD=fold and bf16_asm, EVEN_K=H % up.block_k == 0, ROW_PAIRED=paired, **up.launch_options(compiled),
        )
    if up_partial:
        _moe_up_finish_kernel[(num_pairs, triton.cdiv(I, 256))](
            part, inter, num_pairs, I, swiglu_alpha, swiglu_limit, inter.stride(0),
            ACT=0 if activation == "silu" else 1, SPLIT_K=up.split_k, BLOCK=256,
        )
    gluon_down = gluon is not None and gluon.usable(x, w2, down.block_k, I, down.block_n, bm)
    down_partial = gluon_down or down.split_k > 1
    # [T*K, H], row per pair; partial sums: float32 [split, T*K, H]
    y = (torch.empty(down.split_k, num_pairs, H, dtype=torch.float32, device=x.device) if down_partial
         else torch.empty(num_pairs, H, dtype=x.dtype, device=x.device))
    if gluon_down:
        gluon.gemm(inter, w2, b2, tw, y, sorted_ids, block_expert, num_padded, num_pairs=num_pairs, row_div=1,
                   num_m_blocks=num_m_blocks, N=H, I=I, up=False, silu=False, direct=direct, block_m=bm,
                   nw=down.block_n, block_k=down.block_k, split_k=down.split_k)
    else:
        w, s, swe, swn, swk, sse, ssn, mx, swz, fold, paired = _weight_args(w2, down, down.block_n)
        _moe_down_kernel[(down.split_k * num_m_blocks * triton.cdiv(H, down.block_n),)](
            inter, w, s, b2 if b2 is not None else x, tw, y, sorted_ids, block_expert, num_padded,
            num_pairs, num_m_blocks, E, H, I,
            inter.stride(0), swe, swn, swk, sse, ssn, b2.stride(0) if b2 is not None else 0, y.stride(-2),
            MXFP4=mx, SCALED_DOT=mx and scaled_dot and down.block_k >= 64, HAS_BIAS=b2 is not None, IEEE=ieee,
            SWAP_AB=mx and config.swap_ab,
            BLOCK_M=bm, BLOCK_N=down.block_n, BLOCK_K=down.block_k, GROUP_M=config.group_m, SPLIT_K=down.split_k,
            BF16_ASM=bf16_asm, SWIZZLED=swz, DIRECT=direct, FOLD=fold and bf16_asm, EVEN_K=I % down.block_k == 0,
            ROW_PAIRED=paired, **down.launch_options(compiled),
        )
    if down_partial:  # the splits and the choices in one float32 sum, rounded once
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)
        _moe_down_finish_kernel[(T, triton.cdiv(H, 1024))](y, out, T, K, H, out.stride(0),
                                                           SPLIT_K=down.split_k, BLOCK=1024)
        return out
    if K == 1:
        return y
    return y.view(T, K, H).sum(dim=1)  # float32 accumulation inside torch's reduction
