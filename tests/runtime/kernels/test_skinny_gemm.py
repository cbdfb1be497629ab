"""The batched-decode GEMM (TMA loads, Triton) against torch's float32 product.

Under the CPU interpreter the kernel runs in float32 and float16 (the interpreter mis-reads bfloat16
through tensor descriptors); on a GPU in bfloat16 too (there float32 goes through TF32). Shapes with ragged M, N and K exercise the
zero-filled loads and clipped stores at every edge; several row blocks share a weight tile.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.skinny_gemm import SkinnyGemmConfig, candidate_configs, skinny_gemm  # noqa: E402
from tests.runtime.triton_support import HAS_CUDA  # noqa: E402

# float32 on a GPU multiplies in TF32 (tl.dot's default), 10 bits of mantissa: a looser bound there
TOL = {torch.float32: 2e-3 if HAS_CUDA else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("M,N,K", [(64, 128, 128), (5, 40, 48), (70, 200, 136), (130, 64, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skinny_gemm_matches_torch(kernel_device, M, N, K, dtype):
    gen = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=gen).to(dtype).to(kernel_device)
    w = torch.randn(N, K, generator=gen).to(dtype).to(kernel_device)
    ref = x.float() @ w.float().T
    config = SkinnyGemmConfig(block_m=64, block_n=64, block_k=32, num_stages=2, num_warps=4)
    out = skinny_gemm(x, w, config)
    assert out.shape == (M, N) and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]
    preset = torch.full((M, N), float("nan"), dtype=dtype, device=kernel_device)
    assert skinny_gemm(x, w, config, out=preset) is preset and _rel(preset, ref) < TOL[dtype]


def test_skinny_gemm_refuses_mismatched_shapes(kernel_device):
    with pytest.raises(ValueError, match="columns"):
        skinny_gemm(torch.randn(4, 64, device=kernel_device), torch.randn(8, 32, device=kernel_device),
                    SkinnyGemmConfig(64, 64, 32, 2, 4))


def test_candidate_configs_fit_shared_memory_and_rows():
    for rows in (16, 64, 100, 128, 256):
        configs = candidate_configs(rows)
        assert configs
        for c in configs:
            assert c.block_m <= max(64, -(-rows // 64) * 64)
            assert c.num_stages * (c.block_m + c.block_n) * c.block_k * 2 + c.block_m * c.block_n * 2 <= 220 * 1024
    assert all(c.block_m == 64 for c in candidate_configs(64))
