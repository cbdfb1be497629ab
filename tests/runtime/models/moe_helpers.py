"""Tiny random MoE models built with transformers, and the comparisons the MoE model tests share."""

from __future__ import annotations

import torch
import transformers

from plait.runtime.engine import Engine

WINDOW = 8
NEW_TOKENS = 10
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=512, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, num_experts_per_tok=2)
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0}

ARCHITECTURES = {
    # alternating sliding/full layers, sinks, biases, YaRN, clamped SwiGLU (a low limit so clamping happens)
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        num_hidden_layers=3, intermediate_size=64, head_dim=16, num_local_experts=8, sliding_window=WINDOW,
        rope_parameters=YARN, swiglu_limit=1.5)),
    # every layer windowed, experts renormalized
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        intermediate_size=48, num_local_experts=4, sliding_window=WINDOW)),
    # q/k norm, one dense layer among the MoE ones, norm_topk_prob
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=6,
        norm_topk_prob=True, mlp_only_layers=[1])),
}

PROMPTS = [[1, 17, 99, 3, 250, 42, 42, 7], [1] + list(range(30, 90)), [5, 6], [1] + list(range(200, 170, -1))]


def build_hf(name: str) -> torch.nn.Module:
    """A tiny random transformers model; the biases GPT-OSS initializes to zero are made random."""
    config_cls, model_cls, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**{**BASE, **extra})).eval()
    if name == "gpt_oss":
        with torch.no_grad():
            for layer in hf.model.layers:
                attn, experts = layer.self_attn, layer.mlp.experts
                for bias in (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias, attn.o_proj.bias,
                             experts.gate_up_proj_bias, experts.down_proj_bias):
                    bias.normal_(0.0, 0.3)
    return hf


def hf_greedy(hf: torch.nn.Module, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def greedy(n: int = NEW_TOKENS) -> dict:
    return {"temperature": 0.0, "max_new_tokens": n, "min_new_tokens": n}


def prompt_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])


def hf_prompt_logprobs(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
