"""Piecewise CUDA graphs for prefill and mixed steps (``executor/piecewise_graph.py``).

On the CPU: the token buckets and the setting that bounds them. On the GPU (marked ``gpu``): engines
with and without the piecewise graphs give the same greedy tokens and logprobs (float32) on prompts
that make prefill chunks, mixed steps and prefix-cache hits, for the fused rope-and-store path
(Llama shapes), the path where attention stores K/V itself (Qwen3's q/k norms) and a mixture of
experts with sliding windows, sinks and a hybrid KV pool (GPT-OSS, bf16: close logprobs).
"""

from __future__ import annotations

import gc
import json

import pytest

torch = pytest.importorskip("torch")

from plait.runtime.config import PIECEWISE_DEFAULT_MAX_TOKENS, EngineConfig  # noqa: E402
from plait.runtime.executor.piecewise_graph import piecewise_token_ladder  # noqa: E402


def test_token_ladder_covers_every_count_with_bounded_padding():
    for max_tokens in (1, 8, 63, 64, 100, 2048, 3000, 4096):
        ladder = piecewise_token_ladder(max_tokens)
        assert ladder == sorted(set(ladder)) and ladder[-1] == max_tokens
        for n in range(1, max_tokens + 1):
            bucket = next(b for b in ladder if b >= n)
            assert bucket - n < 8 or bucket <= 1.25 * n, (max_tokens, n, bucket)
    assert piecewise_token_ladder(256)[:12] == [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]
    assert piecewise_token_ladder(2048)[-5:] == [1024, 1280, 1536, 1792, 2048]
    with pytest.raises(ValueError):
        piecewise_token_ladder(0)


def test_piecewise_max_tokens_setting():
    assert EngineConfig().piecewise_max_tokens() == 2048  # chunked_prefill_size
    assert EngineConfig(chunked_prefill_size=16384).piecewise_max_tokens() == PIECEWISE_DEFAULT_MAX_TOKENS
    assert EngineConfig(piecewise_cuda_graph_max_tokens=512).piecewise_max_tokens() == 512
    assert EngineConfig(disable_piecewise_cuda_graph=True).piecewise_max_tokens() == 0
    assert EngineConfig(disable_cuda_graph=True).piecewise_max_tokens() == 0
    with pytest.raises(ValueError, match="piecewise_cuda_graph_max_tokens"):
        EngineConfig(piecewise_cuda_graph_max_tokens=0)


def _config_dir(path, preset: str, layers: int) -> str:
    from plait.runtime.models.registry import preset_config

    config = preset_config(preset)
    config.pop("quantization_config", None)
    config.pop("pad_token_id", None)
    # the bundled tokenizer's vocabulary and end token, so that every sampled id detokenizes
    config.update(num_hidden_layers=layers, vocab_size=49152, eos_token_id=2, bos_token_id=1)
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:layers]
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _normal_init(model) -> None:
    """normal(0, 0.02) weights (norms 1): logits far from uniform, so a wrong piece shows."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not name.endswith("norm.weight"):
            param.data.normal_(0.0, 0.02, generator=gen)


def _run(model_dir: str, dtype: str, tokenizer_path: str, **settings) -> tuple[list[dict], list[float], int]:
    """Greedy outputs of prompts that make chunked prefills beside decode rows, then the same prompts
    again (prefix hits), and one prompt's prompt logprobs; and the piecewise steps replayed."""
    from plait.runtime.engine import Engine
    from tests.runtime.engine_helpers import assert_no_leak

    engine = Engine(model=model_dir, load_format="dummy", tokenizer_path=tokenizer_path, device="cuda", dtype=dtype,
                    max_total_tokens=8192, max_running_requests=8, cuda_graph_max_bs=8, chunked_prefill_size=64,
                    **settings)
    try:
        _normal_init(engine.runner.model)
        vocab = engine.model_config.vocab_size
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 37, 130, 300, 61)]
        greedy = [{"temperature": 0.0, "max_new_tokens": m, "min_new_tokens": m} for m in (12, 9, 14, 6, 11)]
        outs = engine.generate(input_ids=prompts, sampling_params=greedy, return_logprob=True)
        again = engine.generate(input_ids=[p + [7, 8, 9] for p in prompts], sampling_params=greedy,
                                return_logprob=True)
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        scored = engine.generate(input_ids=prompts[3], sampling_params={"max_new_tokens": 0}, return_logprob=True,
                                 logprob_start_len=0)
        prompt_logprobs = [lp for lp, _, _ in scored["meta_info"]["input_token_logprobs"][1:]]
        assert_no_leak(engine)
        return outs + again, prompt_logprobs, engine.runner.piecewise_graph_steps
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def _output_logprobs(out: dict) -> list[float]:
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "preset, layers, settings",
    [("smollm2-135m-instruct", 4, {}), ("qwen3-8b", 2, {}),
     ("smollm2-135m-instruct", 4, {"piecewise_cuda_graph_max_tokens": 32})],
    ids=["fused-rope-store", "qk-norm", "graphs-and-eager-steps"],
)
def test_piecewise_float32_equals_eager(tmp_path, bundled_model_dir, preset, layers, settings):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model_dir = _config_dir(tmp_path, preset, layers)
        ours, our_prompt, steps = _run(model_dir, "float32", str(bundled_model_dir), **settings)
        ref, ref_prompt, ref_steps = _run(model_dir, "float32", str(bundled_model_dir),
                                          disable_piecewise_cuda_graph=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert steps > 0 and ref_steps == 0
    assert [o["output_ids"] for o in ours] == [o["output_ids"] for o in ref]
    for a, b in zip(ours, ref):
        assert _output_logprobs(a) == pytest.approx(_output_logprobs(b), abs=1e-4)
    assert our_prompt == pytest.approx(ref_prompt, abs=1e-4)


@pytest.mark.gpu
def test_piecewise_moe_sliding_sinks_close_to_eager(tmp_path, bundled_model_dir):
    """GPT-OSS layers (MoE, sliding windows with a hybrid KV pool, sinks) in bf16: prompt logprobs within
    bf16 noise of the eager engine's, and the mixed steps run."""
    model_dir = _config_dir(tmp_path, "gpt-oss-20b", 4)
    ours, our_prompt, steps = _run(model_dir, "bfloat16", str(bundled_model_dir))
    ref, ref_prompt, _ = _run(model_dir, "bfloat16", str(bundled_model_dir), disable_piecewise_cuda_graph=True)
    assert steps > 0
    diff = torch.tensor(our_prompt) - torch.tensor(ref_prompt)
    print(f"prompt logprobs, piecewise vs eager: mean |diff| {diff.abs().mean():.5f}, max {diff.abs().max():.4f}")
    assert diff.abs().mean() < 0.01
    assert all(len(o["output_ids"]) == len(r["output_ids"]) for o, r in zip(ours, ref))
