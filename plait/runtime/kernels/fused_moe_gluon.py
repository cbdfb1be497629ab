"""The fused MoE's MXFP4 expert GEMM at decode sizes, in Gluon (Triton's explicit-layout dialect; Hopper).

Why a second implementation of one GEMM: at decode sizes the swapped Triton kernel
(``fused_moe_triton._expert_gemm_swapped``) is bound by its integer instructions, ~10 a weight byte, most
of them the FP4 decode and the byte permutes that put each byte's two values next to each other for the
MMA. A decode of whole 32-bit words needs none of those permutes (``_WORD_ASM``: register i of a word
packs nibbles i and i + 4, which one shift each puts in place), but its values then reach the MMA in
an order Triton's layout inference cannot follow (it routes the tile through shared memory). Here the
layouts are stated: each lane loads two adjacent words of a row, decodes them in registers, and the
result *is* its part of the wgmma register operand (``gl.convert_layout(..., assert_trivial=True)``
checks that no data moves). The reduction runs over k in the order the decode produces
(``_k_order``); the activations are gathered in that order when they are loaded.

One kernel computes ``part[split, pair, col] = sum_k W[expert, row(col), k] * A[pair's row, k]`` in
float32 (+ the bias in split 0, times the routing weight for the down GEMM); the Triton finish kernels
then apply the activation (up) or sum splits and choices (down). Requirements (``usable``): bf16
activations, K-swizzled MXFP4 codes with ``small_scales`` (the folded decode), not row-paired, K a multiple of
BLOCK_K, BLOCK_K a multiple of 64, an sm_90 GPU.

Status: correct (the GPU tests run it) but off (``fused_moe_triton.USE_GLUON``). At 128 weight rows
and BLOCK_K 64 its K step is 278 instructions against 340 for the Triton kernel (sm_90 SASS: 8.7
against 10.6 a weight byte; the decode alone about 5 against 7.6), yet on an H200 at GPT-OSS-120B's
shapes the whole MoE call is 12-16% slower at T = 4-256 (T=64: 946-957 us against 821-827 on the same
table). Nsight Compute at T=64: issue slots 54-58% busy, and a third of the gaps between a warp's
instructions are waits at the CTA barrier (the activation tile's store before each MMA); the loads are
prefetched one tile ahead in registers only, and each MMA is waited for at once. Loading three tiles
ahead in registers instead made it slower still (T=64: 1,053 us; 123 registers a thread at 64 rows,
four programs an SM). What should make it win: the activation tiles copied to shared memory
asynchronously (``async_copy``, several tiles ahead, with mbarriers) instead of through registers and a
barrier each step, the codes likewise, and MMAs left in flight (``warpgroup_mma(..., is_async=True)``
with ``warpgroup_mma_wait``).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

NUM_WARPS = 4  # one warpgroup a program

# A 32-bit word of E2M1 codes (nibble v at bits 4v..4v+3) -> eight bf16 values. Register r_i packs
# nibbles i (low half) and i + 4 (high half): one shift puts both magnitudes (e1 e0 m) at bf16 bits
# 8..6 of their halves (code value * 2^-126, e = 0 on the subnormals), another both signs at bits 15
# and 31; one multiply by the folded scale (bf16 2^(s - 1), exact for s <= 128). Five operations per
# two values, no byte permute. $0..$7: nibbles 0, 1, 2, 3 (r_i low halves), then 4, 5, 6, 7; $8 the
# word, $9 its scale.
_WORD_ASM = gl.constexpr("""
{
.reg .b32 m, s, r, sc;
mov.b32 sc, {$9, $9};
shl.b32 m, $8, 6; shl.b32 s, $8, 12; and.b32 s, s, 0x80008000; lop3.b32 r, m, 0x01C001C0, s, 0xEA;
mul.rn.bf16x2 r, r, sc; mov.b32 {$0, $4}, r;
shl.b32 m, $8, 2; shl.b32 s, $8, 8; and.b32 s, s, 0x80008000; lop3.b32 r, m, 0x01C001C0, s, 0xEA;
mul.rn.bf16x2 r, r, sc; mov.b32 {$1, $5}, r;
shr.b32 m, $8, 2; shl.b32 s, $8, 4; and.b32 s, s, 0x80008000; lop3.b32 r, m, 0x01C001C0, s, 0xEA;
mul.rn.bf16x2 r, r, sc; mov.b32 {$2, $6}, r;
shr.b32 m, $8, 6; and.b32 s, $8, 0x80008000; lop3.b32 r, m, 0x01C001C0, s, 0xEA;
mul.rn.bf16x2 r, r, sc; mov.b32 {$3, $7}, r;
}
""")


def usable(x: torch.Tensor, w, block_k: int, K: int, nw: int, block_m: int) -> bool:
    """Whether this kernel serves this GEMM (see the module docstring): ``nw`` weight rows a program (a
    multiple of 64: one warpgroup's MMA), ``block_m`` pairs (a multiple of 16)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.stride(-1) == 1 and getattr(w, "k_swizzled", False)
            and getattr(w, "small_scales", False) and not getattr(w, "row_paired", False) and block_k % 64 == 0 and K % block_k == 0
            and nw % 64 == 0 and nw <= 256 and block_m % 16 == 0 and block_m <= 64
            and torch.cuda.get_device_capability(x.device) == (9, 0))


