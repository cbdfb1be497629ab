"""rotary_embedding (Triton) vs rotary_embedding_ref / RotaryEmbedding.apply (eager torch).

The kernel rounds each product and the sum as eager 16-bit torch does, so float16 (interpreter and
GPU) and bfloat16 (GPU) must be bit-identical. float32 may differ in the last bit (FMA contraction):
1e-6. The interpreter's float32 -> bfloat16 cast truncates (Triton 3.6), so there bfloat16 is held
to three bf16 ulps of the largest output instead.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.fused_rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402
from plait.runtime.layers.rotary import RotaryEmbedding  # noqa: E402

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tables(D, P, dtype, device, scaling=None):
    rotary = RotaryEmbedding(D, P, 500000.0, scaling)
    rotary.build_cache(torch.device(device), dtype)
    return rotary.cos_cache, rotary.sin_cache  # [P, D] each


def fused_qk(T, H, KVH, D, dtype, device, seed=0):
    """x = q and k heads of a fused [T, (H + 2 KVH) D] projection: a [T, H + KVH, D] strided view."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn((T, (H + 2 * KVH) * D), generator=gen).to(dtype).to(device)
    return qkv, qkv[:, : (H + KVH) * D].view(T, H + KVH, D)


def check(out, ref, dtype, interpreter):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    elif dtype == torch.bfloat16:
        # The interpreter truncates float32 -> bf16 casts; on the GPU the kernel rounds once where eager
        # torch rounds each product and the sum. Both stay within a few bf16 ulps of the largest value.
        diff = (out.float() - ref.float()).abs().max().item()
        assert diff <= 3 * 2.0**-7 * ref.float().abs().max().item(), diff
    else:
        assert torch.equal(out, ref), f"max abs diff {(out.float() - ref.float()).abs().max().item()}"


@pytest.mark.parametrize("H,KVH,D", [(4, 2, 64), (9, 3, 64), (6, 2, 80), (8, 8, 32)])  # 9/3/64: SmolLM2-135M
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotary_matches_reference(kernel_device, H, KVH, D, dtype):
    T, P = 6, 300
    cos, sin = tables(D, P, dtype, kernel_device, LLAMA3_SCALING)
    qkv, x = fused_qk(T, H, KVH, D, dtype, kernel_device)
    positions = torch.tensor([0, 5, 299, 17, 17, 128], device=kernel_device)
    qkv_before = qkv.clone()
    out = rotary_embedding(x, positions, cos, sin)
    assert out.is_contiguous() and torch.equal(qkv, qkv_before)
    check(out, rotary_embedding_ref(x, positions, cos, sin), dtype, kernel_device == "cpu")


def test_rotary_in_place_small_blocks_int32_positions(kernel_device):
    """In place into the fused buffer (v untouched), one head per program, int32 positions."""
    H, KVH, D, T = 4, 2, 64, 5
    cos, sin = tables(D, 64, torch.float16, kernel_device)
    qkv, x = fused_qk(T, H, KVH, D, torch.float16, kernel_device, seed=1)
    v_before = qkv[:, (H + KVH) * D :].clone()
    positions = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32, device=kernel_device)
    ref = rotary_embedding_ref(x, positions.long(), cos, sin)
    out = rotary_embedding(x, positions, cos, sin, out=x, block_h=1)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(x, ref) and torch.equal(qkv[:, (H + KVH) * D :], v_before)


def test_rotary_layer_fused_rope_equals_eager(kernel_device):
    """RotaryEmbedding.apply with a FusedRope (the CUDA path) equals it with gathered cos/sin."""
    from plait.runtime.layers.rotary import FusedRope

    D, T = 64, 4
    rotary = RotaryEmbedding(D, 100, 10000.0)
    rotary.build_cache(torch.device(kernel_device), torch.float16)
    positions = torch.tensor([7, 0, 99, 42], device=kernel_device)
    _, x = fused_qk(T, 3, 1, D, torch.float16, kernel_device, seed=2)
    eager = (rotary.cos_cache[positions].unsqueeze(1), rotary.sin_cache[positions].unsqueeze(1))
    fused = FusedRope(positions, rotary.cos_cache, rotary.sin_cache)
    assert torch.equal(RotaryEmbedding.apply(fused, x), RotaryEmbedding.apply(eager, x))


