"""GPU correctness (marked ``gpu``; skipped without CUDA): the Triton backend and CUDA graphs.

- Bundled model in float32 (TF32 off): greedy tokens equal transformers' with CUDA graphs on and
  off, with prefix-cache hits and with chunked prefill.
- Bundled model in bf16: prompt logprobs within a bf16 tolerance of transformers in float32.
- Llama-3.1-8B config with random normal(0, 0.02) weights shared with transformers (its parameters
  are views of the engine's): float32 prompt logprobs within transformers' own sdpa-vs-eager spread;
  bf16 error against float32 no larger than transformers' own bf16 error.
"""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")

from plait.runtime.engine import Engine
from tests.runtime.engine_helpers import assert_no_leak, greedy_params

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


def _normal_init(model, seed: int = 0) -> None:
    """transformers' own init (linear and embedding weights normal(0, 0.02), norms 1): unlike the engine's
    tiny dummy weights, these make the logits far from uniform, so a wrong kernel shows."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for name, param in model.named_parameters():
        if not name.endswith("norm.weight"):
            param.data.normal_(0.0, 0.02, generator=gen)


def _engine_with_hf_views(dtype: str):
    """An 8B-config engine and a transformers model whose parameters are views of the engine's weights."""
    from plait.bench.hf_reference import build_hf_model

    engine = Engine(model="llama-3.1-8b", load_format="dummy", device="cuda", dtype=dtype, max_total_tokens=4096,
                    max_running_requests=4, cuda_graph_max_bs=4)
    _normal_init(engine.runner.model)
    hf = build_hf_model(engine.runner.model, engine.model_source.config, torch.device("cuda"))
    return engine, hf


def _set_attention(hf, impl: str) -> None:
    hf.config._attn_implementation = impl
    for layer in hf.model.layers:
        layer.self_attn.config._attn_implementation = impl


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (17, 300)]


def test_llama_8b_float32_logprobs_match_transformers():
    """float32, same weights: plait's prompt logprobs differ from transformers' (sdpa) by no more than
    transformers' eager attention differs from its own sdpa (two correct float32 implementations)."""
    engine, hf = _engine_with_hf_views("float32")
    try:
        for ids in _prompts(engine.model_config.vocab_size):
            _set_attention(hf, "sdpa")
            sdpa = _hf_prompt_logprobs(hf, ids)
            _set_attention(hf, "eager")
            eager = _hf_prompt_logprobs(hf, ids)
            ours = _plait_prompt_logprobs(engine, ids)
            our_diff, their_diff = (ours - sdpa).abs().max().item(), (eager - sdpa).abs().max().item()
            print(f"{len(ids)} tokens: max |plait - sdpa| {our_diff:.2e}, max |eager - sdpa| {their_diff:.2e}")
            assert our_diff <= 4 * their_diff + 1e-4, (our_diff, their_diff)
        del hf
    finally:
        _free(engine)


def test_llama_8b_bf16_logprobs_match_transformers():
    """bf16, same weights in plait and transformers; both against a float32 copy of those weights:
    plait's bf16 error is no larger than transformers' own bf16 error (plus a margin)."""
    import copy

    engine, hf = _engine_with_hf_views("bfloat16")
    try:
        prompts = _prompts(engine.model_config.vocab_size)
        hf32 = copy.deepcopy(hf).float()
        ref = [_hf_prompt_logprobs(hf32, ids) for ids in prompts]
        del hf32
        gc.collect()
        torch.cuda.empty_cache()
        for ids, ref32 in zip(prompts, ref):
            hf_err = (_hf_prompt_logprobs(hf, ids) - ref32).abs().mean().item()
            our_err = (_plait_prompt_logprobs(engine, ids) - ref32).abs().mean().item()
            print(f"{len(ids)} tokens: plait bf16 error {our_err:.4f}, transformers bf16 error {hf_err:.4f}")
            assert our_err <= 1.5 * hf_err + 0.01, (our_err, hf_err)
        del hf
    finally:
        _free(engine)


