"""Batch-1 GEMV (Triton) vs its float32-accumulating torch reference; tuning on a GPU.

Both accumulate in float32 over the same products; only the summation order differs, so float32
outputs agree to ~1e-5 relative and bf16/fp16 outputs to one rounding of the result.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.gemv import CANDIDATES, GemvConfig, choose_gemv, gemv, gemv_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("N,K", [(40, 256), (33, 300), (5, 1024)])  # even K; ragged K and N; N < block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_reference(kernel_device, N, K, dtype, with_bias):
    gen = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=gen).to(dtype).to(kernel_device)
    x = torch.randn(1, K, generator=gen).to(dtype).to(kernel_device)
    b = torch.randn(N, generator=gen).to(dtype).to(kernel_device) if with_bias else None
    ref = gemv_ref(x, w, b)
    for cfg in (GemvConfig(4, 256, 4), GemvConfig(16, 128, 4)):
        out = gemv(x, w, b, cfg)
        assert out.shape == (1, N) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < TOL[dtype], cfg


def test_gemv_rejects_batches_and_strided_weights(kernel_device):
    w = torch.randn(8, 64, device=kernel_device)
    with pytest.raises(ValueError, match=r"x \[1, K=64\]"):
        gemv(torch.randn(2, 64, device=kernel_device), w, None, CANDIDATES[0])
    with pytest.raises(ValueError, match="unit stride"):
        gemv(torch.randn(1, 8, device=kernel_device), w.t(), None, CANDIDATES[0])


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(4096, 4096), (6144, 4096), (4096, 14336)])
def test_choose_gemv_at_8b_shapes(N, K):
    """On a GPU: the choice (Triton tiling or cuBLAS) is cached and computes the right product."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    cfg = choose_gemv(w, None)
    assert choose_gemv(w, None) is cfg  # cached per shape
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    out = gemv(x, w, None, cfg) if cfg is not None else torch.nn.functional.linear(x, w)
    assert _rel(out, gemv_ref(x, w, None)) < TOL[torch.bfloat16]
