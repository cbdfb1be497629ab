"""TritonAttentionBackend vs TorchAttentionBackend on hand-built ForwardBatches.

Mixed batches (decode rows and extend rows with and without cached prefixes), decode-only and
extend-only batches. CPU: Triton's interpreter at tiny shapes, float32 (tolerance 1e-4). GPU:
Llama-3.1-8B attention shapes in bf16, both backends in bf16 (SDPA's and ours round differently):
max abs diff < 2e-2. The pool contents after the forward must be identical (same K/V writes).
Sliding windows and sinks: the same comparisons with the options on (the torch backend is checked
against a direct reference in test_attention_options.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.runtime.triton_support import HAS_CUDA, kernels_usable  # sets TRITON_INTERPRET without CUDA

triton = pytest.importorskip("triton")

from plait.runtime.kvcache.pool import KVPool  # noqa: E402
from plait.runtime.kvcache.table import ReqToSlotTable  # noqa: E402
from plait.runtime.layers.attention import TorchAttentionBackend  # noqa: E402
from plait.runtime.layers.triton_attention import TritonAttentionBackend  # noqa: E402
from tests.runtime.attention_batches import build_batch, make_pool_and_table, reference_output  # noqa: E402


@pytest.fixture(scope="module")
def device() -> str:
    reason = kernels_usable()
    if reason is not None:
        pytest.skip(reason)
    return "cuda" if HAS_CUDA else "cpu"


def compare(specs, H, KVH, D, dtype, device, tol, *, num_layers=2, seed=0, window=None, sinks=None, hybrid=False):
    gen = torch.Generator().manual_seed(seed)
    pool, table = make_pool_and_table(specs, KVH, D, dtype, device, gen, num_layers=num_layers,
                                      hybrid_window=window if hybrid else 0)
    batch, q, k, v = build_batch(pool, table, specs, H, gen)
    triton_be = TritonAttentionBackend(H, D, max_batch_size=8, max_kv_splits=8, device=device)
    torch_be = TorchAttentionBackend()
    layer = num_layers - 1
    before = [b.clone() for b in (pool.k_buffers[layer], pool.v_buffers[layer])]
    triton_be.prepare(batch)
    options = dict(sliding_window=window, sinks=sinks)
    out = triton_be.forward(q, k, v, layer, D**-0.5, batch, **options)
    after = [b.clone() for b in (pool.k_buffers[layer], pool.v_buffers[layer])]
    for buf, prev in zip((pool.k_buffers[layer], pool.v_buffers[layer]), before):
        buf.copy_(prev)
    torch_be.prepare(batch)
    ref = torch_be.forward(q, k, v, layer, D**-0.5, batch, **options)
    assert torch.equal(after[0], pool.k_buffers[layer]) and torch.equal(after[1], pool.v_buffers[layer])
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff < tol, f"max abs diff {diff} >= {tol}"
    if hybrid:  # the sliding layer read its sliding slots: the kernels' reference over that table agrees
        ref_rows = reference_output(batch, q, layer, D**-0.5, sliding_window=window, sinks=sinks)
        assert (out.float() - ref_rows).abs().max().item() < tol


@pytest.mark.parametrize(
    "specs",
    [
        [(0, 7), (5, 1), (20, 6), (0, 1), (33, 1)],  # mixed: prefill, decodes, an extend on a prefix
        [(9, 1), (0, 1), (70, 1)],  # decode only
        [(0, 18), (12, 3)],  # extend only
    ],
    ids=["mixed", "decode", "extend"],
)
@pytest.mark.parametrize("H,KVH,D", [(4, 2, 32), (6, 2, 48)])
def test_triton_backend_matches_torch_cpu_scale(device, specs, H, KVH, D):
    compare(specs, H, KVH, D, torch.float32, device, 1e-4)


def test_decode_batch_larger_than_buffers(device):
    """More decode rows than max_batch_size: temporary buffers, same results."""
    compare([(i % 5, 1) for i in range(11)], 4, 2, 32, torch.float32, device, 1e-4, seed=1)


@pytest.mark.parametrize("specs", [[(9, 1), (0, 1), (70, 1)], [(0, 7), (5, 1), (20, 6), (33, 1)]],
                         ids=["decode", "mixed"])
def test_decode_rows_filling_the_gpu_take_one_pass(device, monkeypatch, specs):
    """When the decode rows alone fill the GPU (``num_kv_splits_cap`` is 1; here a one-SM device), the
    stage-1 grid has one split and the kernel writes the output in one pass: same results."""
    import plait.runtime.kernels.decode_attention as kernels

    monkeypatch.setattr(kernels, "_num_sms", lambda device: 1)
    compare(specs, 4, 2, 32, torch.float32, device, 1e-4, seed=2)
    pool, table = make_pool_and_table(specs, 2, 32, torch.float32, device, torch.Generator().manual_seed(0))
    batch = build_batch(pool, table, specs, 4, torch.Generator().manual_seed(0))[0]
    backend = TritonAttentionBackend(4, 32, max_batch_size=8, max_kv_splits=8, device=device)
    backend.prepare(batch)
    assert batch.attn_metadata.decode_max_splits == 1
    monkeypatch.setattr(kernels, "_num_sms", lambda device: 132)
    backend.prepare(batch)
    assert batch.attn_metadata.decode_max_splits == 8


def gpt_oss_sinks(H, dtype, device):
    return (2.0 * torch.randn(H, generator=torch.Generator().manual_seed(5))).to(dtype).to(device)


# mixed: decodes and extends whose cached prefixes are longer than the window, a prefill past it
WINDOW_MIXED = [(0, 21), (40, 1), (30, 7), (3, 1), (9, 1), (25, 4)]


@pytest.mark.parametrize(
    "specs,window,with_sinks",
    [
        (WINDOW_MIXED, 8, True),
        (WINDOW_MIXED, 8, False),
        (WINDOW_MIXED, None, True),
        ([(50, 1), (7, 1), (8, 1), (9, 1)], 8, True),  # decode only; lengths around the window
        ([(0, 18), (12, 3)], 18, False),  # extend only; the window equals the prefill's length
    ],
    ids=["mixed-window-sinks", "mixed-window", "mixed-sinks", "decode-window-sinks", "extend-window"],
)
def test_triton_backend_window_sinks_cpu_scale(device, specs, window, with_sinks):
    H, KVH, D = 4, 2, 32
    sinks = gpt_oss_sinks(H, torch.float32, device) if with_sinks else None
    compare(specs, H, KVH, D, torch.float32, device, 1e-4, window=window, sinks=sinks)


@pytest.mark.parametrize("specs", [WINDOW_MIXED, [(50, 1), (7, 1), (8, 1), (9, 1)]], ids=["mixed", "decode"])
def test_triton_backend_hybrid_pool_sliding_layer(device, specs):
    """A hybrid pool (the sliding layer's KV in sliding slots, numbered apart from the full ones): both
    backends write and read that layer through the sliding table and agree with the reference."""
    H, KVH, D = 4, 2, 32
    compare(specs, H, KVH, D, torch.float32, device, 1e-4, window=8, sinks=gpt_oss_sinks(H, torch.float32, device),
            hybrid=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "specs",
    [
        [(int(x), 1) for x in torch.randint(1, 4096, (64,), generator=torch.Generator().manual_seed(0))]
        + [(0, 1500), (3000, 700), (128, 1)],
        [(int(x), 1) for x in torch.randint(1, 8192, (200,), generator=torch.Generator().manual_seed(1))],
    ],
    ids=["mixed-67", "decode-200"],
)
def test_triton_backend_matches_torch_llama8b_bf16(specs):
    compare(specs, 32, 8, 128, torch.bfloat16, "cuda", 2e-2, num_layers=1)


@pytest.mark.gpu
def test_triton_backend_decode_cuda_graph():
    """A decode-only forward captured once replays correctly after prepare() of a new batch of that size."""
    H, KVH, D, B = 32, 8, 128, 16
    gen = torch.Generator().manual_seed(2)
    pool = KVPool(B * 3000, 1, KVH, D, torch.bfloat16, "cuda")
    pool.k_buffers[0].copy_(torch.randn(pool.k_buffers[0].shape, generator=gen).bfloat16())
    pool.v_buffers[0].copy_(torch.randn(pool.v_buffers[0].shape, generator=gen).bfloat16())
    table = ReqToSlotTable(2 * B, 3000, "cuda")
    backend = TritonAttentionBackend(H, D, device="cuda")
    def decode_specs():
        return [(int(x), 1) for x in torch.randint(1, 1400, (B,), generator=gen)]

    batch1, q, k, v = build_batch(pool, table, decode_specs(), H, gen)
    backend.prepare(batch1)
    backend.forward(q, k, v, 0, D**-0.5, batch1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, 0, D**-0.5, batch1)
    batch2, q2, k2, v2 = build_batch(pool, table, decode_specs(), H, gen)
    for static, new in ((q, q2), (k, k2), (v, v2), (batch1.out_cache_loc, batch2.out_cache_loc)):
        static.copy_(new)
    backend.prepare(batch2)  # refills the persistent decode metadata in place
    graph.replay()
    torch_be = TorchAttentionBackend()
    torch_be.prepare(batch2)
    ref = torch_be.forward(q2, k2, v2, 0, D**-0.5, batch2)
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff < 2e-2, f"max abs diff {diff}"


GPT_OSS_SPECS = {
    "mixed-40": [(int(x), 1) for x in torch.randint(1, 4096, (36,), generator=torch.Generator().manual_seed(3))]
    + [(0, 3000), (2500, 600), (127, 129), (128, 1)],
    "decode-128": [(int(x), 1) for x in torch.randint(1, 6000, (128,), generator=torch.Generator().manual_seed(4))],
}


@pytest.mark.gpu
@pytest.mark.parametrize("specs", list(GPT_OSS_SPECS.values()), ids=list(GPT_OSS_SPECS))
@pytest.mark.parametrize("window", [128, None])
def test_triton_backend_gpt_oss_shapes_bf16(specs, window):
    """GPT-OSS attention (64 heads of 64 on 8 KV heads, bf16 sinks) on sliding and full layers."""
    H, KVH, D = 64, 8, 64
    compare(specs, H, KVH, D, torch.bfloat16, "cuda", 2e-2, num_layers=1, window=window,
            sinks=gpt_oss_sinks(H, torch.bfloat16, "cuda"))


@pytest.mark.gpu
def test_triton_backend_decode_cuda_graph_window_sinks():
    """A windowed layer with sinks, captured once, replays correctly after prepare() of a new batch."""
    H, KVH, D, B, W = 64, 8, 64, 8, 128
    gen = torch.Generator().manual_seed(6)
    pool = KVPool(B * 3000, 1, KVH, D, torch.bfloat16, "cuda")
    pool.k_buffers[0].copy_(torch.randn(pool.k_buffers[0].shape, generator=gen).bfloat16())
    pool.v_buffers[0].copy_(torch.randn(pool.v_buffers[0].shape, generator=gen).bfloat16())
    table = ReqToSlotTable(2 * B, 3000, "cuda")
    backend = TritonAttentionBackend(H, D, device="cuda")
    sinks = gpt_oss_sinks(H, torch.bfloat16, "cuda")
    options = dict(sliding_window=W, sinks=sinks)

    def decode_specs():
        return [(int(x), 1) for x in torch.randint(1, 2500, (B,), generator=gen)]

    batch1, q, k, v = build_batch(pool, table, decode_specs(), H, gen)
    backend.prepare(batch1)
    backend.forward(q, k, v, 0, D**-0.5, batch1, **options)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, 0, D**-0.5, batch1, **options)
    batch2, q2, k2, v2 = build_batch(pool, table, decode_specs(), H, gen)
    for static, new in ((q, q2), (k, k2), (v, v2), (batch1.out_cache_loc, batch2.out_cache_loc)):
        static.copy_(new)
    sinks.mul_(-1.0)  # a parameter updated in place: the replay reads its new values
    backend.prepare(batch2)
    graph.replay()
    torch_be = TorchAttentionBackend()
    torch_be.prepare(batch2)
    ref = torch_be.forward(q2, k2, v2, 0, D**-0.5, batch2, **options)
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff < 2e-2, f"max abs diff {diff}"
