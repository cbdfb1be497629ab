"""Overlap scheduling (step N+1 launched before step N's tokens are read back) gives the same results.

On the CPU the device work is not asynchronous, but the bookkeeping is the same as on a GPU: tokens in
flight, decode inputs gathered from the previous step's sampled tensor, requests that finish on a
token in flight, retraction with a token in flight.
"""

from __future__ import annotations

import pytest

from plait.runtime.engine import Engine
from tests.runtime.engine_helpers import assert_no_leak, greedy_params

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(bundled_model_dir):
    eng = Engine(model=str(bundled_model_dir), enable_overlap=True)
    assert eng.overlap
    yield eng
    eng.shutdown()


def test_greedy_batched_equals_transformers(engine, varied_prompt_ids, hf_greedy):
    outs = engine.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
    assert [o["output_ids"] for o in outs] == hf_greedy
    assert all(o["meta_info"]["completion_tokens"] == len(r) for o, r in zip(outs, hf_greedy))
    assert_no_leak(engine)


def test_eos_and_stop_strings_finish_exactly(engine, bundled_model_dir):
    """A request that ends on its in-flight token (EOS, stop string) returns what the sync path returns."""
    prompts = ["What is the capital of France?", "Say hello.", "List two colours."]
    chat = engine.tokenizer.apply_chat_template
    texts = [chat([{"role": "user", "content": p}]) for p in prompts]
    params = [{"temperature": 0, "max_new_tokens": 40}, {"temperature": 0, "max_new_tokens": 40, "stop": ["llo"]},
              {"temperature": 0, "max_new_tokens": 7}]
    ours = engine.generate(texts, params)
    with Engine(model=str(bundled_model_dir), enable_overlap=False) as sync:
        ref = sync.generate(texts, params)
    for a, b in zip(ours, ref):
        assert (a["text"], a["output_ids"], a["meta_info"]["finish_reason"]) == (
            b["text"], b["output_ids"], b["meta_info"]["finish_reason"])
    assert_no_leak(engine)


def test_seeded_sampling_matches_sync_path(engine, bundled_model_dir):
    params = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_new_tokens": 16, "min_new_tokens": 4}
    ours = engine.generate(["Once upon a time", "The weather today"], params)
    with Engine(model=str(bundled_model_dir), enable_overlap=False) as sync:
        ref = sync.generate(["Once upon a time", "The weather today"], params)
    assert [o["output_ids"] for o in ours] == [o["output_ids"] for o in ref]


def test_logprob_and_penalty_steps_fall_back_to_sync(engine, varied_prompt_ids, hf_greedy):
    plain = engine.generate(input_ids=varied_prompt_ids[:2], sampling_params=greedy_params())
    scored = engine.generate(input_ids=varied_prompt_ids[2], sampling_params=greedy_params(), return_logprob=True)
    assert [o["output_ids"] for o in plain] == hf_greedy[:2]
    assert scored["output_ids"] == hf_greedy[2]
    assert len(scored["meta_info"]["output_token_logprobs"]) == len(hf_greedy[2])
    assert_no_leak(engine)


def test_retraction_with_tokens_in_flight(bundled_model_dir, varied_prompt_ids, hf_greedy):
    total = max(len(ids) for ids in varied_prompt_ids) + 40
    with Engine(model=str(bundled_model_dir), enable_overlap=True, max_total_tokens=total,
                chunked_prefill_size=64, schedule_conservativeness=0) as eng:  # greedy admission: retracts
        outs = eng.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
        assert [o["output_ids"] for o in outs] == hf_greedy
        assert eng.stats()["retractions"] > 0
        assert_no_leak(eng)