def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


def layouts(NW: int, BK: int, BM: int):
    """(words layout [NW, BK/8], MMA accumulator layout [NW, BM], A operand layout [NW, BK], activation
    load layout [BK, BM], activation shared layout) for one warpgroup."""
    assert NW % 64 == 0 and BK % 64 == 0 and BM % 16 == 0
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BM, 16])
    dot_a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # words: word G = 8 span + 2c + w of a row; lane c of a quad holds words 2c, 2c + 1 (register w)
    regs = [[0, 1], [8, 0]] + [[0, 8 << j] for j in range(_log2(BK // 64))] + [[64 << j, 0] for j in range(_log2(NW // 64))]
    words = gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                       warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[NW, BK // 8])
    act = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1], warps_per_cta=[1, NUM_WARPS], order=[0, 1])
    act_smem = gl.NVMMASharedLayout.get_default_for([BK, BM], gl.bfloat16, transposed=True)
    return words, mma, dot_a, act, act_smem


@gluon.jit
def _k_order(BK: gl.constexpr, layout: gl.constexpr):
    """Logical k of each reduction position [BK]: position ``64 span + 16 i + 8 w + 2 c + h`` holds
    nibble ``i + 4h`` of word ``8 span + 2c + w``, whose byte is stored at ``8c + 4w + (i + 4h) // 2`` of
    the span; K-swizzled (stored ``8c' + j`` holds logical byte ``4j + c'``) that is logical byte
    ``4 (4w + (i + 4h) // 2) + c``."""
    kp = gl.arange(0, BK, layout=layout)
    r = kp % 64
    nib = r // 16 + 4 * (r % 2)
    w = (r // 8) % 2
    c = (r // 2) % 4
    byte = 4 * (4 * w + nib // 2) + c
    return 64 * (kp // 64) + 2 * byte + nib % 2


@gluon.jit
def _decode_tile(words, s, NW: gl.constexpr, BK: gl.constexpr, DOT_A: gl.constexpr):
    """Words [NW, BK/8] and their E8M0 scales (<= 128) -> the bf16 A operand [NW, BK] in ``_k_order``."""
    scale = ((s.to(gl.int32) + 126) << 7).to(gl.int16).to(gl.bfloat16, bitcast=True)  # 2^(s - 1)
    v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
        _WORD_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [words, scale], dtype=(gl.bfloat16, ) * 8, is_pure=True, pack=1)
    low = gl.join(gl.join(v0, v1), gl.join(v2, v3))  # [NW, G, 2 (i % 2), 2 (i // 2)]: nibbles i
    high = gl.join(gl.join(v4, v5), gl.join(v6, v7))  # nibbles i + 4
    regs = gl.join(low, high)  # [NW, G, 2, 2, 2 (h)]
    regs = gl.reshape(regs, [NW, BK // 64, 4, 2, 2, 2, 2])  # (span, c, w, i % 2, i // 2, h)
    w = gl.reshape(gl.permute(regs, [0, 1, 5, 4, 3, 2, 6]), [NW, BK])  # (span, i // 2, i % 2, w, c, h)
    return gl.convert_layout(w, DOT_A, assert_trivial=True)


@gluon.jit
def moe_mxfp4_gemm_kernel(
    a_ptr, w_ptr, s_ptr, b_ptr, tw_ptr, part_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, row_div, num_m_blocks, num_experts, N, I, K,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_be,
    UP: gl.constexpr, SILU: gl.constexpr, HAS_BIAS: gl.constexpr, DIRECT: gl.constexpr,
    BLOCK_M: gl.constexpr, NW: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr,
    WORDS: gl.constexpr, MMA: gl.constexpr, DOT_A: gl.constexpr, ACT: gl.constexpr, ACT_SMEM: gl.constexpr,
):
    """One program: NW output columns of one row block (``BLOCK_M`` pairs of one expert), one K split;
    float32 partial sums to ``part_ptr`` ``[SPLIT_K, num_pairs, N]``. ``UP``: N = 2I columns, gate and
    up interleaved (weight rows 2c / 2c + 1, or c / I + c with ``SILU``), A row = pair // row_div; else
    the down GEMM (A row = pair, weighted by ``tw_ptr``; pairs of experts held elsewhere get zeros)."""
    num_n = gl.cdiv(N, NW)
    per_split = num_m_blocks * num_n
    split = gl.program_id(0) // per_split
    pid = gl.program_id(0) % per_split
    pid_m = pid % num_m_blocks
    pid_n = pid // num_m_blocks

    cols_layout: gl.constexpr = gl.SliceLayout(1, MMA)
    pairs_layout: gl.constexpr = gl.SliceLayout(0, MMA)
    m_idx = gl.arange(0, BLOCK_M, layout=pairs_layout)
    if DIRECT:
        expert = gl.load(block_expert_ptr + pid_m).to(gl.int64)
        expert = gl.where((expert >= 0) & (expert < num_experts), expert, -1)
        pairs = gl.where(m_idx == 0, pid_m, num_pairs)
        live = pid_m < num_pairs
    else:
        live = pid_m * BLOCK_M < gl.load(num_padded_ptr)
        expert = gl.load(block_expert_ptr + pid_m).to(gl.int64)
        pairs = gl.load(sorted_ptr + pid_m * BLOCK_M + m_idx)
    if live:
        pair_ok = pairs < num_pairs
        cols = pid_n * NW + gl.arange(0, NW, layout=cols_layout)  # output columns
        col_ok = cols < N
        out = part_ptr + (split * num_pairs + gl.expand_dims(pairs.to(gl.int64), 0)) * N + gl.expand_dims(cols, 1)
        out_mask = gl.expand_dims(pair_ok, 0) & gl.expand_dims(col_ok, 1)  # [NW, BLOCK_M]
        if expert < 0:
            if not UP:
                gl.store(out, gl.zeros([NW, BLOCK_M], gl.float32, layout=MMA), mask=out_mask)
        else:
            chunk = gl.cdiv(gl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
            k_begin = split * chunk
            k_end = gl.minimum(K, k_begin + chunk)
            # weight rows of the output columns, in the words layout's row slice
            wcols = pid_n * NW + gl.arange(0, NW, layout=gl.SliceLayout(1, WORDS))
            wcols = gl.where(wcols < N, wcols, 0)
            if UP and SILU:
                wrows = wcols // 2 + (wcols % 2) * I
            else:
                wrows = wcols
            word = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, WORDS))
            group = 2 * (word // 8) + word % 2  # scale group of each word within the tile
            row_words = (w_ptr + expert * stride_we).to(gl.pointer_type(gl.int32)) \
                + gl.expand_dims(wrows.to(gl.int64) * (stride_wn // 4), 1)
            row_scales = s_ptr + expert * stride_se + gl.expand_dims(wrows.to(gl.int64) * stride_sn, 1)
            # activations [BLOCK_K, BLOCK_M], rows gathered in the decode's k order
            a_pairs = gl.convert_layout(pairs, gl.SliceLayout(0, ACT))
            a_ok = a_pairs < num_pairs
            a_rows = gl.where(a_ok, a_pairs, 0)
            if UP:
                a_rows = a_rows // row_div
            a_base = a_ptr + gl.expand_dims(a_rows.to(gl.int64) * stride_am, 0)
            a_mask = gl.expand_dims(a_ok, 0)
            k_order = gl.expand_dims(_k_order(BLOCK_K, gl.SliceLayout(1, ACT)), 1)
            # two activation buffers: a warp stores the next tile while others may still read this one
            a_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, BLOCK_M], ACT_SMEM)
            acc = gl.zeros([NW, BLOCK_M], gl.float32, layout=MMA)
            # one tile ahead in registers: the next tile's loads are in flight while this one decodes
            words = gl.load(row_words + gl.expand_dims(k_begin // 8 + word, 0))
            s = gl.load(row_scales + gl.expand_dims(k_begin // 32 + group, 0))
            a = gl.load(a_base + k_begin + k_order, mask=a_mask, other=0.0)
            for k0 in range(k_begin, k_end, BLOCK_K):
                k_next = gl.where(k0 + BLOCK_K < k_end, k0 + BLOCK_K, k0)
                words_next = gl.load(row_words + gl.expand_dims(k_next // 8 + word, 0))
                s_next = gl.load(row_scales + gl.expand_dims(k_next // 32 + group, 0))
                a_next = gl.load(a_base + k_next + k_order, mask=a_mask, other=0.0)
                w = _decode_tile(words, s, NW, BLOCK_K, DOT_A)
                a_smem = a_bufs.index(((k0 - k_begin) // BLOCK_K) % 2)
                a_smem.store(a)
                fence_async_shared()
                gl.thread_barrier()  # every warp's part of the tile is stored (and the MMA before last is done)
                acc = warpgroup_mma(w, a_smem, acc)
                words, s, a = words_next, s_next, a_next
            if HAS_BIAS:
                if split == 0:
                    brows = gl.where(col_ok, cols, 0)
                    if UP and SILU:
                        brows = brows // 2 + (brows % 2) * I
                    acc += gl.expand_dims(gl.load(b_ptr + expert * stride_be + brows).to(gl.float32), 1)
            if not UP:
                weight = gl.load(tw_ptr + gl.where(pair_ok, pairs, 0)).to(gl.float32)
                acc = acc * gl.expand_dims(weight, 0)
            gl.store(out, acc, mask=out_mask)


def gemm(a: torch.Tensor, w, bias: torch.Tensor | None, topk_weights: torch.Tensor | None, part: torch.Tensor,
         sorted_ids, block_expert, num_padded, *, num_pairs: int, row_div: int, num_m_blocks: int, N: int,
         I: int, up: bool, silu: bool, direct: bool, block_m: int, nw: int, block_k: int, split_k: int) -> None:
    """Launch ``moe_mxfp4_gemm_kernel`` (see it); ``part`` float32 ``[split_k, num_pairs, N]``."""
    blocks, scales = w.blocks, w.scales
    K = blocks.shape[2] * 32
    words_l, mma_l, dot_a_l, act_l, act_smem_l = layouts(nw, block_k, block_m)
    grid = (split_k * num_m_blocks * triton.cdiv(N, nw),)
    moe_mxfp4_gemm_kernel[grid](
        a, blocks, scales, bias if bias is not None else a, topk_weights if topk_weights is not None else a, part,
        sorted_ids, block_expert, num_padded, num_pairs, row_div, num_m_blocks, blocks.shape[0], N, I, K,
        a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
        bias.stride(0) if bias is not None else 0,
        UP=up, SILU=silu, HAS_BIAS=bias is not None, DIRECT=direct, BLOCK_M=block_m, NW=nw, BLOCK_K=block_k,
        SPLIT_K=split_k, WORDS=words_l, MMA=mma_l, DOT_A=dot_a_l, ACT=act_l, ACT_SMEM=act_smem_l,
        num_warps=NUM_WARPS,
    )
