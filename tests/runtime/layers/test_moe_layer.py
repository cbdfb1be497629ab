"""The shared MoE layer: routing modes, checkpoint layouts, and the local expert range / intermediate
slice that expert and tensor parallelism will use (partial outputs must add up to the whole)."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.kernels.fused_moe import fused_moe_ref
from plait.runtime.kernels.mxfp4 import Mxfp4Weight, has_small_scales, quantize_mxfp4
from plait.runtime.layers.moe import MoE, per_expert_target
from plait.runtime.models.config import MoEConfig

H, I, E = 64, 64, 6  # noqa: E741
SILU = MoEConfig(E, 2, I, "softmax_then_topk", True, "silu")
OAI = MoEConfig(E, 2, I, "topk_then_softmax", False, "swiglu_oai", router_bias=True, expert_bias=True,
                swiglu_limit=1.5)


def _checkpoint(moe: MoEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ckpt = {"router": torch.randn(E, H, generator=gen), "w13": torch.randn(E, 2 * I, H, generator=gen) * 0.2,
            "w2": torch.randn(E, H, I, generator=gen) * 0.2}
    if moe.router_bias:
        ckpt["router_bias"] = torch.randn(E, generator=gen)
    if moe.expert_bias:
        ckpt["b13"], ckpt["b2"] = torch.randn(E, 2 * I, generator=gen), torch.randn(E, H, generator=gen)
    return ckpt


def _layer(moe: MoEConfig, ckpt: dict[str, torch.Tensor], quantization: str | None = None, **ranges) -> MoE:
    """A layer loaded through its parameters' weight loaders from all-experts tensors."""
    layer = MoE(H, moe, quantization, **ranges)
    layer.router.weight.data.copy_(ckpt["router"])
    if moe.router_bias:
        layer.router.bias.data.copy_(ckpt["router_bias"])
    for part in ("w13", "w2"):
        if quantization == "mxfp4":
            q = quantize_mxfp4(ckpt[part])
            for leaf, tensor in (("blocks", q.blocks), ("scales", q.scales)):
                param = getattr(layer, f"{part}_{leaf}")
                param.weight_loader(param, tensor, (None, part))
        else:
            getattr(layer, part).weight_loader(getattr(layer, part), ckpt[part], (None, part))
    for part in ("b13", "b2") if moe.expert_bias else ():
        getattr(layer, part).weight_loader(getattr(layer, part), ckpt[part], (None, part))
    return layer


def test_routing_modes_follow_their_definitions():
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    for moe in (SILU, OAI):
        layer = _layer(moe, _checkpoint(moe))
        weights, ids = layer.route(x)
        logits = layer.router(x)
        if moe.routing == "softmax_then_topk":
            probs = torch.softmax(logits, -1)
            expected = probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True)
        else:
            expected = torch.softmax(logits.gather(1, ids), -1)
        assert torch.equal(ids, logits.topk(2, -1).indices)  # both modes pick the top logits
        torch.testing.assert_close(weights, expected)
        torch.testing.assert_close(weights.sum(-1), torch.ones(5))


@pytest.mark.parametrize("moe", [SILU, OAI], ids=["silu", "swiglu_oai"])
def test_forward_is_fused_moe_ref_on_the_routed_experts(moe):
    ckpt = _checkpoint(moe)
    layer = _layer(moe, ckpt)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(2))
    weights, ids = layer.route(x)
    ref = fused_moe_ref(x, ckpt["w13"], ckpt["w2"], weights, ids, b13=ckpt.get("b13"), b2=ckpt.get("b2"),
                        activation=moe.activation, swiglu_limit=moe.swiglu_limit)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("quantization", [None, "mxfp4"])
