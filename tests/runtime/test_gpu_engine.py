"""GPU correctness (marked ``gpu``; skipped without CUDA): the Triton backend and CUDA graphs.

- Bundled model in float32 (TF32 off): greedy tokens equal transformers' with CUDA graphs on and
  off, with prefix-cache hits and with chunked prefill.
- Bundled model in bf16: prompt logprobs within a bf16 tolerance of transformers in float32.
- Llama-3.1-8B config with random weights (bf16): plait's prompt logprobs against transformers on
  the same weights.
"""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")

from plait.runtime.engine import Engine  # noqa: E402
from tests.runtime.engine_helpers import assert_no_leak, greedy_params  # noqa: E402

pytestmark = pytest.mark.gpu


def _free(engine: Engine) -> None:
    engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize(
    "settings",
    [{}, {"disable_cuda_graph": True}, {"chunked_prefill_size": 16}],
    ids=["graphs", "eager", "chunked"],
)
def test_bundled_fp32_greedy_equals_transformers(bundled_model_dir, varied_prompt_ids, hf_greedy, settings):
    engine = Engine(model=str(bundled_model_dir), dtype="float32", device="cuda", **settings)
    try:
        assert engine.runner.backend_name == "triton"
        outs = engine.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
        assert [o["output_ids"] for o in outs] == hf_greedy
        again = engine.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())  # prefix hits
        assert [o["output_ids"] for o in again] == hf_greedy
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        one_by_one = [engine.generate(input_ids=ids, sampling_params=greedy_params())["output_ids"]
                      for ids in varied_prompt_ids[:3]]
        assert one_by_one == hf_greedy[:3]
        assert_no_leak(engine)
    finally:
        _free(engine)


def _hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0].cpu()


def _plait_prompt_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])


def test_bundled_bf16_logprobs_close(bundled_model_dir, varied_prompt_ids, hf_model):
    """plait in bf16 against transformers in float32: no worse than transformers' own bf16 error (+ margin)."""
    import copy

    hf_bf16 = copy.deepcopy(hf_model).to(device="cuda", dtype=torch.bfloat16)
    engine = Engine(model=str(bundled_model_dir), device="cuda")  # bf16
    try:
        ours, theirs = [], []
        for ids in varied_prompt_ids:
            ref = _hf_prompt_logprobs(hf_model, ids)  # float32, CPU
            theirs.append((_hf_prompt_logprobs(hf_bf16, ids) - ref).abs())
            ours.append((_plait_prompt_logprobs(engine, ids) - ref).abs())
        # over all prompt positions (a 4-token prompt alone is too few samples to compare)
        our_err, hf_err = torch.cat(ours).mean(), torch.cat(theirs).mean()
        print(f"plait bf16 error {our_err:.4f}, transformers bf16 error {hf_err:.4f}")
        assert our_err <= 1.5 * hf_err + 0.01, (our_err, hf_err)
    finally:
        _free(engine)


@pytest.mark.xfail(
    strict=False,
    reason="open: on the 8B config with random normal(0.02) weights, plait's prompt logprobs drift from "
    "transformers 5.17's with position (fp32: 0.005 at 17 tokens, 0.135 at 300; bf16: 0.28 vs transformers' "
    "own 0.062, H200) although both read the same rope inv_freq, while 2-layer models with the same "
    "rope/attention settings match to 6e-7 on the GPU; not resolved yet",
)
def test_llama_8b_dummy_logprobs_match_transformers():
    """Same bf16 weights in plait and transformers; both compared with a float32 computation of those
    weights: plait's bf16 error must be no larger than transformers' own bf16 error (plus a margin)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from plait.runtime.layers.rotary import rope_inv_freq
    from plait.runtime.models.registry import preset_config

    engine = Engine(model="llama-3.1-8b", load_format="dummy", device="cuda", max_total_tokens=4096,
                    max_running_requests=4, cuda_graph_max_bs=4)
    try:
        preset = preset_config("llama-3.1-8b")
        cfg = LlamaConfig(**{k: v for k, v in preset.items() if k not in ("architectures", "rope_scaling")},
                          rope_parameters={**preset["rope_scaling"], "rope_theta": preset["rope_theta"]})
        torch.manual_seed(0)
        with torch.device("cuda"):
            hf = LlamaForCausalLM(cfg).eval()  # random normal(0, 0.02) weights, float32
        # both must read the preset's rope the same way (theta 500000, "llama3" scaling)
        ours = rope_inv_freq(128, preset["rope_theta"], preset["rope_scaling"])
        assert torch.allclose(hf.model.rotary_emb.inv_freq.float().cpu(), ours, rtol=1e-6), "rope settings differ"
        hf.to(torch.bfloat16).to(torch.float32)  # bf16-representable weights, shared by all three
        engine.runner.model.load_weights(hf.state_dict().items())
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (17, 300)]
        ref32 = [_hf_prompt_logprobs(hf, ids) for ids in prompts]
        hf.to(torch.bfloat16)
        for ids, ref in zip(prompts, ref32):
            hf_err = (_hf_prompt_logprobs(hf, ids) - ref).abs().mean()
            our_err = (_plait_prompt_logprobs(engine, ids) - ref).abs().mean()
            assert our_err <= 1.5 * hf_err + 0.01, (our_err, hf_err)
        del hf
    finally:
        _free(engine)
