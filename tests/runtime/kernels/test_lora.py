"""Batched LoRA (``plait.runtime.kernels.lora``): the torch references against a per-token loop over
unpadded adapters, and both Triton layouts (gathered, segmented) against the references.

Under the CPU interpreter the kernels run in float32 and float16 (the interpreter mis-reads bfloat16
in some paths); on a GPU in bfloat16 too, and inside a CUDA graph. Slots mix adapters and the base
model (-1); ranks are padded; outputs go into column slices of a wider ``y``; sizes are odd.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.lora import (
    lora_expand,
    lora_expand_reference,
    lora_expand_triton,
    lora_shrink,
    lora_shrink_reference,
    lora_shrink_triton,
)
from tests.runtime.triton_support import HAS_CUDA

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# float32 products in the segmented kernel are exact ("ieee"); half-precision outputs round once
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _adapters(gen: torch.Generator, ranks: list[int], k: int, n: int, dtype: torch.dtype, rslora: bool = False):
    """Unpadded (A [r, K], B [N, r], scale) per adapter, and the padded slot tensors A [S, R, K], B [S, N, R]."""
    max_rank = max(ranks)
    stacked_a = torch.zeros(len(ranks), max_rank, k, dtype=dtype)
    stacked_b = torch.zeros(len(ranks), n, max_rank, dtype=dtype)
    adapters = []
    for i, r in enumerate(ranks):
        a = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(dtype)
        b = torch.randn(n, r, generator=gen).to(dtype)
        alpha = 2.0 * r + 1
        adapters.append((a, b, alpha / math.sqrt(r) if rslora else alpha / r))
        stacked_a[i, :r] = a
        stacked_b[i, :, :r] = b
    scaling = torch.tensor([scale for _, _, scale in adapters], dtype=torch.float32)
    return adapters, stacked_a, stacked_b, scaling


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rslora", [False, True])
def test_references_equal_a_per_token_loop_over_unpadded_adapters(rslora):
    gen = torch.Generator().manual_seed(1)
    T, K, N, offset = 11, 24, 10, 3
    adapters, stacked_a, stacked_b, scaling = _adapters(gen, [4, 8, 2], K, N, torch.float32, rslora)
    x = torch.randn(T, K, generator=gen)
    slots = torch.tensor([0, -1, 2, 2, 1, -1, 0, 1, 1, 2, 0], dtype=torch.int32)
    y = torch.randn(T, N + 5, generator=gen)
    expected = y.double().clone()
    for t in range(T):
        s = int(slots[t])
        if s >= 0:
            a, b, scale = adapters[s]
            expected[t, offset:offset + N] += scale * (b.double() @ (a.double() @ x[t].double()))

    h = lora_shrink_reference(x, stacked_a, slots)
    assert h.dtype == torch.float32 and h.shape == (T, 8)
    assert torch.equal(h[slots < 0], torch.zeros(2, 8))
    lora_expand_reference(h, stacked_b, slots, scaling, y, column_offset=offset)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[slots < 0], expected[slots < 0].float())  # base-model rows untouched


def _case(T: int, K: int, N: int, ranks: list[int], dtype: torch.dtype, device: str, seed: int,
          contiguous_runs: bool = False):
    gen = torch.Generator().manual_seed(seed)
    _, stacked_a, stacked_b, scaling = _adapters(gen, ranks, K, N, dtype)
    x = torch.randn(T, K, generator=gen).to(dtype)
    if contiguous_runs:  # a prefill chunk: runs of one adapter, base-model runs among them
        cuts = sorted(torch.randint(0, T + 1, (4,), generator=gen).tolist())
        slots = torch.empty(T, dtype=torch.int32)
        for i, (lo, hi) in enumerate(zip([0] + cuts, cuts + [T])):
            slots[lo:hi] = (i % (len(ranks) + 1)) - 1
    else:
        slots = torch.randint(-1, len(ranks), (T,), generator=gen, dtype=torch.int32)
        slots[0] = 0 if T > 1 else slots[0]
    return [t.to(device) for t in (x, stacked_a, stacked_b, scaling, slots)]


SHAPES = [  # T, K, N, ranks (padded to the largest)
    (1, 40, 24, [8]),
    (9, 72, 50, [4, 16, 8]),
    (21, 33, 19, [3, 5]),
]


@pytest.mark.parametrize("kernel", ["gathered", "segmented"])
@pytest.mark.parametrize("T,K,N,ranks", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(kernel_device, kernel, T, K, N, ranks, dtype):
    x, a, b, scaling, slots = _case(T, K, N, ranks, dtype, kernel_device, seed=T * K + N)
    h_ref = lora_shrink_reference(x.cpu(), a.cpu(), slots.cpu())
    h = lora_shrink_triton(x, a, slots, kernel=kernel)
    assert h.dtype == torch.float32 and h.shape == h_ref.shape
    assert torch.equal(h.cpu()[slots.cpu() < 0], torch.zeros_like(h_ref[slots.cpu() < 0]))
    assert _rel(h.cpu(), h_ref) < TOL[torch.float32 if dtype == torch.float32 else torch.float16]

    offset = 5
    y0 = torch.randn(T, N + offset + 3, generator=torch.Generator().manual_seed(7)).to(dtype)
    y_ref = y0.clone()
    lora_expand_reference(h_ref, b.cpu(), slots.cpu(), scaling.cpu(), y_ref, column_offset=offset)
    y = y0.clone().to(kernel_device)
    lora_expand_triton(h_ref.to(kernel_device), b, slots, scaling, y, column_offset=offset, kernel=kernel)
    y = y.cpu()
    assert torch.equal(y[:, :offset], y0[:, :offset]) and torch.equal(y[:, offset + N:], y0[:, offset + N:])
    assert torch.equal(y[slots.cpu() < 0], y0[slots.cpu() < 0])
    assert _rel(y - y0.float(), y_ref - y0.float()) < TOL[dtype] * 4  # the LoRA delta alone


@pytest.mark.parametrize("kernel,T", [("segmented", 70), ("segmented", 300), (None, 70)])
def test_runs_of_one_adapter_over_token_blocks(kernel_device, kernel, T):
    """Runs of one adapter across block edges (a prefill chunk); at 300 tokens the blocks are wider."""
    x, a, b, scaling, slots = _case(T, 20, 18, [4, 6, 2], torch.float32, kernel_device, seed=3, contiguous_runs=True)
    h_ref = lora_shrink_reference(x.cpu(), a.cpu(), slots.cpu())
    h = lora_shrink_triton(x, a, slots, kernel=kernel)
    torch.testing.assert_close(h.cpu(), h_ref, rtol=1e-4, atol=1e-4)
    y = torch.zeros(T, 18, device=kernel_device)
    lora_expand_triton(h, b, slots, scaling, y, kernel=kernel)
    y_ref = torch.zeros(T, 18)
    lora_expand_reference(h_ref, b.cpu(), slots.cpu(), scaling.cpu(), y_ref)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-4)


def test_shrink_writes_into_out(kernel_device):
    x, a, _, _, slots = _case(5, 16, 8, [4, 2], torch.float32, kernel_device, seed=5)
    out = torch.full((5, 4), float("nan"), device=kernel_device)
    assert lora_shrink_triton(x, a, slots, out=out) is out
    torch.testing.assert_close(out.cpu(), lora_shrink_reference(x.cpu(), a.cpu(), slots.cpu()))
    out_cpu = torch.full((5, 4), float("nan"))
    assert lora_shrink_reference(x.cpu(), a.cpu(), slots.cpu(), out=out_cpu) is out_cpu
    assert not out_cpu.isnan().any()


def test_public_functions_run_the_reference_on_cpu():
    x, a, b, scaling, slots = _case(6, 16, 8, [4, 2], torch.float32, "cpu", seed=6)
    h = lora_shrink(x, a, slots)
    assert torch.equal(h, lora_shrink_reference(x, a, slots))
    y, y_ref = torch.ones(6, 8), torch.ones(6, 8)
    lora_expand(h, b, slots, scaling, y)
    lora_expand_reference(h, b, slots, scaling, y_ref)
    assert torch.equal(y, y_ref)


def test_bad_arguments_are_refused():
    x, a, b, scaling, slots = _case(4, 16, 8, [4], torch.float32, "cpu", seed=8)
    with pytest.raises(ValueError, match="int32"):
        lora_shrink(x, a, slots.long())
    with pytest.raises(ValueError, match="lora_a"):
        lora_shrink(x[:, :8], a, slots)
    with pytest.raises(ValueError, match="outside"):
        lora_expand(torch.zeros(4, 4), b, slots, scaling, torch.zeros(4, 10), column_offset=3)
    with pytest.raises(ValueError, match="scaling"):
        lora_expand(torch.zeros(4, 4), b, slots, scaling.repeat(2), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="kernel"):
        lora_shrink_triton(x, a, slots, kernel="sgmv")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kernel", ["gathered", "segmented"])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_cuda_graph_replays_with_new_slots(T, kernel):
    """Captured once; new slots and inputs copied into the same buffers give the new results."""
    x, a, b, scaling, slots = _case(T, 256, 192, [16, 8, 4, 16], torch.bfloat16, "cuda", seed=T)
    h = torch.empty(T, 16, device="cuda")
    y = torch.zeros(T, 192, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture
        lora_expand(lora_shrink(x, a, slots, out=h, kernel=kernel), b, slots, scaling, y, kernel=kernel)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_expand(lora_shrink(x, a, slots, out=h, kernel=kernel), b, slots, scaling, y, kernel=kernel)
    for seed in (11, 12):
        new_x, _, _, _, new_slots = _case(T, 256, 192, [16, 8, 4, 16], torch.bfloat16, "cuda", seed=seed)
        x.copy_(new_x)
        slots.copy_(new_slots)
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        h_ref = lora_shrink_reference(x.cpu(), a.cpu(), slots.cpu())
        y_ref = torch.zeros(T, 192, dtype=torch.bfloat16)
        lora_expand_reference(h_ref, b.cpu(), slots.cpu(), scaling.cpu(), y_ref)
        assert _rel(h.cpu(), h_ref) < 1e-4
        assert _rel(y.cpu(), y_ref) < 1.6e-2
