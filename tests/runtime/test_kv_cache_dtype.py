"""``kv_cache_dtype``: an FP8 KV cache (SGLang's and vLLM's ``--kv-cache-dtype``), on the bundled model (CPU)."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.config import EngineConfig
from plait.runtime.kvcache.pool import KVPool
from tests.runtime.engine_helpers import assert_no_leak

pytestmark = pytest.mark.model

TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning God created the heaven and the earth. "
        "And the earth was without form, and void.")


def test_fp8_cache_holds_twice_the_tokens_of_bf16():
    budget = 64 * 2**20
    bf16 = KVPool.from_memory_budget(budget, 4, 2, 64, torch.bfloat16)
    fp8 = KVPool.from_memory_budget(budget, 4, 2, 64, torch.float8_e4m3fn)
    assert fp8.capacity + 1 == 2 * (bf16.capacity + 1)


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8", torch.float8_e4m3fn),
                                        ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_cache_stores_the_models_kv_rounded_and_serves(bundled_model_dir, name, dtype):
    """The cache holds FP8; the first layer's K/V (which depend on the prompt only) are the model's own
    values rounded to FP8, exactly; prompt logprobs stay near the full-precision cache's (3 or 2 mantissa
    bits on every key and value of this small model: benchmarks/kv_cache_dtype.py measures the difference);
    decoding runs and frees everything."""
    from plait.runtime.engine import Engine

    results = {}
    for kv in ("auto", name):
        with Engine(model=str(bundled_model_dir), max_total_tokens=512, kv_cache_dtype=kv) as eng:
            assert eng.runner.pool.k_buffers[0].dtype == (torch.float32 if kv == "auto" else dtype)
            out = eng.generate(prompt=TEXT, sampling_params={"max_new_tokens": 8, "temperature": 0},
                               return_logprob=True, logprob_start_len=0)
            prompt_ids = eng.tokenizer.encode(TEXT)
            slots = eng.tree.match_prefix(prompt_ids, None).slots  # the cached prompt's slots
            assert len(slots) == len(prompt_ids) and (slots > 0).all()
            layer0 = (eng.runner.pool.k_buffers[0][slots].clone(), eng.runner.pool.v_buffers[0][slots].clone())
            logprobs = torch.tensor([lp for lp, *_ in out["meta_info"]["input_token_logprobs"][1:]])
            results[kv] = layer0, logprobs, out["output_ids"]
            assert len(out["output_ids"]) == 8
            assert_no_leak(eng)
    (k_full, v_full), lp_full, _ = results["auto"]
    (k8, v8), lp8, _ = results[name]
    assert torch.equal(k8.float(), k_full.to(dtype).float()) and torch.equal(v8.float(), v_full.to(dtype).float())
    diff = (lp8 - lp_full).abs()
    assert diff.mean() < (0.3 if dtype == torch.float8_e4m3fn else 0.6), diff.mean()
