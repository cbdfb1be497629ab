"""silu_and_mul (Triton) vs silu_and_mul_ref (eager ``F.silu(gate) * up``).

The kernel rounds silu's output to the model dtype before the product, as eager torch does; only
float32 ``exp``/division rounding inside silu differs. So float16 and bfloat16 (GPU) outputs are
within one ulp and at most 1% of them differ at all; float32 within 1e-6 relative. The interpreter's
float32 -> bfloat16 cast truncates (Triton 3.6): there bfloat16 is held to two ulps.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.fused_activation import silu_and_mul, silu_and_mul_ref  # noqa: E402

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def make(T, I, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn((T, 2 * I), generator=gen)).to(dtype).to(device)  # [T, 2I] = [gate | up]


def check(out, ref, dtype, interpreter):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    ulps = 8 if dtype == torch.float32 else 2 if interpreter else 1
    diff = (out.float() - ref.float()).abs()
    bound = ulps * ULP[dtype] * ref.float().abs() + 1e-6
    assert (diff <= bound).all(), f"max abs diff {diff.max().item()}, worst ratio {(diff / bound).max().item()}"
    if dtype != torch.float32 and not interpreter:
        mismatch = (out != ref).float().mean().item()
        assert mismatch <= 0.01, f"{mismatch:.2%} of elements differ"


@pytest.mark.parametrize("I", [64, 1536, 300])  # 1536: SmolLM2-135M; 300: partial last block
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_and_mul_matches_reference(kernel_device, dtype, I):
    x = make(5, I, dtype, kernel_device)
    check(silu_and_mul(x, block=256), silu_and_mul_ref(x), dtype, kernel_device == "cpu")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_silu_and_mul_strided_rows_out_and_extremes(kernel_device):
    """Rows of a wider buffer, a caller's output buffer, and gates far in both tails (no NaN)."""
    wide = make(4, 80, torch.float32, kernel_device, seed=1)  # [4, 160]
    x = wide[:, :128]  # [4, 128] = [gate | up] with I = 64, row stride 160
    x[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0])
    out = torch.full((4, 64), float("nan"), device=kernel_device)
    assert silu_and_mul(x, out=out, block=32) is out
    check(out, silu_and_mul_ref(x), torch.float32, kernel_device == "cpu")


def test_silu_and_mul_zero_tokens_and_errors(kernel_device):
    assert silu_and_mul(torch.empty((0, 64), device=kernel_device)).shape == (0, 32)
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        silu_and_mul(torch.empty((3, 5), device=kernel_device))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 128, 4096])
def test_silu_and_mul_llama8b_bf16(T):
    """Llama-3.1-8B MLP: intermediate 14336, bf16."""
    x = make(T, 14336, torch.bfloat16, "cuda", seed=T)
    check(silu_and_mul(x), silu_and_mul_ref(x), torch.bfloat16, interpreter=False)


@pytest.mark.gpu
def test_silu_and_mul_cuda_graph_replay():
    x = make(8, 14336, torch.bfloat16, "cuda", seed=5)
    silu_and_mul(x)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = silu_and_mul(x)
    x.copy_(make(8, 14336, torch.bfloat16, "cuda", seed=6))
    graph.replay()
    torch.cuda.synchronize()
    check(out, silu_and_mul_ref(x), torch.bfloat16, interpreter=False)
