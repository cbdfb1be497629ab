"""decode_attention (Triton) vs decode_attention_ref (torch).

CPU (interpreter): small shapes, float32 and float16 (the interpreter's bf16 ``tl.dot`` is wrong in
Triton 3.6, so bf16 is covered on the GPU only). GPU: Llama-3.1-8B shapes in bf16, compared with the
float32 reference: max abs diff < 2e-2 (bf16 keeps 8 mantissa bits: the output, a convex mix of
values of size ~1, carries ~4e-3 rounding from P and V in bf16 plus bf16 output rounding).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.decode_attention import (  # noqa: E402
    compute_num_kv_splits,
    decode_attention,
    decode_attention_ref,
)

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_inputs(seq_lens, H, KVH, D, dtype, device, *, table_dtype=torch.int64, seed=0):
    """Random pool, a table whose rows map to scattered slots, and queries; returns the kernel's args."""
    gen = torch.Generator().manual_seed(seed)
    B, L = len(seq_lens), max(max(seq_lens), 1)
    R = B + 2
    num_slots = R * L + 7
    k_buf = torch.randn((num_slots + 1, KVH, D), generator=gen).to(dtype).to(device)
    v_buf = torch.randn((num_slots + 1, KVH, D), generator=gen).to(dtype).to(device)
    table = (torch.randperm(num_slots, generator=gen)[: R * L] + 1).reshape(R, L)  # [R, L] slots 1..S
    table = table.to(table_dtype).to(device)
    req_rows = torch.randperm(R, generator=gen)[:B].to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q = torch.randn((B, H, D), generator=gen).to(dtype).to(device)
    return q, k_buf, v_buf, table, req_rows, lens


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff < TOL[dtype], f"max abs diff {diff} >= {TOL[dtype]}"


@pytest.mark.parametrize(
    "H,KVH,D",
    [(4, 4, 64), (8, 2, 64), (16, 2, 128), (6, 2, 80)],  # GQA groups 1, 4, 8, 3; D=80 is not a power of 2
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_reference(kernel_device, H, KVH, D, dtype):
    seq_lens = [1, 37, 200, 64]
    args = make_inputs(seq_lens, H, KVH, D, dtype, kernel_device)
    out = decode_attention(*args, D**-0.5, block_n=16)
    check(out, decode_attention_ref(*args, D**-0.5), dtype)


def test_decode_empty_splits_int32_table_strided_q(kernel_device):
    """Every request forced to 16 splits (most of them empty), an int32 table, q a strided view, and
    an output poisoned with NaN: every element must be written."""
    H, KVH, D = 8, 2, 64
    q, k_buf, v_buf, table, rows, lens = make_inputs(
        [3, 50, 17], H, KVH, D, torch.float32, kernel_device, table_dtype=torch.int32, seed=1
    )
    qkv = torch.randn((3, H + 2 * KVH, D), device=kernel_device)
    qkv[:, :H] = q
    q_view = qkv[:, :H]  # [B, H, D], stride(0) = (H + 2 KVH) * D
    splits = torch.full((3,), 16, dtype=torch.int32, device=kernel_device)
    out = torch.full((3, H, D), float("nan"), device=kernel_device)
    decode_attention(q_view, k_buf, v_buf, table, rows, lens, D**-0.5, num_kv_splits=splits, out=out, block_n=16)
    check(out, decode_attention_ref(q, k_buf, v_buf, table, rows, lens, D**-0.5), torch.float32)


def test_decode_zero_length_row_gives_zeros(kernel_device):
    args = make_inputs([0, 5], 4, 2, 64, torch.float32, kernel_device, seed=2)
    out = decode_attention(*args, 0.125, block_n=16)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    check(out, decode_attention_ref(*args, 0.125), torch.float32)


@pytest.mark.parametrize("window,with_sinks,dtype", [
    (None, False, torch.float32), (None, True, torch.float32), (17, True, torch.float32), (1, False, torch.float32),
    (None, True, torch.float16),
])
def test_decode_one_pass_matches_reference(kernel_device, window, with_sinks, dtype):
    """``max_kv_splits=1``: stage 1 finishes the softmax (sinks folded in) and writes the output itself.
    A zero-length row gives zeros, every element of a NaN-poisoned output is written, and
    ``num_kv_splits`` is not read (16 splits passed: a kernel that used them would attend only the
    first sixteenth of each long row)."""
    H, KVH, D = 8, 2, 64
    q, k_buf, v_buf, table, rows, lens = make_inputs([300, 0, 41, 7, 129], H, KVH, D, dtype, kernel_device, seed=11)
    sinks = sinks_for(H, dtype, kernel_device) if with_sinks else None
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=kernel_device)
    ignored = torch.full((5,), 16, dtype=torch.int32, device=kernel_device)
    decode_attention(q, k_buf, v_buf, table, rows, lens, D**-0.5, num_kv_splits=ignored, max_kv_splits=1,
                     out=out, block_n=16, sliding_window=window, sinks=sinks)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = decode_attention_ref(q, k_buf, v_buf, table, rows, lens, D**-0.5, sliding_window=window, sinks=sinks)
    check(out, ref, dtype)