def _compiled_variants(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def _all_compiled_variants() -> dict[str, int]:
    """Every plait Triton kernel's compiled variants (its modules imported now)."""
    import importlib
    import pkgutil

    import plait.runtime.kernels as kernels

    counts = {}
    for module_info in pkgutil.iter_modules(kernels.__path__):
        try:
            module = importlib.import_module(f"plait.runtime.kernels.{module_info.name}")
        except ImportError:  # a kernel family this Triton lacks (Gluon)
            continue
        for name, obj in vars(module).items():
            if hasattr(obj, "device_caches") and name.endswith("_kernel"):
                counts[f"{module_info.name}.{name}"] = _compiled_variants(obj)
    return counts


def test_serving_compiles_no_kernel_after_start_up(bundled_model_dir):
    """The start-up warm-up (``ModelRunner.warm_up_steps``) and the CUDA-graph capture compile every
    Triton variant that serving needs: mixed steps of 1 to 7 prompts beside decode rows, at odd and even
    batch sizes (the metadata rows' alignment once made a variant per batch-size residue), prompts alone
    that extend a cached prefix by odd and even counts (their positions and slots are slices at moving
    offsets), and a constrained request with forced text (the logit-mask kernel) compile none."""
    engine = Engine(model=str(bundled_model_dir), chunked_prefill_size=256)
    try:
        before = _all_compiled_variants()
        assert before["extend_attention._extend_attention_kernel"] >= 1
        for count in range(1, 8):
            prompts = [[1 + (i * 7 + j) % 500 for j in range(5 + 13 * i)] for i in range(count)]
            engine.generate(input_ids=prompts, sampling_params=greedy_params(3))
        shared = [1 + j % 300 for j in range(40)]
        for extra in range(1, 6):  # one request a step, its extend starting after a cached prefix
            engine.generate(input_ids=shared + [7 + j for j in range(extra)], sampling_params=greedy_params(2))
        regex = {"temperature": 0.0, "max_new_tokens": 24, "regex": r"Answer: (yes|no)\. [a-z]{2,8}"}
        engine.generate(input_ids=[[5 + j for j in range(9)], [3 + j for j in range(12)]],
                        sampling_params=[regex, greedy_params(6)])
        after = _all_compiled_variants()
        assert {name: (before[name], n) for name, n in after.items() if n != before.get(name, 0)} == {}
    finally:
        _free(engine)


def test_forced_tokens_in_graph_decode_batches_equal_extends(bundled_model_dir):
    """Jump-forward's forced tokens computed one a step inside CUDA-graph decode batches (a replayed
    graph returns every row's logits, also of rows that sample nothing) give the tokens that extends
    without graphs give."""
    engine = Engine(model=str(bundled_model_dir), dtype="float32", device="cuda")
    reason = r"Answer: (yes|no)\. The reason, in one short sentence that follows: [a-z ]{3,30}\."
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Is the sky blue?"}])
    params = [{"temperature": 0.8, "seed": seed, "max_new_tokens": 60, "regex": reason} for seed in range(6)]
    try:
        engine.scheduler.forced_in_decode_min_batch = 1
        graphs_before = engine.runner.graph_steps
        ours = engine.generate([prompt] * len(params), params)
        assert engine.runner.graph_steps > graphs_before
        assert_no_leak(engine)
    finally:
        _free(engine)
    ref_engine = Engine(model=str(bundled_model_dir), dtype="float32", device="cuda", disable_cuda_graph=True,
                        jump_forward_decode_min_batch=0)
    try:
        ref = ref_engine.generate([prompt] * len(params), params)
    finally:
        _free(ref_engine)
    assert all(o["meta_info"]["forced_tokens"] > 8 for o in ref)
    assert [o["output_ids"] for o in ours] == [o["output_ids"] for o in ref]
