"""rms_norm / add_rms_norm (Triton) vs the Hugging Face formula (rms_norm_ref / add_rms_norm_ref).

The kernel repeats every rounding of the eager 16-bit code, so:

- float16 (interpreter and GPU): the residual is bit-identical; the output differs, if at all, by one
  unit in the last place (float32 mean/rsqrt rounding tipping a value across a boundary);
- bfloat16 on the GPU: the same (residual identical; out within 2 bf16 ulps, under 1% of elements
  differing at all);
- bfloat16 in the interpreter: its float32 -> bfloat16 cast truncates instead of rounding (Triton
  3.6 ``cast_impl``), so each of the three roundings may be off by one ulp: relative error < 3 ulps;
- float32: the same formula up to summation order: 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.fused_norm import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)

BF16_ULP = 2.0**-7  # relative spacing of bfloat16 values is between 2^-8 and 2^-7
FP16_ULP = 2.0**-10


def make(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    residual = (3 * torch.randn(shape, generator=gen)).to(dtype).to(device)
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(dtype).to(device)
    return x, residual, weight


def assert_close_ulps(out, ref, ulps, ulp, max_mismatch=1.0):
    """|out - ref| <= ulps * ulp * |ref| elementwise (plus a tiny floor), and few elements differ."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    diff = (out.float() - ref.float()).abs()
    bound = ulps * ulp * ref.float().abs() + 1e-6
    assert (diff <= bound).all(), f"max abs diff {diff.max().item()}, worst ratio {(diff / bound).max().item()}"
    mismatch = (out != ref).float().mean().item()
    assert mismatch <= max_mismatch, f"{mismatch:.2%} of elements differ"


def check(dtype, out, ref, residual=None, residual_ref=None, *, interpreter=False):
    if dtype == torch.float32:
        assert_close_ulps(out, ref, 1e-5, 1.0)
        if residual is not None:
            assert torch.equal(residual, residual_ref)
    elif dtype == torch.float16:
        assert_close_ulps(out, ref, 1, FP16_ULP, max_mismatch=0.01)
        if residual is not None:
            assert torch.equal(residual, residual_ref)
    elif interpreter:  # bfloat16 through the truncating interpreter cast
        assert_close_ulps(out, ref, 3, BF16_ULP)
        if residual is not None:
            assert_close_ulps(residual, residual_ref, 1, BF16_ULP)
    else:
        assert_close_ulps(out, ref, 2, BF16_ULP, max_mismatch=0.01)
        if residual is not None:
            assert torch.equal(residual, residual_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 576, 100])  # 576: SmolLM2-135M; 100: not a power of two
def test_norm_matches_reference(kernel_device, dtype, hidden):
    interp = kernel_device == "cpu"
    x, residual, weight = make((7, hidden), dtype, kernel_device)
    check(dtype, rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), interpreter=interp)
    out, new_residual = add_rms_norm(x, residual, weight, 1e-5)
    out_ref, residual_ref = add_rms_norm_ref(x, residual, weight, 1e-5)
    check(dtype, out, out_ref, new_residual, residual_ref, interpreter=interp)


def test_norm_leaves_inputs_alone_and_handles_strided_rows(kernel_device):
    """Rows of a wider buffer (row stride != hidden) and a 3-D input (per-head q/k norm of Qwen3)."""
    x_wide, r_wide, _ = make((5, 96), torch.float16, kernel_device, seed=1)
    weight = make((1, 64), torch.float16, kernel_device, seed=2)[2]
    x, residual = x_wide[:, 16:80], r_wide[:, :64]  # [5, 64], row stride 96
    x_before, r_before = x.clone(), residual.clone()
    out, new_residual = add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(x, x_before) and torch.equal(residual, r_before)
    out_ref, residual_ref = add_rms_norm_ref(x, residual, weight, 1e-6)
    check(torch.float16, out, out_ref, new_residual, residual_ref)
    heads = x_wide[:, :64].reshape(5, 2, 32)  # [T, H, D] view with row stride 96
    w32 = weight[:32].contiguous()
    out3 = rms_norm(heads, w32, 1e-6)
    assert out3.shape == (5, 2, 32)
    check(torch.float16, out3, rms_norm_ref(heads, w32, 1e-6))


def test_norm_weight_dtype_promotes_like_torch(kernel_device):
    x, _, weight = make((3, 64), torch.float16, kernel_device, seed=3)
    out = rms_norm(x, weight.float(), 1e-6)
    ref = rms_norm_ref(x, weight.float(), 1e-6)
    assert out.dtype == torch.float32 == ref.dtype
    assert_close_ulps(out, ref, 1, FP16_ULP)


def test_norm_zero_rows_and_errors(kernel_device):
    x, residual, weight = make((0, 64), torch.float32, kernel_device)
    assert rms_norm(x, weight, 1e-6).shape == (0, 64)
    out, new_residual = add_rms_norm(x, residual, weight, 1e-6)
    assert out.shape == new_residual.shape == (0, 64)
    x, residual, weight = make((2, 64), torch.float32, kernel_device)
    with pytest.raises(ValueError, match="does not match hidden size"):
        rms_norm(x, weight[:32], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, residual.half(), weight, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 128, 4096])
def test_norm_llama8b_bf16(T):
    """Llama-3.1-8B: hidden 4096, bf16, eps 1e-5 (activations of a realistic spread)."""
    x, residual, weight = make((T, 4096), torch.bfloat16, "cuda", seed=T)
    check(torch.bfloat16, rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    out, new_residual = add_rms_norm(x, residual, weight, 1e-5)
    out_ref, residual_ref = add_rms_norm_ref(x, residual, weight, 1e-5)
    check(torch.bfloat16, out, out_ref, new_residual, residual_ref)


@pytest.mark.gpu
def test_norm_cuda_graph_replay():
    x, residual, weight = make((16, 4096), torch.bfloat16, "cuda", seed=9)
    add_rms_norm(x, residual, weight, 1e-5)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, new_residual = add_rms_norm(x, residual, weight, 1e-5)
    x2, r2, _ = make((16, 4096), torch.bfloat16, "cuda", seed=10)
    x.copy_(x2)
    residual.copy_(r2)
    graph.replay()
    torch.cuda.synchronize()
    out_ref, residual_ref = add_rms_norm_ref(x2, r2, weight, 1e-5)
    check(torch.bfloat16, out, out_ref, new_residual, residual_ref)
