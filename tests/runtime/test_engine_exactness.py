"""Invariant 1 on the bundled model: plait's greedy tokens equal transformers' greedy tokens.

Checked one at a time, batched, with prefix-cache hits, with chunked prefill, and with a KV pool so
small that requests are evicted and retracted. Every scenario ends with the no-leak check.
"""

from __future__ import annotations

import pytest

from plait.runtime.engine import Engine
from tests.runtime.engine_helpers import assert_no_leak, greedy_params

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(bundled_model_dir):
    eng = Engine(model=str(bundled_model_dir))
    yield eng
    eng.shutdown()


def test_one_at_a_time(engine, varied_prompt_ids, hf_greedy):
    for ids, ref in zip(varied_prompt_ids, hf_greedy):
        out = engine.generate(input_ids=ids, sampling_params=greedy_params())
        assert out["output_ids"] == ref
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": len(ref)}
    assert_no_leak(engine)


def test_batched(engine, varied_prompt_ids, hf_greedy):
    outs = engine.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
    assert [o["output_ids"] for o in outs] == hf_greedy
    assert_no_leak(engine)


def test_prefix_cache_hits_do_not_change_tokens(engine, varied_prompt_ids, hf_greedy):
    first = engine.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
    again = engine.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
    assert [o["output_ids"] for o in again] == hf_greedy
    for ids, o in zip(varied_prompt_ids, again):
        assert o["meta_info"]["cached_tokens"] == len(ids) - 1  # all but the last prompt token
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in first)
    assert_no_leak(engine)


def test_shared_prefix_partial_hits(engine, varied_prompt_ids, hf_model):
    """Prompts that extend a cached prompt at different points compute only their suffix."""
    import torch

    base = varied_prompt_ids[-1]  # the long one
    engine.generate(input_ids=base, sampling_params=greedy_params(4))
    variants = [base[:150] + [28, 29, 30], base[:200] + [11, 12], base + [13]]
    outs = engine.generate(input_ids=variants, sampling_params=greedy_params(8))
    for ids, o in zip(variants, outs):
        ref = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                pad_token_id=0)[0, len(ids):].tolist()
        assert o["output_ids"] == ref
        assert o["meta_info"]["cached_tokens"] >= min(len(ids) - 3, len(base) - 1) - 2
    assert_no_leak(engine)


def test_chunked_prefill(bundled_model_dir, varied_prompt_ids, hf_greedy):
    with Engine(model=str(bundled_model_dir), chunked_prefill_size=16) as eng:
        outs = eng.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
        assert [o["output_ids"] for o in outs] == hf_greedy
        assert_no_leak(eng)


def test_eviction_and_retraction(bundled_model_dir, varied_prompt_ids, hf_greedy):
    """A pool that cannot hold every request at once: the cache is evicted and requests retracted."""
    need = sum(len(ids) for ids in varied_prompt_ids) + 20 * len(varied_prompt_ids)
    total = max(len(ids) for ids in varied_prompt_ids) + 40
    assert total < need
    # greedy admission (no KV reserved for outputs), so that the running requests outgrow the pool
    with Engine(model=str(bundled_model_dir), max_total_tokens=total, chunked_prefill_size=64,
                schedule_conservativeness=0) as eng:
        outs = eng.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
        assert [o["output_ids"] for o in outs] == hf_greedy
        stats = eng.stats()
        assert stats["retractions"] > 0
        assert_no_leak(eng)