@pytest.mark.parametrize("moe", [SILU, OAI], ids=["silu", "swiglu_oai"])
def test_local_expert_ranges_and_intermediate_slices_add_up(moe, quantization):
    """Expert parallel (two expert ranges) and tensor parallel (two I slices, b2 in one of them): the
    partial outputs sum to the whole layer's output."""
    ckpt = _checkpoint(moe)
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(3))
    whole = _layer(moe, ckpt, quantization)(x)
    by_experts = sum(_layer(moe, ckpt, quantization, expert_range=r)(x) for r in ((0, 2), (2, E)))
    torch.testing.assert_close(by_experts, whole, rtol=1e-4, atol=1e-4)
    halves = [_layer(moe, ckpt, quantization, intermediate_range=r) for r in ((0, I // 2), (I // 2, I))]
    if moe.expert_bias:
        halves[1].b2.data.zero_()  # the down bias belongs to one slice only
    torch.testing.assert_close(sum(h(x) for h in halves), whole, rtol=1e-4, atol=1e-4)


def test_per_expert_tensors_load_like_fused_ones():
    ckpt = _checkpoint(SILU)
    fused = _layer(SILU, ckpt)
    layer = MoE(H, SILU, expert_range=(1, 4), intermediate_range=(16, 48))
    names = {"router": "gate", "gate": "w1", "up": "w3", "down": "w2"}
    for e in range(E):
        for proj, tensor in (("w1", ckpt["w13"][e, :I]), ("w3", ckpt["w13"][e, I:]), ("w2", ckpt["w2"][e])):
            param_name, shard = per_expert_target(f"model.layers.0.block_sparse_moe.experts.{e}.{proj}.weight",
                                                  "block_sparse_moe", names)
            assert param_name == f"model.layers.0.mlp.{'w2' if proj == 'w2' else 'w13'}"
            param = getattr(layer, param_name.rsplit(".", 1)[1])
            param.weight_loader(param, tensor, shard)
    rows = torch.cat((torch.arange(16, 48), torch.arange(I + 16, I + 48)))
    assert torch.equal(layer.w13.data, fused.w13.data[1:4, rows])
    assert torch.equal(layer.w2.data, fused.w2.data[1:4, :, 16:48])
    assert per_expert_target("model.layers.0.block_sparse_moe.gate.weight", "block_sparse_moe", names) == (
        "model.layers.0.mlp.router.weight", None)
    assert per_expert_target("model.layers.0.self_attn.q_proj.weight", "block_sparse_moe", names) is None


def test_format_mismatch_is_a_clear_error():
    from plait.runtime.models.errors import ModelLoadError

    layer = MoE(H, OAI, "mxfp4")
    with pytest.raises(ModelLoadError, match="checkpoint's format"):
        layer.w13_blocks.weight_loader(layer.w13_blocks, torch.zeros(E, 2 * I, H // 32, 16), (None, "w13"))
    assert isinstance(layer.expert_weights()[0], Mxfp4Weight)


def test_prepare_for_kernels_can_pack_fragments_and_keeps_the_output():
    """Packing (the sm_90 decode's form; forced here on the CPU, where the reference reads any form):
    both weights row-paired and fragment-packed, the natural codes and the output unchanged. By default
    nothing is packed off an sm_90 GPU."""
    ckpt = _checkpoint(OAI)
    layer = _layer(OAI, ckpt, "mxfp4")
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(4))
    before = layer(x)
    natural = [w.blocks.clone() for w in layer.expert_weights()]
    layer.prepare_for_kernels(swizzle=True, pack=True)
    assert layer.fragment_packed == (True, True)
    assert all(w.row_paired and w.fragment_packed for w in layer.expert_weights())
    assert all(torch.equal(w.natural_blocks(), c) for w, c in zip(layer.expert_weights(), natural))
    assert torch.equal(layer(x), before)
    plain = _layer(OAI, ckpt, "mxfp4")
    plain.prepare_for_kernels(swizzle=True)
    assert plain.fragment_packed == (False, False) and not plain._sm90_bf16_decode()


def test_prepare_for_kernels_swizzles_mxfp4_codes_and_keeps_the_output():
    """On a GPU the runner calls prepare_for_kernels after loading; forced here on the CPU: the codes
    change order, the layer computes the same output, and loading afterwards is refused."""
    from plait.runtime.models.errors import ModelLoadError

    ckpt = _checkpoint(OAI)
    layer = _layer(OAI, ckpt, "mxfp4")
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    before, blocks = layer(x), layer.w13_blocks.data.clone()
    natural = [w.blocks.clone() for w in layer.expert_weights()]
    layer.prepare_for_kernels()  # the default acts only where the kernel runs (CUDA)
    assert not layer.k_swizzled and torch.equal(layer.w13_blocks.data, blocks)
    layer.prepare_for_kernels(swizzle=True)
    assert layer.k_swizzled and not torch.equal(layer.w13_blocks.data, blocks)
    assert all(w.k_swizzled for w in layer.expert_weights())
    assert all(w.row_paired for w in layer.expert_weights())  # I and H multiples of 16 here
    assert all(w.small_scales == has_small_scales(w.scales) for w in layer.expert_weights())
    assert all(torch.equal(w.natural_blocks(), c) for w, c in zip(layer.expert_weights(), natural))
    assert torch.equal(layer(x), before)
    layer.prepare_for_kernels(swizzle=True)  # idempotent
    assert torch.equal(layer(x), before)
    with pytest.raises(ModelLoadError, match="already prepared"):
        layer.w2_blocks.weight_loader(layer.w2_blocks, layer.w2_blocks.data.clone(), (None, "w2"))
