"""extend_attention (Triton) vs extend_attention_ref (torch).

CPU (interpreter): small shapes in float32 and float16 (the interpreter's bf16 ``tl.dot`` is wrong in
Triton 3.6). GPU: Llama-3.1-8B shapes in bf16 vs the float32 reference, max abs diff < 2e-2 (bf16
rounding of P, V and the output, each ~4e-3 relative, on outputs of size <= ~1).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.extend_attention import extend_attention, extend_attention_ref  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_inputs(rows, H, KVH, D, dtype, device, *, table_dtype=torch.int64, seed=0):
    """rows: list of (prefix_len, extend_len). Returns the kernel's positional args and max_extend_len."""
    gen = torch.Generator().manual_seed(seed)
    B = len(rows)
    L = max(p + n for p, n in rows)
    R = B + 1
    num_slots = R * L + 3
    k_buf = torch.randn((num_slots + 1, KVH, D), generator=gen).to(dtype).to(device)
    v_buf = torch.randn((num_slots + 1, KVH, D), generator=gen).to(dtype).to(device)
    table = (torch.randperm(num_slots, generator=gen)[: R * L] + 1).reshape(R, L).to(table_dtype).to(device)
    req_rows = torch.randperm(R, generator=gen)[:B].to(device)
    ext = [n for _, n in rows]
    starts = [sum(ext[:i]) for i in range(B)]
    T = sum(ext)
    q = torch.randn((T, H, D), generator=gen).to(dtype).to(device)
    i32 = dict(dtype=torch.int32, device=device)
    meta = (torch.tensor(starts, **i32), torch.tensor([p for p, _ in rows], **i32), torch.tensor(ext, **i32))
    return (q, k_buf, v_buf, table, req_rows, *meta), max(ext)


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff < TOL[dtype], f"max abs diff {diff} >= {TOL[dtype]}"


# prefill without prefix, long prefix + chunk, decode-like rows, a row spanning several query blocks
ROWS = [(0, 5), (37, 20), (10, 1), (0, 1), (3, 40)]


