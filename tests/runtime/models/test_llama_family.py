"""The one Llama-family implementation against transformers on tiny random models of each family.

For Llama (plain and with "llama3" rope scaling), Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k norm):
save a randomly initialized transformers model, load it with plait, and compare prompt logprobs and
greedy continuations.
"""

from __future__ import annotations

import pytest
import torch

from plait.runtime.engine import Engine

transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, initializer_range=0.3,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}, "rope_theta": 500000.0}),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    config_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**{**BASE, **extra})).eval()
    if request.param == "qwen2":  # make sure the q/k/v biases matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    engine = Engine(model=str(path), max_total_tokens=2048, max_running_requests=8)
    yield request.param, hf, engine
    engine.shutdown()


PROMPTS = [[1, 17, 99, 3, 250, 42, 42, 7], [1] + list(range(30, 90)), [5, 6]]


def test_prompt_logprobs_match(family):
    name, hf, engine = family
    for ids in PROMPTS:
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                              logprob_start_len=0)
        ours = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, :-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(ours), ref, atol=1e-4), f"{name}: prompt logprobs differ"


def test_greedy_tokens_match(family):
    name, hf, engine = family
    outs = engine.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": 12,
                                                              "min_new_tokens": 12})
    for ids, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert out["output_ids"] == ref, name
