"""GPT-OSS with MXFP4 experts, the MoE presets' configs and weight accounting, dummy MXFP4 weights,
and the errors for what plait does not support.

The MXFP4 checkpoint is a tiny random GPT-OSS whose experts are quantized with ``quantize_mxfp4`` and
written in GPT-OSS's layout (``*_blocks`` / ``*_scales``, ``quantization_config.quant_method ==
"mxfp4"``). transformers runs it on the CPU through its own MXFP4 path with ``Mxfp4Config(dequantize=
True)`` (its ``convert_moe_packed_tensors`` at load), plait keeps the experts as MXFP4 in memory.
"""

from __future__ import annotations

import json

import pytest
import torch

from plait.runtime.engine import Engine
from plait.runtime.models.config import ModelConfig
from plait.runtime.models.errors import ModelLoadError
from plait.runtime.models.registry import preset_config
from tests.runtime.engine_helpers import assert_no_leak

transformers = pytest.importorskip("transformers")

from tests.runtime.models.moe_helpers import (  # noqa: E402 -- needs transformers
    PROMPTS,
    build_hf,
    greedy,
    hf_greedy,
    hf_prompt_logprobs,
    prompt_logprobs,
)

MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def write_mxfp4_checkpoint(hf: torch.nn.Module, path) -> None:
    """The model's experts quantized to MXFP4 in GPT-OSS's checkpoint layout, everything else as is."""
    from safetensors.torch import save_file

    from plait.runtime.kernels.mxfp4 import quantize_mxfp4

    state = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            weight = quantize_mxfp4(tensor.transpose(1, 2).contiguous())  # [E, in, out] -> [E, out, in]
            state[name + "_blocks"], state[name + "_scales"] = weight.blocks, weight.scales
        else:
            state[name] = tensor.contiguous()
    save_file(state, str(path / "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    write_mxfp4_checkpoint(build_hf("gpt_oss"), path)
    ref = transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    engine = Engine(model=str(path), max_total_tokens=2048, max_running_requests=8)
    yield ref, engine
    engine.shutdown()


def test_mxfp4_experts_stay_mxfp4_in_memory(mxfp4_model):
    _, engine = mxfp4_model
    assert engine.model_config.quantization == "mxfp4"
    mlp = engine.runner.model.model.layers[0].mlp
    assert mlp.w13_blocks.dtype == torch.uint8 and mlp.w2_scales.dtype == torch.uint8
    assert not hasattr(mlp, "w13")
    assert mlp.b13.dtype == torch.float32 and mlp.router.weight.dtype == torch.float32


def test_mxfp4_matches_transformers_mxfp4_path(mxfp4_model):
    ref, engine = mxfp4_model
    for ids in PROMPTS:
        ours, theirs = prompt_logprobs(engine, ids), hf_prompt_logprobs(ref, ids)
        assert torch.allclose(ours, theirs, atol=1e-4), f"max diff {(ours - theirs).abs().max():.2e}"
    outs = engine.generate(input_ids=PROMPTS, sampling_params=greedy())
    assert [o["output_ids"] for o in outs] == [hf_greedy(ref, ids) for ids in PROMPTS]
    assert_no_leak(engine)


def _tiny_config_dir(path, model_type: str, num_layers: int) -> None:
    """A config-only directory of a tiny model of ``model_type`` (expert sizes multiples of 32 for MXFP4)."""
    config_cls = {"gpt_oss": transformers.GptOssConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[model_type]
    extra = {"num_local_experts": 4, "sliding_window": 8} if model_type == "gpt_oss" else {
        "num_experts": 4, "moe_intermediate_size": 64, "norm_topk_prob": True}
    config = config_cls(hidden_size=64, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts_per_tok=2, **extra)
    config.save_pretrained(path)


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_moe"])
def test_dummy_mxfp4_weights_stay_finite_through_36_layers(model_type, tmp_path):
    """Dummy MXFP4 experts (``quantization="mxfp4"``) through 36 layers: finite logprobs, varied tokens."""
    _tiny_config_dir(tmp_path, model_type, 36)
    with Engine(model=str(tmp_path), load_format="dummy", quantization="mxfp4", max_total_tokens=512) as engine:
        mlp = engine.runner.model.model.layers[35].mlp
        assert mlp.w13_blocks.dtype == torch.uint8 and mlp.w13_blocks.any()
        out = engine.generate(input_ids=list(range(1, 40)), sampling_params=greedy(8), return_logprob=True,
                              logprob_start_len=0)
        logprobs = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
        logprobs += [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert all(torch.isfinite(torch.tensor(logprobs))), "dummy MXFP4 weights gave non-finite logprobs"


def test_engine_quantization_must_match_the_checkpoint(tmp_path):
    build_hf("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not convert weight formats"):
        Engine(model=str(tmp_path), quantization="mxfp4")
    with pytest.raises(ValueError, match="quantization must be None or 'mxfp4'"):
        Engine(model=str(tmp_path), quantization="int4")


def test_unsupported_model_type_is_a_model_load_error(tmp_path):
    config = dict(preset_config("llama-3.1-8b"), model_type="mamba")
    with pytest.raises(ModelLoadError, match=r"unsupported model_type 'mamba'.*llama.*mixtral.*qwen3_moe.*gpt_oss"):
        ModelConfig.from_hf(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'mamba'"):
        Engine(model=str(tmp_path), load_format="dummy")
    with pytest.raises(ModelLoadError, match="quant_method 'awq'"):
        ModelConfig.from_hf(dict(preset_config("llama-3.1-8b"), quantization_config={"quant_method": "awq"}))


@pytest.mark.parametrize("name, layers, experts", [("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)])
def test_gpt_oss_presets(name, layers, experts):
    cfg = ModelConfig.from_hf(preset_config(name))
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "gpt_oss", layers, 2880, 64, 8, 64)
    assert (cfg.vocab_size, cfg.rms_norm_eps, cfg.max_position_embeddings) == (201088, 1e-5, 131072)
    assert cfg.attention_bias and cfg.attention_out_bias and cfg.attention_sinks and not cfg.qk_norm
    assert [cfg.layer_sliding_window(i) for i in range(4)] == [128, None, 128, None]
    assert cfg.rope_theta == 150000 and cfg.rope_scaling["rope_type"] == "yarn"
    assert (cfg.rope_scaling["factor"], cfg.rope_scaling["original_max_position_embeddings"]) == (32.0, 4096)
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.routing, moe.activation) == (
        experts, 4, 2880, "topk_then_softmax", "swiglu_oai")
    assert moe.router_bias and moe.expert_bias and moe.swiglu_limit == 7.0 and cfg.quantization == "mxfp4"


def test_weight_bytes_of_gpt_oss_120b():
    """MXFP4 experts at 4.25 bits per value, everything else bf16: about 61 GiB, so it fits one H200."""
    cfg = ModelConfig.from_hf(preset_config("gpt-oss-120b"))
    H, I, E, L, V = 2880, 2880, 128, 36, 201088  # noqa: E741
    attention = H * (64 * 64 + 2 * 8 * 64) + 64 * 64 * H + (64 * 64 + 2 * 8 * 64) + H + 64  # weights, biases, sinks
    per_layer_bf16 = attention + 2 * H + E * H + E + E * (2 * I + H)  # + norms, router, expert biases
    bf16_params = L * per_layer_bf16 + 2 * V * H + H
    expert_params = L * E * 3 * H * I
    assert cfg.num_parameters() == bf16_params + expert_params  # 116.8e9
    assert cfg.weight_bytes(2) == int(expert_params * 17 / 32 + bf16_params * 2)
    assert 60 * 2**30 < cfg.weight_bytes(2) < 61 * 2**30
    assert cfg.with_quantization(None).weight_bytes(2) > 230e9  # the same experts in bf16
    assert 5.0e9 < cfg.num_active_parameters() < 6.0e9  # top-4 of 128 experts


def test_qwen3_30b_a3b_preset():
    cfg = ModelConfig.from_hf(preset_config("qwen3-30b-a3b"))
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "qwen3_moe", 48, 2048, 32, 4, 128)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.qk_norm, cfg.sliding_window, cfg.quantization) == (
        151936, 1e6, True, None, None)
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.norm_topk_prob, moe.dense_layers) == (
        128, 8, 768, True, ())
    assert 30.0e9 < cfg.num_parameters() < 31.0e9 and 3.0e9 < cfg.num_active_parameters() < 3.6e9
