"""store_kv (Triton) vs store_kv_ref (index assignment): the pools must come out identical."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.kv_store import store_kv, store_kv_ref  # noqa: E402


def run_both(T, KVH, D, src_dtype, pool_dtype, device, *, strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = 3 * T + 5
    k_buf = torch.randn((S + 1, KVH, D), generator=gen).to(pool_dtype).to(device)
    v_buf = torch.randn((S + 1, KVH, D), generator=gen).to(pool_dtype).to(device)
    slots = (torch.randperm(S, generator=gen)[:T] + 1).to(device)
    if strided:  # k and v as views into a fused [T, H + 2 KVH, D] projection
        H = 2 * KVH
        qkv = torch.randn((T, H + 2 * KVH, D), generator=gen).to(src_dtype).to(device)
        k, v = qkv[:, H : H + KVH], qkv[:, H + KVH :]
    else:
        k = torch.randn((T, KVH, D), generator=gen).to(src_dtype).to(device)
        v = torch.randn((T, KVH, D), generator=gen).to(src_dtype).to(device)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    store_kv(k_buf, v_buf, slots, k, v)
    store_kv_ref(k_ref, v_ref, slots, k, v)
    assert torch.equal(k_buf, k_ref) and torch.equal(v_buf, v_ref)


@pytest.mark.parametrize("KVH,D", [(1, 64), (2, 64), (8, 128), (3, 80)])
@pytest.mark.parametrize("strided", [False, True])
def test_store_kv_matches_reference(kernel_device, KVH, D, strided):
    run_both(9, KVH, D, torch.float32, torch.float32, kernel_device, strided=strided)


def test_store_kv_casts_to_pool_dtype(kernel_device):
    run_both(5, 2, 64, torch.float32, torch.float16, kernel_device)


def test_store_kv_empty_and_shape_errors(kernel_device):
    k_buf = torch.zeros((4, 2, 8), device=kernel_device)
    v_buf = torch.zeros_like(k_buf)
    empty = torch.empty((0, 2, 8), device=kernel_device)
    store_kv(k_buf, v_buf, torch.empty(0, dtype=torch.int64, device=kernel_device), empty, empty)
    assert not k_buf.any()
    bad = torch.zeros((1, 3, 8), device=kernel_device)
    with pytest.raises(ValueError, match="store_kv expects"):
        store_kv(k_buf, v_buf, torch.ones(1, dtype=torch.int64, device=kernel_device), bad, bad)


@pytest.mark.gpu
def test_store_kv_llama8b_prefill_bf16():
    run_both(8192, 8, 128, torch.bfloat16, torch.bfloat16, "cuda", strided=True, seed=7)


def test_cache_values_saturate_into_fp8():
    """Into an FP8 cache values past the format's largest finite value saturate (torch's own cast gives
    e5m2 infinities); inside the range they round as torch rounds."""
    from plait.runtime.kernels.common import cache_values

    x = torch.tensor([1e6, -1e6, 500.0, 0.3, -2.7, 0.0])
    e4m3 = cache_values(x, torch.float8_e4m3fn).float()
    assert e4m3[:3].tolist() == [448.0, -448.0, 448.0] and torch.equal(e4m3[3:], x[3:].to(torch.float8_e4m3fn).float())
    e5m2 = cache_values(x, torch.float8_e5m2).float()
    assert e5m2[:2].tolist() == [57344.0, -57344.0] and torch.isfinite(e5m2).all()
    assert torch.equal(cache_values(x, torch.float16), x.to(torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_store_kv_into_fp8_saturates_like_the_reference(fp8):
    """(GPU only: Triton 3.6's interpreter rounds float -> FP8 wrongly near powers of two and past the range.)"""
    run_both(257, 8, 64, torch.bfloat16, fp8, "cuda", strided=True, seed=3)
    k_buf = torch.zeros((5, 1, 64), dtype=fp8, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    big = torch.full((1, 1, 64), 1e5, dtype=torch.bfloat16, device="cuda")
    store_kv(k_buf, v_buf, torch.tensor([2], device="cuda"), big, -big)
    limit = torch.finfo(fp8).max
    assert (k_buf[2].float() == limit).all() and (v_buf[2].float() == -limit).all()
