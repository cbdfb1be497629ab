"""TorchAttentionBackend with sliding windows and attention sinks vs a direct float32 reference.

The reference (``attention_rows_ref``) is plain masked softmax attention: the query at position ``i``
sees keys ``j`` with ``i - W < j <= i`` and each head's softmax has one more term, its sink logit.
Float32 on the CPU: max abs diff < 1e-4 (SDPA and the reference sum in different orders).
"""

from __future__ import annotations

import pytest
import torch

from plait.runtime.layers import attention as attention_module
from plait.runtime.layers.attention import Attention, TorchAttentionBackend
from tests.runtime.attention_batches import build_batch, make_pool_and_table, reference_output

# mixed: a prefill longer than the windows, decodes with short and long prefixes, an extend on a prefix
MIXED = [(0, 23), (5, 1), (40, 6), (0, 1), (33, 1), (2, 3)]
DECODE = [(9, 1), (0, 1), (70, 1), (15, 1)]


def run_layer(specs, H, KVH, D, dtype, *, window, sinks, seed=0, layer=1):
    """One layer forward through the Attention front; returns (output, float32 reference)."""
    gen = torch.Generator().manual_seed(seed)
    pool, table = make_pool_and_table(specs, KVH, D, dtype, "cpu", gen)
    batch, q, k, v = build_batch(pool, table, specs, H, gen)
    backend = TorchAttentionBackend()
    backend.prepare(batch)
    attn = Attention(layer, D, backend, sliding_window=window)
    out = attn(q, k, v, batch, sinks=sinks)
    ref = reference_output(batch, q, layer, D**-0.5, sliding_window=window, sinks=sinks)
    return out, ref


def check(out, ref, tol):
    assert torch.isfinite(out).all()
    diff = (out.float() - ref).abs().max().item()
    assert diff < tol, f"max abs diff {diff} >= {tol}"


def sinks_for(H, seed=7):
    # large enough that the sink takes a visible share of the mass (logits are ~N(0, 1) here)
    return 2.0 * torch.randn(H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("specs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("window", [None, 1, 4, 6, 7, 16, 1000])  # 6/7: at the boundary of the 6-token extend
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("H,KVH", [(4, 2), (4, 4)])
def test_torch_backend_window_sinks(specs, window, with_sinks, H, KVH):
    sinks = sinks_for(H) if with_sinks else None
    out, ref = run_layer(specs, H, KVH, 16, torch.float32, window=window, sinks=sinks)
    check(out, ref, 1e-4)


def test_window_actually_masks():
    """A window smaller than the sequence changes the output (the reference is not blind to it)."""
    out_w, _ = run_layer(MIXED, 4, 2, 16, torch.float32, window=4, sinks=None)
    out_full, _ = run_layer(MIXED, 4, 2, 16, torch.float32, window=None, sinks=None)
    assert (out_w - out_full).abs().max() > 1e-2


def test_sinks_take_mass():
    """A very large sink drives every output to zero; a very negative one leaves plain attention."""
    H = 4
    out_big, _ = run_layer(MIXED, H, 2, 16, torch.float32, window=None, sinks=torch.full((H,), 60.0))
    assert out_big.abs().max() < 1e-6
    out_neg, _ = run_layer(MIXED, H, 2, 16, torch.float32, window=None, sinks=torch.full((H,), -1e4))
    out_none, _ = run_layer(MIXED, H, 2, 16, torch.float32, window=None, sinks=None)
    check(out_neg, out_none.float(), 1e-5)


@pytest.mark.parametrize("window", [3, 5, None])
def test_query_chunks(monkeypatch, window):
    """Extend rows split into query chunks (each with its own key range) give the same result."""
    monkeypatch.setattr(attention_module, "WINDOW_QUERY_CHUNK", 4)
    out, ref = run_layer(MIXED + [(50, 13)], 4, 2, 16, torch.float32, window=window, sinks=sinks_for(4))
    check(out, ref, 1e-4)


def test_gpt_oss_head_shape_bf16():
    """head_dim 64, 8 query heads on 2 KV heads, window 8, bf16 pool and bf16 sinks (the model's dtype)."""
    specs = [(0, 20), (30, 1), (12, 5), (3, 1)]
    out, ref = run_layer(specs, 8, 2, 64, torch.bfloat16, window=8, sinks=sinks_for(8).bfloat16())
    assert out.dtype == torch.bfloat16
    check(out, ref, 2e-2)


def test_layers_share_plans_and_window_is_validated():
    specs = [(10, 1), (0, 5)]
    gen = torch.Generator().manual_seed(3)
    pool, table = make_pool_and_table(specs, 2, 16, torch.float32, "cpu", gen)
    batch, q, k, v = build_batch(pool, table, specs, 4, gen)
    backend = TorchAttentionBackend()
    backend.prepare(batch)
    Attention(0, 16, backend, sliding_window=4)(q, k, v, batch)
    Attention(1, 16, backend, sliding_window=4)(q, k, v, batch, sinks=sinks_for(4))
    Attention(1, 16, backend)(q, k, v, batch, sinks=sinks_for(4))
    assert set(batch.attn_metadata.plans) == {None, 4, attention_module._UNBOUNDED}
    with pytest.raises(ValueError, match="sliding_window"):
        Attention(0, 16, backend, sliding_window=0)


@pytest.mark.parametrize("window", [None, 1, 5, 12])
def test_reference_matches_transformers_gpt_oss(window):
    """The reference's window boundary and sink softmax are transformers' GPT-OSS eager attention's."""
    masking = pytest.importorskip("transformers.masking_utils")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from plait.runtime.kernels.common import attention_rows_ref

    gen = torch.Generator().manual_seed(11)
    H, KVH, D, S = 4, 2, 16, 12
    q, k, v = (torch.randn((S, h, D), generator=gen, dtype=torch.float64) for h in (H, KVH, KVH))
    sinks = sinks_for(H).double()
    pos = torch.arange(S)
    if window is None:
        allowed = masking.causal_mask_function(0, 0, pos[:, None], pos[None, :])
    else:
        allowed = masking.sliding_window_causal_mask_function(window)(0, 0, pos[:, None], pos[None, :])  # [S, S]
    bias = torch.zeros((S, S), dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks = H // KVH, torch.nn.Parameter(sinks)
    hf, _ = gpt_oss.eager_attention_forward(
        module, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], bias[None, None], D**-0.5
    )  # [1, S, H, D]
    ours = attention_rows_ref(q, k, v, pos, D**-0.5, sliding_window=window, sinks=sinks)
    check(ours, hf[0].float(), 1e-5)
