"""Tensor parallelism of mixture-of-experts models on the CPU (gloo), float32.

Experts are split as SGLang's MoE tensor parallelism does: every rank holds every expert, each
expert's intermediate dimension split (MXFP4 experts in whole 32-value blocks), the router whole,
one all-reduce after the layer, the down projection's bias added by one slice only. Checked here:
the layout's splits and refusals; that the MoE layer's slices (every expert format: per-expert and
fused SiLU experts, GPT-OSS's interleaved experts in float32 and in MXFP4, with biases) sum to the
whole layer; that every MoE architecture's rank-1 part loads a checkpoint completely; and one
``Engine(tp_size=2)`` on a tiny GPT-OSS with MXFP4 experts (sinks split with the heads, biases,
sliding-window layers, in the hybrid KV layout on every rank) against the whole model: prompt
logprobs at every position within 1e-4 (the ranks' partial sums are added in another order) and the
same greedy tokens through chunked prefill, retraction and prefix-cache hits past the window.
"""

from __future__ import annotations

import pytest
import torch

from plait.runtime.distributed import TensorParallelLayout
from plait.runtime.models.config import ModelConfig, MoEConfig

pytestmark = pytest.mark.model

transformers = pytest.importorskip("transformers")


def _moe_model(intermediate: int, quantization: str | None = None, activation: str = "swiglu_oai") -> ModelConfig:
    moe = MoEConfig(4, 2, intermediate, "topk_then_softmax", False, activation, router_bias=True, expert_bias=True)
    return ModelConfig(model_type="gpt_oss", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=96, vocab_size=101, rms_norm_eps=1e-5, rope_theta=1e4,
                       max_position_embeddings=64, moe=moe, quantization=quantization)


def _splits(cfg: ModelConfig, size: int) -> list[tuple[int, int]]:
    return [TensorParallelLayout.for_model(cfg, r, size).moe_intermediate_range for r in range(size)]


def test_layout_splits_every_experts_intermediate_dim():
    assert _splits(_moe_model(96), 2) == [(0, 48), (48, 96)]
    assert _splits(_moe_model(10), 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]  # rows: uneven is fine
    # GPT-OSS's 2880 in MXFP4: 90 scale blocks, 45 per rank; over 4 ranks 23, 23, 22, 22 blocks
    assert _splits(_moe_model(2880, "mxfp4"), 2) == [(0, 1440), (1440, 2880)]
    assert _splits(_moe_model(2880, "mxfp4"), 4) == [(0, 736), (736, 1472), (1472, 2176), (2176, 2880)]
    whole = TensorParallelLayout.for_model(_moe_model(2880, "mxfp4"))
    assert whole.moe_intermediate_range == (0, 2880)
    local = TensorParallelLayout.for_model(_moe_model(96), 1, 2).local_config(_moe_model(96))
    assert local.moe.intermediate_size == 96  # the MoE layer takes its slice from the layout


@pytest.mark.parametrize("cfg, size, message", [
    (_moe_model(64, "mxfp4"), 4, r"intermediate size 64 \(2 blocks of 32\) cannot be split over 4 ranks"),
    (_moe_model(3), 4, r"intermediate size 3 \(3 intermediate rows\) cannot be split over 4 ranks"),
    (_moe_model(48, "mxfp4"), 2, "48 is not a multiple of 32"),
])
def test_layout_refuses_expert_splits_it_cannot_make(cfg, size, message):
    with pytest.raises(ValueError, match=message):
        TensorParallelLayout.for_model(cfg, 0, size)


# (activation, weight format, checkpoint layout): "fused" = every expert in one tensor, "per_expert" = one
# tensor per expert and projection (Mixtral/Qwen3-MoE on the Hub)
LAYER_FORMATS = [("silu", None, "per_expert"), ("silu", None, "fused"), ("swiglu_oai", None, "fused"),
                 ("swiglu_oai", "mxfp4", "fused")]


