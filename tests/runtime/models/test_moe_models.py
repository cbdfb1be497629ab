"""GPT-OSS, Qwen3-MoE and Mixtral against transformers on tiny random models (CPU, float32).

Each architecture is saved by transformers (``save_pretrained``: per-expert tensors for Mixtral and
Qwen3-MoE, GPT-OSS's fused [E, H, 2I] experts) and loaded by plait. Checked: prompt logprobs within
1e-4, greedy tokens identical (batched), with chunked prefill, with prefix-cache hits past the
sliding window, and with a KV pool small enough to force retraction; every scenario ends leak-free.
The sliding windows (8 tokens) are much shorter than the prompts, so windowed layers really drop keys.
"""

from __future__ import annotations

import pytest
import torch

from plait.runtime.engine import Engine
from tests.runtime.engine_helpers import assert_no_leak

pytest.importorskip("transformers")

from tests.runtime.models.moe_helpers import (  # noqa: E402 -- needs transformers
    ARCHITECTURES,
    NEW_TOKENS,
    PROMPTS,
    WINDOW,
    build_hf,
    greedy,
    hf_greedy,
    hf_prompt_logprobs,
    prompt_logprobs,
)

@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request, tmp_path_factory):
    """(name, transformers model, checkpoint dir, engine, transformers' greedy tokens for PROMPTS)."""
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    refs = [hf_greedy(hf, ids) for ids in PROMPTS]
    engine = Engine(model=str(path), max_total_tokens=2048, max_running_requests=8)
    yield request.param, hf, path, engine, refs
    engine.shutdown()


def test_model_class_and_windows(arch):
    name, _, _, engine, _ = arch
    assert type(engine.runner.model).__name__.lower().replace("forcausallm", "") == name.replace("_", "")
    windows = [layer.self_attn.attn.sliding_window for layer in engine.runner.model.model.layers]
    expected = {"gpt_oss": [WINDOW, None, WINDOW], "mixtral": [WINDOW, WINDOW], "qwen3_moe": [None] * 3}[name]
    assert windows == expected


def test_prompt_logprobs_match(arch):
    name, hf, _, engine, _ = arch
    for ids in PROMPTS:
        ours, ref = prompt_logprobs(engine, ids), hf_prompt_logprobs(hf, ids)
        assert torch.allclose(ours, ref, atol=1e-4), f"{name}: max diff {(ours - ref).abs().max():.2e}"


def test_greedy_tokens_match_batched(arch):
    name, _, _, engine, refs = arch
    outs = engine.generate(input_ids=PROMPTS, sampling_params=greedy())
    assert [o["output_ids"] for o in outs] == refs, name
    assert_no_leak(engine)


def test_prefix_cache_hits_past_the_window(arch):
    """Requests sharing a cached prefix much longer than the window compute only their suffix."""
    name, hf, _, engine, _ = arch
    base = PROMPTS[1]
    engine.generate(input_ids=base, sampling_params=greedy(2))
    variants = [base[:30] + [7, 8, 9], base[:45] + [11], base + [13, 14]]
    outs = engine.generate(input_ids=variants, sampling_params=greedy())
    for ids, out in zip(variants, outs):
        assert out["meta_info"]["cached_tokens"] > 3 * WINDOW
        assert out["output_ids"] == hf_greedy(hf, ids), name
    assert_no_leak(engine)


def test_chunked_prefill(arch):
    name, _, path, _, refs = arch
    with Engine(model=str(path), chunked_prefill_size=WINDOW - 3, max_total_tokens=2048) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=greedy())
        assert [o["output_ids"] for o in outs] == refs, name
        assert_no_leak(engine)


def test_retraction(arch):
    """A pool that cannot hold every request at once: requests are retracted and recomputed."""
    name, _, path, _, refs = arch
    total = max(len(ids) for ids in PROMPTS) + NEW_TOKENS + 4
    assert total < sum(len(ids) + NEW_TOKENS for ids in PROMPTS)
    with Engine(model=str(path), max_total_tokens=total, chunked_prefill_size=32,
                schedule_conservativeness=0) as engine:  # greedy admission, so that requests get retracted
        outs = engine.generate(input_ids=PROMPTS, sampling_params=greedy())
        assert [o["output_ids"] for o in outs] == refs, name
        assert engine.stats()["retractions"] > 0
        assert_no_leak(engine)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_loads_the_same(name, tmp_path):
    """transformers' in-memory layout (experts fused into [E, 2I, H] / [E, H, I] tensors, router
    under ``mlp.gate``) loads into the same model as the Hub's per-expert layout."""
    from safetensors.torch import save_file

    hf = build_hf(name)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), "transformers' layout changed"
    save_file(state, str(tmp_path / "model.safetensors"))
    hf.config.save_pretrained(tmp_path)
    with Engine(model=str(tmp_path), max_total_tokens=512) as engine:
        ids = PROMPTS[1]
        ours, ref = prompt_logprobs(engine, ids), hf_prompt_logprobs(hf, ids)
        assert torch.allclose(ours, ref, atol=1e-4), f"{name}: max diff {(ours - ref).abs().max():.2e}"