def test_num_kv_splits_bounds():
    lens = torch.tensor([0, 1, 64, 65, 5000, 100000], dtype=torch.int32)
    splits = compute_num_kv_splits(lens, num_kv_heads=8, max_kv_splits=16)
    assert splits.dtype == torch.int32
    assert splits.tolist()[:4] == [1, 1, 1, 2]
    assert int(splits.max()) <= 16 and int(splits.min()) >= 1
    # a large batch already fills the GPU: one split each
    big = compute_num_kv_splits(torch.full((256,), 8192, dtype=torch.int32), num_kv_heads=8, max_kv_splits=16)
    assert big.max().item() == 1


def sinks_for(H, dtype, device, seed=9):
    """Sink logits large enough to take a visible share of the softmax mass (scores are ~N(0, 1))."""
    return (2.0 * torch.randn(H, generator=torch.Generator().manual_seed(seed))).to(dtype).to(device)


# lengths around the window boundaries: shorter than, equal to, one past, and many times the window
WINDOW_LENS = [1, 5, 16, 17, 40, 200, 64]


# (window, sinks, H, KVH, D): window 16/17 at the 16- and 17-key rows' boundary, 16 = BLOCK_N
WINDOW_CASES = [
    (None, True, 4, 2, 64), (1, False, 4, 2, 64), (1, True, 4, 2, 64), (16, False, 4, 2, 64),
    (17, True, 4, 2, 64), (33, False, 4, 2, 64), (500, True, 4, 2, 64), (17, True, 2, 2, 32),
]


@pytest.mark.parametrize("window,with_sinks,H,KVH,D", WINDOW_CASES)
def test_decode_window_sinks(kernel_device, window, with_sinks, H, KVH, D):
    args = make_inputs(WINDOW_LENS, H, KVH, D, torch.float32, kernel_device, seed=3)
    sinks = sinks_for(H, torch.float32, kernel_device) if with_sinks else None
    out = decode_attention(*args, D**-0.5, block_n=16, sliding_window=window, sinks=sinks)
    check(out, decode_attention_ref(*args, D**-0.5, sliding_window=window, sinks=sinks), torch.float32)