def _checkpoint(moe: MoEConfig, hidden: int, quantization: str | None, layout: str) -> list[tuple[str, object, object]]:
    """Random expert tensors as (parameter name, shard id, tensor), in the layout a loader hands over."""
    from plait.runtime.kernels.mxfp4 import quantize_mxfp4

    gen = torch.Generator().manual_seed(0)
    E, I, H = moe.num_experts, moe.intermediate_size, hidden  # noqa: E741

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    w13, w2 = rand(E, 2 * I, H), rand(E, H, I)
    tensors = [("router.weight", None, rand(E, H))]
    if moe.router_bias:
        tensors.append(("router.bias", None, rand(E)))
    if moe.expert_bias:
        tensors += [("b13", (None, "b13"), rand(E, 2 * I)), ("b2", (None, "b2"), rand(E, H))]
    if quantization == "mxfp4":
        for name, w in (("w13", w13), ("w2", w2)):
            q = quantize_mxfp4(w)
            tensors += [(f"{name}_blocks", (None, name), q.blocks), (f"{name}_scales", (None, name), q.scales)]
    elif layout == "fused":
        tensors += [("w13", (None, "w13"), w13), ("w2", (None, "w2"), w2)]
    else:
        for e in range(E):
            tensors += [("w13", (e, "gate"), w13[e, :I]), ("w13", (e, "up"), w13[e, I:]), ("w2", (e, "w2"), w2[e])]
    return tensors