def test_rotary_zero_tokens_and_errors(kernel_device):
    cos, sin = tables(64, 16, torch.float32, kernel_device)
    x = torch.empty((0, 3, 64), device=kernel_device)
    assert rotary_embedding(x, torch.empty(0, dtype=torch.int64, device=kernel_device), cos, sin).shape == (0, 3, 64)
    x = torch.randn((2, 3, 64), device=kernel_device)
    with pytest.raises(ValueError, match="model dtype"):
        rotary_embedding(x, torch.zeros(2, dtype=torch.int64, device=kernel_device), cos.half(), sin.half())
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(x, torch.zeros(3, dtype=torch.int64, device=kernel_device), cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 128, 4096])
def test_rotary_llama8b_bf16(T):
    """Llama-3.1-8B: 32 q + 8 k heads of 128 inside the fused qkv output, llama3 scaling, bf16: close to
    eager torch, and at least as close as eager torch to the float32 result."""
    cos, sin = tables(128, 131072, torch.bfloat16, "cuda", LLAMA3_SCALING)
    _, x = fused_qk(T, 32, 8, 128, torch.bfloat16, "cuda", seed=T)
    positions = torch.randint(0, 131072, (T,), device="cuda")
    out = rotary_embedding(x, positions, cos, sin)
    eager = rotary_embedding_ref(x, positions, cos, sin)
    check(out, eager, torch.bfloat16, interpreter=False)
    exact = rotary_embedding_ref(x.float(), positions, cos.float(), sin.float())
    assert (out.float() - exact).abs().mean() <= (eager.float() - exact).abs().mean() * 1.01 + 1e-6


@pytest.mark.gpu
def test_rotary_cuda_graph_replay_with_new_positions():
    cos, sin = tables(128, 4096, torch.bfloat16, "cuda", LLAMA3_SCALING)
    _, x = fused_qk(8, 32, 8, 128, torch.bfloat16, "cuda", seed=3)
    positions = torch.zeros(8, dtype=torch.int64, device="cuda")
    rotary_embedding(x, positions, cos, sin)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rotary_embedding(x, positions, cos, sin)
    positions.copy_(torch.tensor([4095, 1, 2, 3, 1000, 2000, 3000, 17], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, rotary_embedding_ref(x, positions, cos, sin), torch.bfloat16, interpreter=False)


@pytest.mark.parametrize("H,KVH,D", [(4, 2, 64), (9, 3, 64), (8, 8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_store_kv_equals_rotary_then_store(kernel_device, H, KVH, D, dtype):
    """One launch = rotary_embedding on q and k, then k (rotated) and v written into the pool rows."""
    from plait.runtime.kernels.fused_rotary import rotary_store_kv

    T, P, S = 5, 64, 16
    cos, sin = tables(D, P, dtype, kernel_device)
    gen = torch.Generator().manual_seed(H * D)
    qkv = torch.randn(T, H + 2 * KVH, D, generator=gen).to(dtype).to(kernel_device)
    positions = torch.tensor([0, 3, 17, 40, 63], device=kernel_device)
    slots = torch.tensor([2, 9, 4, 15, 1], device=kernel_device)
    k_buf = torch.full((S, KVH, D), float("nan"), dtype=dtype, device=kernel_device)
    v_buf = torch.full((S, KVH, D), float("nan"), dtype=dtype, device=kernel_device)
    expected_qk = rotary_embedding(qkv[:, : H + KVH], positions, cos, sin)  # [T, H + KVH, D]
    v = qkv[:, H + KVH :].clone()
    rotary_store_kv(qkv, H, KVH, positions, cos, sin, k_buf, v_buf, slots)
    assert torch.equal(qkv[:, : H + KVH], expected_qk)  # rotated in place, bit-identical
    assert torch.equal(qkv[:, H + KVH :], v)  # v heads untouched
    assert torch.equal(k_buf[slots], expected_qk[:, H:])
    assert torch.equal(v_buf[slots], v)
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.isnan(k_buf[untouched.to(kernel_device)]).all()  # no other pool row written


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_rotary_store_kv_into_an_fp8_cache(fp8):
    """The fused write into an FP8 pool (``kv_cache_dtype``) stores the rotated k and the v in the
    cache's type as ``cache_values`` does (saturated). GPU only: the interpreter's float -> FP8 rounding
    is wrong in Triton 3.6."""
    from plait.runtime.kernels.common import cache_values
    from plait.runtime.kernels.fused_rotary import rotary_store_kv

    H, KVH, D, T = 8, 2, 64, 6
    cos, sin = tables(D, 64, torch.bfloat16, "cuda")
    gen = torch.Generator().manual_seed(5)
    qkv = (torch.randn(T, H + 2 * KVH, D, generator=gen) * 50).to(torch.bfloat16).to("cuda")
    qkv[0, H:] = 1e5  # past e4m3's range: saturates
    positions = torch.tensor([0, 3, 17, 40, 63, 5], device="cuda")
    slots = torch.tensor([2, 9, 4, 15, 1, 7], device="cuda")
    k_buf = torch.zeros((16, KVH, D), dtype=fp8, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    expected_k = rotary_embedding(qkv[:, : H + KVH], positions, cos, sin)[:, H:]
    v = qkv[:, H + KVH :].clone()
    rotary_store_kv(qkv, H, KVH, positions, cos, sin, k_buf, v_buf, slots)
    assert torch.equal(k_buf[slots].float(), cache_values(expected_k, fp8).float())
    assert torch.equal(v_buf[slots].float(), cache_values(v, fp8).float())
