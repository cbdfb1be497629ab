"""The batched-decode GEMM (TMA loads, Triton) against torch's float32 product.

Under the CPU interpreter the kernel runs in float32 and float16 (the interpreter mis-reads bfloat16
through tensor descriptors); on a GPU in bfloat16 too (there float32 goes through TF32). Shapes with ragged M, N and K exercise the
zero-filled loads and clipped stores at every edge; several row blocks share a weight tile.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.skinny_gemm import (  # noqa: E402
    SPLIT_K_WORKSPACE,
    SkinnyGemmConfig,
    SkinnyGemmTable,
    candidate_configs,
    chooser_candidates,
    skinny_gemm,
    split_k_configs,
)
from plait.runtime.layers.linear import apply_linear  # noqa: E402
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


@pytest.mark.parametrize("M,N,K,split", [(64, 128, 256, 2), (5, 40, 48, 3), (70, 200, 136, 4), (130, 64, 200, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_matches_torch_and_leaves_counters_at_zero(kernel_device, M, N, K, split, dtype):
    """Slices of K (the last one ragged, some past K when the split outnumbers K's chunks) summed by the
    last program of each tile; a second call (as a graph replay) gives the same bits."""
    gen = torch.Generator().manual_seed(M + N + K + split)
    x = torch.randn(M, K, generator=gen).to(dtype).to(kernel_device)
    w = torch.randn(N, K, generator=gen).to(dtype).to(kernel_device)
    ref = x.float() @ w.float().T
    config = SkinnyGemmConfig(block_m=64, block_n=64, block_k=32, num_stages=2, num_warps=4, split_k=split)
    out = skinny_gemm(x, w, config)
    assert out.shape == (M, N) and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]
    counters = SPLIT_K_WORKSPACE.counters[torch.device(kernel_device)]
    assert int(counters.abs().sum()) == 0  # every tile's last program reset its counter
    again = torch.full((M, N), float("nan"), dtype=dtype, device=kernel_device)
    assert torch.equal(skinny_gemm(x, w, config, out=again), out)  # deterministic: partials added in order


def test_split_k_configs_fill_the_card_without_tiny_slices():
    for rows, n, k in [(64, 4096, 4096), (128, 4096, 14336), (256, 6144, 4096), (128, 28672, 4096)]:
        for c in split_k_configs(rows, n, k, sm_count=132):
            tiles = -(-rows // c.block_m) * -(-n // c.block_n)
            assert 132 <= tiles * c.split_k <= 4 * 132 and k // c.split_k >= 2 * c.block_k
    assert split_k_configs(128, 4096, 4096)  # the narrow shapes get split-K tilings to try
    whole_k = [c for c in chooser_candidates(128, 28672, 4096) if c.split_k == 1]
    assert whole_k and all(c.block_m == 128 for c in whole_k)


def test_table_lookup_by_rows():
    a, b = SkinnyGemmConfig(64, 64, 64, 4, 4, 2), SkinnyGemmConfig(128, 64, 64, 4, 4, 4)
    table = SkinnyGemmTable([(128, b), (64, a), (256, None)], min_rows=33)
    assert [table.lookup(r) for r in (1, 32, 33, 64, 65, 128, 129, 256, 257)] == [None, None, a, a, b, b, None, None, None]
    assert table and not SkinnyGemmTable([(64, None)], min_rows=33)


def test_apply_linear_takes_the_table_only_where_it_applies(kernel_device, monkeypatch):
    """A table routes a batch of its rows through the kernel (same product); a bias, too few rows or a
    non-contiguous input keep ``F.linear``."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=gen).to(kernel_device)
    table = SkinnyGemmTable([(64, SkinnyGemmConfig(64, 64, 32, 2, 4, 2))], min_rows=33)
    calls = []
    import plait.runtime.kernels.skinny_gemm as module

    real = module.skinny_gemm
    monkeypatch.setattr(module, "skinny_gemm", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    for rows in (40, 8):
        x = torch.randn(rows, 64, generator=gen).to(kernel_device)
        assert _rel(apply_linear(x, w, None, None, None, table), x @ w.T) < TOL[torch.float32]
    apply_linear(x, w, torch.zeros(96, device=kernel_device), None, None, table)
    wide = torch.randn(40, 128, generator=gen).to(kernel_device)[:, ::2]
    assert _rel(apply_linear(wide, w, None, None, None, table), wide @ w.T) < TOL[torch.float32]
    assert calls == [40]