@pytest.mark.parametrize("activation, quantization, layout", LAYER_FORMATS)
def test_expert_slices_sum_to_the_whole_layer(activation, quantization, layout):
    """Rank 0's and rank 1's MoE layers (``MoE.for_layout``) loaded from the same checkpoint tensors: the
    sum of their outputs (what the all-reduce computes) is the whole layer's output, so the down
    projection's bias is added once, and each slice holds only its part of every expert."""
    from plait.runtime.layers.moe import MoE

    cfg = _moe_model(64, quantization, activation)
    expert_bias = activation == "swiglu_oai"
    cfg = ModelConfig(**{**cfg.__dict__, "moe": MoEConfig(**{**cfg.moe.__dict__, "router_bias": expert_bias,
                                                              "expert_bias": expert_bias})})
    layers = [MoE.for_layout(cfg, None)] + [MoE.for_layout(cfg, TensorParallelLayout.for_model(cfg, r, 2))
                                            for r in range(2)]
    for layer in layers:
        params = dict(layer.named_parameters())
        for name, shard, tensor in _checkpoint(cfg.moe, cfg.hidden_size, quantization, layout):
            params[name].weight_loader(params[name], tensor, shard)
    whole, rank0, rank1 = layers
    assert rank1.reduce_results and not whole.reduce_results
    assert (rank1.intermediate_start, rank1.intermediate_end) == (32, 64)
    assert not rank1.adds_down_bias and rank0.adds_down_bias
    x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, parts = whole(x), rank0(x) + rank1(x)  # a group of one: the layers' all-reduce adds nothing
    assert torch.allclose(parts, expected, atol=1e-5, rtol=1e-5), (parts - expected).abs().max().item()
    rows = rank1.w13_blocks if quantization else rank1.w13
    assert rows.shape[1] == 64  # 2 x 32 rows of gate/up per expert


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random checkpoints: {"gpt_oss_mxfp4", "mixtral", "qwen3_moe"} -> directory."""
    from tests.runtime.models.moe_helpers import build_hf
    from tests.runtime.models.test_gpt_oss_mxfp4 import write_mxfp4_checkpoint

    dirs = {}
    for name in ("mixtral", "qwen3_moe"):
        dirs[name] = tmp_path_factory.mktemp(name)
        build_hf(name).save_pretrained(dirs[name], safe_serialization=True)
    dirs["gpt_oss_mxfp4"] = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    write_mxfp4_checkpoint(build_hf("gpt_oss"), dirs["gpt_oss_mxfp4"])
    return dirs


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "gpt_oss_mxfp4"])
def test_a_ranks_part_of_each_moe_model_loads_completely(name, checkpoints):
    """Rank 1 of 2 of each MoE architecture (Qwen3-MoE's dense layer included) takes every parameter
    from the checkpoint, each of its own size."""
    from plait.runtime.executor.loader import iter_safetensors_weights, load_config
    from plait.runtime.executor.model_runner import materialize
    from plait.runtime.layers.attention import TorchAttentionBackend
    from plait.runtime.models.architectures import model_class

    cfg = ModelConfig.from_hf(load_config(checkpoints[name]))
    layout = TensorParallelLayout.for_model(cfg, 1, 2)
    with torch.device("meta"):
        model = model_class(cfg.model_type)(cfg, TorchAttentionBackend(), 64, layout=layout)
    materialize(model, torch.device("cpu"), torch.float32)
    loaded = model.load_weights(iter_safetensors_weights(checkpoints[name]))
    assert loaded == {n for n, _ in model.named_parameters()}
    moe = cfg.moe.intermediate_size // 2
    for i, layer in enumerate(model.model.layers):
        if cfg.is_moe_layer(i):
            assert layer.mlp.intermediate_start == moe and layer.mlp.reduce_results
        else:  # a dense layer keeps its own split
            assert layer.mlp.down_proj.input_start == cfg.intermediate_size // 2


NEW = 6  # greedy tokens per request


@pytest.fixture(scope="module")
def gpt_oss_engines(checkpoints):
    """(Engine(tp_size=2), the whole model's engine) on the tiny MXFP4 GPT-OSS; the TP engine's pool is
    too small for every prompt at once (retractions follow), its prefill chunks shorter than the prompts."""
    from plait.runtime.engine import Engine
    from tests.runtime.models.moe_helpers import PROMPTS

    path = str(checkpoints["gpt_oss_mxfp4"])
    total = max(len(ids) for ids in PROMPTS) + NEW + 4
    whole = Engine(model=path, max_total_tokens=512)
    tp = Engine(model=path, tp_size=2, max_total_tokens=total, chunked_prefill_size=16, schedule_conservativeness=0)
    yield tp, whole
    tp.shutdown()
    whole.shutdown()


def test_gpt_oss_over_two_ranks_computes_the_whole_models_logprobs(gpt_oss_engines):
    """Prompt logprobs at every position (a 61-token prompt: four prefill chunks) equal the whole model's."""
    from tests.runtime.models.moe_helpers import PROMPTS, prompt_logprobs

    tp, whole = gpt_oss_engines
    mlp = tp.runner.model.model.layers[0].mlp
    assert tp.runner.model.layout.size == 2 and mlp.w13_blocks.shape[1] == 2 * 32  # half of each expert, MXFP4
    assert tp.runner.model.model.layers[0].self_attn.sinks.shape == (2,)  # 2 of the 4 heads' sinks
    # the hybrid sliding-window KV layout on every rank, as for the whole model (under sliding pressure:
    # tests/runtime/test_tensor_parallel_hybrid_kv.py)
    assert whole.runner.pool.hybrid and tp.runner.pool.hybrid
    assert tp.runner.rank_pool_sizes == [(tp.runner.pool.capacity, tp.runner.pool.num_sliding_slots)] * 2
    for ids in PROMPTS[:2]:
        ours, ref = prompt_logprobs(tp, ids), prompt_logprobs(whole, ids)
        assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max().item()


def test_gpt_oss_over_two_ranks_gives_the_whole_models_tokens(gpt_oss_engines):
    """Greedy tokens through chunked prefill and retraction, then prefix-cache hits past the window."""
    from tests.runtime.engine_helpers import assert_no_leak
    from tests.runtime.models.moe_helpers import PROMPTS, WINDOW, greedy

    tp, whole = gpt_oss_engines
    variants = [PROMPTS[1][:30] + [7, 8, 9], PROMPTS[1] + [13, 14]]
    refs = [o["output_ids"] for o in whole.generate(input_ids=PROMPTS + variants, sampling_params=greedy(NEW))]
    outs = tp.generate(input_ids=PROMPTS, sampling_params=greedy(NEW))
    assert [o["output_ids"] for o in outs] == refs[: len(PROMPTS)]
    assert tp.stats()["retractions"] > 0
    tp.generate(input_ids=PROMPTS[1], sampling_params=greedy(1))
    for ids, ref in zip(variants, refs[len(PROMPTS):]):
        out = tp.generate(input_ids=ids, sampling_params=greedy(NEW))
        assert out["output_ids"] == ref
        assert out["meta_info"]["cached_tokens"] > 3 * WINDOW
    assert_no_leak(tp)