@pytest.mark.parametrize("H,KVH,D", [(4, 4, 64), (8, 2, 64), (16, 2, 128), (6, 2, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_matches_reference(kernel_device, H, KVH, D, dtype):
    args, max_ext = make_inputs(ROWS, H, KVH, D, dtype, kernel_device)
    out = extend_attention(*args, D**-0.5, max_ext, block_m=16, block_n=16)
    check(out, extend_attention_ref(*args, D**-0.5), dtype)


def test_extend_strided_q_int32_table_poisoned_output(kernel_device):
    H, KVH, D = 8, 2, 64
    (q, *rest), max_ext = make_inputs(ROWS, H, KVH, D, torch.float32, kernel_device, table_dtype=torch.int32, seed=3)
    qkv = torch.randn((q.shape[0], H + 2 * KVH, D), device=kernel_device)
    qkv[:, :H] = q
    out = torch.full(q.shape, float("nan"), device=kernel_device)
    extend_attention(qkv[:, :H], *rest, D**-0.5, max_ext, out=out, block_m=16, block_n=32)
    check(out, extend_attention_ref(q, *rest, D**-0.5), torch.float32)


def test_extend_default_blocks_and_loose_max_len(kernel_device):
    """max_extend_len only bounds the grid: a larger value gives the same result."""
    args, max_ext = make_inputs([(70, 33), (0, 9)], 8, 4, 64, torch.float32, kernel_device, seed=4)
    out = extend_attention(*args, 0.125, max_ext + 50)
    check(out, extend_attention_ref(*args, 0.125), torch.float32)


def sinks_for(H, dtype, device, seed=9):
    """Sink logits large enough to take a visible share of the softmax mass (scores are ~N(0, 1))."""
    return (2.0 * torch.randn(H, generator=torch.Generator().manual_seed(seed))).to(dtype).to(device)


# prefixes longer than the windows, a prefill spanning several query blocks, a decode-like row
WINDOW_ROWS = [(0, 40), (37, 20), (70, 1), (5, 3), (50, 33)]


# (window, sinks, H, KVH, D): 16 = BLOCK_M = BLOCK_N, 20 = the 20-token extend's length
WINDOW_CASES = [
    (None, True, 4, 2, 64), (1, False, 4, 2, 64), (1, True, 4, 2, 64), (16, False, 4, 2, 64),
    (17, True, 4, 2, 64), (20, False, 4, 2, 64), (1000, True, 4, 2, 64), (17, False, 2, 2, 32),
]


@pytest.mark.parametrize("window,with_sinks,H,KVH,D", WINDOW_CASES)
def test_extend_window_sinks(kernel_device, window, with_sinks, H, KVH, D):
    args, max_ext = make_inputs(WINDOW_ROWS, H, KVH, D, torch.float32, kernel_device, seed=5)
    sinks = sinks_for(H, torch.float32, kernel_device) if with_sinks else None
    out = extend_attention(*args, D**-0.5, max_ext, block_m=16, block_n=16, sliding_window=window, sinks=sinks)
    check(out, extend_attention_ref(*args, D**-0.5, sliding_window=window, sinks=sinks), torch.float32)


def test_extend_window_fp16_sinks_default_blocks(kernel_device):
    """float16 with float16 sinks and the default blocks; window not a multiple of the blocks."""
    args, max_ext = make_inputs([(100, 45), (0, 64)], 8, 2, 64, torch.float16, kernel_device, seed=6)
    sinks = sinks_for(8, torch.float16, kernel_device)
    out = extend_attention(*args, 0.125, max_ext, sliding_window=13, sinks=sinks)
    check(out, extend_attention_ref(*args, 0.125, sliding_window=13, sinks=sinks), torch.float16)


def test_extend_window_reads_only_the_window(kernel_device):
    """Prefix keys no query's window reaches are NaN in the pool: reading them would produce NaN."""
    W, prefix = 10, 60
    (q, k_buf, v_buf, table, rows, *meta), max_ext = make_inputs(
        [(prefix, 24)], 4, 2, 32, torch.float32, kernel_device, seed=7
    )
    ref = extend_attention_ref(q, k_buf, v_buf, table, rows, *meta, 0.2, sliding_window=W)
    stale = table[int(rows[0]), : prefix - W + 1].long()
    k_buf[stale] = float("nan")
    v_buf[stale] = float("nan")
    out = extend_attention(q, k_buf, v_buf, table, rows, *meta, 0.2, max_ext, block_m=16, block_n=16, sliding_window=W)
    check(out, ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows",
    [
        [(0, 2048)],  # a plain prefill
        [(4096, 512), (0, 1000), (7000, 1), (1234, 777), (100, 2048), (0, 1)],  # prefix hits and chunks
    ],
)
def test_extend_llama8b_shapes_bf16(rows):
    H, KVH, D = 32, 8, 128
    args, max_ext = make_inputs(rows, H, KVH, D, torch.bfloat16, "cuda", seed=len(rows))
    out = extend_attention(*args, D**-0.5, max_ext)
    check(out, extend_attention_ref(*args, D**-0.5), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [[(0, 4096)], [(3000, 512), (0, 1000), (5000, 1), (200, 2048), (129, 127)]])
@pytest.mark.parametrize("window", [None, 128])
def test_extend_gpt_oss_shapes_bf16(rows, window):
    """GPT-OSS attention: 64 heads of 64 on 8 KV heads, bf16 sinks, full and 128-token window layers."""
    H, KVH, D = 64, 8, 64
    args, max_ext = make_inputs(rows, H, KVH, D, torch.bfloat16, "cuda", seed=len(rows))
    sinks = sinks_for(H, torch.bfloat16, "cuda")
    out = extend_attention(*args, D**-0.5, max_ext, sliding_window=window, sinks=sinks)
    check(out, extend_attention_ref(*args, D**-0.5, sliding_window=window, sinks=sinks), torch.bfloat16)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("window", [None, 16])
def test_extend_reads_an_fp8_cache_in_the_queries_dtype(kernel_device, fp8, window):
    """An FP8 pool (``kv_cache_dtype``) with float32 queries, prefixes and new tokens both read from it:
    the reference on the same FP8 values, to float32 precision."""
    (q, k_buf, v_buf, *rest), max_ext = make_inputs([(0, 40), (23, 9), (70, 1)], 8, 2, 64, torch.float32,
                                                    kernel_device)
    k8, v8 = k_buf.to(fp8), v_buf.to(fp8)
    sinks = sinks_for(8, torch.float32, kernel_device)
    out = extend_attention(q, k8, v8, *rest, 64**-0.5, max_ext, sliding_window=window, sinks=sinks)
    ref = extend_attention_ref(q, k8.float(), v8.float(), *rest, 64**-0.5, sliding_window=window, sinks=sinks)
    check(out, ref, torch.float32)