def test_decode_window_many_splits_fp16_sinks(kernel_device):
    """Forced 8 splits of a 40-key window over 300 keys (most splits empty); float16 with float16
    sinks (the model's dtype); a zero-length row with sinks gives zeros."""
    H, KVH, D = 8, 2, 64
    q, k_buf, v_buf, table, rows, lens = make_inputs([300, 0, 41, 7], H, KVH, D, torch.float16, kernel_device, seed=4)
    sinks = sinks_for(H, torch.float16, kernel_device)
    splits = torch.full((4,), 8, dtype=torch.int32, device=kernel_device)
    out = decode_attention(
        q, k_buf, v_buf, table, rows, lens, D**-0.5, num_kv_splits=splits, max_kv_splits=8, block_n=16,
        sliding_window=40, sinks=sinks,
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = decode_attention_ref(q, k_buf, v_buf, table, rows, lens, D**-0.5, sliding_window=40, sinks=sinks)
    check(out, ref, torch.float16)


def test_decode_window_reads_only_the_window(kernel_device):
    """Keys before the window are NaN in the pool: a kernel that reads them would produce NaN."""
    H, KVH, D, W = 4, 2, 32, 20
    q, k_buf, v_buf, table, rows, lens = make_inputs([150, 90], H, KVH, D, torch.float32, kernel_device, seed=6)
    ref = decode_attention_ref(q, k_buf, v_buf, table, rows, lens, D**-0.5, sliding_window=W)
    for b, n in enumerate(lens.tolist()):
        stale = table[int(rows[b]), : n - W].long()
        k_buf[stale] = float("nan")
        v_buf[stale] = float("nan")
    out = decode_attention(q, k_buf, v_buf, table, rows, lens, D**-0.5, block_n=16, sliding_window=W)
    check(out, ref, torch.float32)


def test_decode_rejects_bad_options(kernel_device):
    args = make_inputs([5], 4, 2, 32, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="sliding_window"):
        decode_attention(*args, 0.1, sliding_window=0)
    with pytest.raises(ValueError, match="sinks"):
        decode_attention(*args, 0.1, sinks=torch.zeros(3, device=kernel_device))


@pytest.mark.gpu
@pytest.mark.parametrize("max_kv_splits", [16, 1])
@pytest.mark.parametrize("batch,max_len", [(1, 8192), (64, 4096), (256, 2048), (256, 8192)])
def test_decode_llama8b_shapes_bf16(batch, max_len, max_kv_splits):
    H, KVH, D = 32, 8, 128
    gen = torch.Generator().manual_seed(batch + max_len)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    seq_lens[0] = max_len
    args = make_inputs(seq_lens, H, KVH, D, torch.bfloat16, "cuda", seed=batch)
    out = decode_attention(*args, D**-0.5, max_kv_splits=max_kv_splits)
    check(out, decode_attention_ref(*args, D**-0.5), torch.bfloat16)


@pytest.mark.gpu
def test_decode_cuda_graph_replay_with_new_lengths():
    """Captured once, replayed after the metadata tensors were refilled in place."""
    H, KVH, D = 32, 8, 128
    q, k_buf, v_buf, table, rows, lens = make_inputs([700, 30, 2000, 1], H, KVH, D, torch.bfloat16, "cuda", seed=5)
    splits = compute_num_kv_splits(lens, KVH)
    decode_attention(q, k_buf, v_buf, table, rows, lens, D**-0.5, num_kv_splits=splits)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_buf, v_buf, table, rows, lens, D**-0.5, num_kv_splits=splits)
    lens.copy_(torch.tensor([5, 1999, 64, 1000], dtype=torch.int32))
    splits.copy_(compute_num_kv_splits(lens, KVH))
    q.copy_(torch.randn_like(q))
    graph.replay()
    check(out, decode_attention_ref(q, k_buf, v_buf, table, rows, lens, D**-0.5), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("max_kv_splits", [16, 1])
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (64, 4096), (256, 2048)])
@pytest.mark.parametrize("window", [None, 128])
def test_decode_gpt_oss_shapes_bf16(batch, max_len, window, max_kv_splits):
    """GPT-OSS attention: 64 heads of 64 on 8 KV heads, bf16 sinks, full and 128-token window layers."""
    H, KVH, D = 64, 8, 64
    gen = torch.Generator().manual_seed(batch + max_len)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    seq_lens[0] = max_len
    args = make_inputs(seq_lens, H, KVH, D, torch.bfloat16, "cuda", seed=batch)
    sinks = sinks_for(H, torch.bfloat16, "cuda")
    out = decode_attention(*args, D**-0.5, sliding_window=window, sinks=sinks, max_kv_splits=max_kv_splits)
    check(out, decode_attention_ref(*args, D**-0.5, sliding_window=window, sinks=sinks), torch.bfloat16)


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("window", [None, 16])
def test_decode_reads_an_fp8_cache_in_the_queries_dtype(kernel_device, fp8, window):
    """An FP8 pool (``kv_cache_dtype``) with float32 queries: the kernel converts each key and value
    back exactly, so it matches the reference on the same FP8 values to float32 precision."""
    q, k_buf, v_buf, table, req_rows, lens = make_inputs([1, 37, 90], 8, 2, 64, torch.float32, kernel_device)
    k8, v8 = k_buf.to(fp8), v_buf.to(fp8)
    sinks = sinks_for(8, torch.float32, kernel_device)
    out = decode_attention(q, k8, v8, table, req_rows, lens, 64**-0.5, block_n=16, sliding_window=window, sinks=sinks)
    ref = decode_attention_ref(q, k8.float(), v8.float(), table, req_rows, lens, 64**-0.5, sliding_window=window,
                               sinks=sinks)
    check(out, ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_decode_fp8_cache_gpt_oss_shapes(fp8):
    H, KVH, D = 64, 8, 64
    q, k_buf, v_buf, table, req_rows, lens = make_inputs([4096, 17, 2048], H, KVH, D, torch.bfloat16, "cuda")
    k8, v8 = k_buf.to(fp8), v_buf.to(fp8)
    sinks = sinks_for(H, torch.bfloat16, "cuda")
    out = decode_attention(q, k8, v8, table, req_rows, lens, D**-0.5, sliding_window=128, sinks=sinks)
    ref = decode_attention_ref(q, k8.to(torch.bfloat16), v8.to(torch.bfloat16), table, req_rows, lens, D**-0.5,
                               sliding_window=128, sinks=sinks)
    check(out, ref, torch.bfloat16)
