"""Engine-side limits: no single request can make the engine misbehave for everyone else.

- a request that can never fit the KV cache is refused up front with a typed error (not aborted later);
- ``n`` is bounded by ``max_samples_per_prompt``;
- tiny temperatures give the greedy tokens (not token 0 repeated);
- prompt logprobs of a long prompt are computed in bounded chunks while other requests keep decoding.

One small engine (a 128-token KV cache) for the whole module.
"""

from __future__ import annotations

import threading

import pytest

from plait.runtime.engine_inputs import RequestTooLargeError
from tests.runtime.conftest import RAW_PROMPTS
from tests.runtime.engine_helpers import assert_no_leak, greedy_params, wait_until

pytestmark = pytest.mark.model

KV_SLOTS = 128
LOGPROB_CHUNK = 16
MAX_N = 4


@pytest.fixture(scope="module")
def eng(bundled_model_dir):
    from plait.runtime.engine import Engine

    # greedy admission: in a pool this small, KV reserved for the decoding request's output would keep
    # the scored request waiting instead of interleaving with it
    engine = Engine(model=str(bundled_model_dir), max_total_tokens=KV_SLOTS, max_samples_per_prompt=MAX_N,
                    prompt_logprob_chunk_size=LOGPROB_CHUNK, schedule_conservativeness=0)
    assert engine.runner.pool.capacity == KV_SLOTS
    yield engine
    engine.shutdown()


def test_a_request_that_can_never_fit_the_kv_cache_is_refused_up_front(eng, tok):
    ids = tok.encode(RAW_PROMPTS[4])[:100]
    too_many = KV_SLOTS + 2 - len(ids)  # the prompt plus this many tokens needs KV_SLOTS + 1 slots
    with pytest.raises(RequestTooLargeError, match=f"lower max_new_tokens to at most {too_many - 1}") as info:
        eng.generate(input_ids=ids, sampling_params={"max_new_tokens": too_many, "ignore_eos": True})
    assert isinstance(info.value, ValueError)  # servers answer 400
    assert (info.value.prompt_tokens, info.value.max_new_tokens, info.value.limit) == (len(ids), too_many, KV_SLOTS)
    with pytest.raises(RequestTooLargeError, match="fits at most"):
        eng.generate(input_ids=ids * 2, sampling_params=greedy_params(1))
    assert eng.stats()["waiting"] == eng.stats()["running"] == 0  # nothing was queued
    # the largest request that fits runs to its end, and the engine keeps serving
    out = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": too_many - 1, "ignore_eos": True,
                                                       "temperature": 0})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": too_many - 1}
    assert eng.generate(input_ids=ids, sampling_params=greedy_params(2))["meta_info"]["completion_tokens"] == 2
    assert_no_leak(eng)


def test_n_is_bounded_by_max_samples_per_prompt(eng, tok):
    ids = tok.encode(RAW_PROMPTS[0])
    with pytest.raises(ValueError, match=f"at most {MAX_N} parallel samples"):
        eng.generate(input_ids=ids, sampling_params={"n": MAX_N + 1, "max_new_tokens": 1})
    outs = eng.generate(input_ids=ids, sampling_params={"n": MAX_N, "max_new_tokens": 1})
    assert len(outs) == MAX_N
    assert_no_leak(eng)


def test_tiny_temperature_gives_the_greedy_tokens(eng, tok):
    ids = tok.encode(RAW_PROMPTS[3])
    greedy = eng.generate(input_ids=ids, sampling_params=greedy_params(6))["output_ids"]
    assert len(set(greedy)) > 1
    for temperature in (1e-40, 1e-20, 1e-6):
        out = eng.generate(input_ids=ids, sampling_params={"temperature": temperature, "max_new_tokens": 6,
                                                           "ignore_eos": True})
        assert out["output_ids"] == greedy, temperature
    assert_no_leak(eng)


def test_prompt_logprobs_are_chunked_while_others_keep_decoding(eng, tok, hf_model):
    from tests.runtime.test_engine_logprobs import hf_logprobs

    long_ids = tok.encode(RAW_PROMPTS[4])[:100]
    short_ids = tok.encode(RAW_PROMPTS[0])
    steps: list[list[tuple[str, int, int, int]]] = []  # per step: (rid, start, length, prompt positions scored)
    schedule = eng.scheduler.schedule

    def recording_schedule():
        items = schedule()
        steps.append([(it.req.rid, it.start, it.length, _scored(it)) for it in items])
        return items

    done = threading.Event()
    outputs: dict[int, dict] = {}

    def on_output(index: int, event: dict) -> None:
        if event["finished"]:
            outputs[index] = event["output"]
            done.set()

    eng.scheduler.schedule = recording_schedule
    try:
        eng.submit(input_ids=short_ids, sampling_params={"max_new_tokens": 24, "ignore_eos": True},
                   rid="decoding", on_output=on_output)
        wait_until(lambda: eng.stats()["generated_tokens"] > 0 and eng.stats()["running"] == 1,
                   what="the first request to decode")
        scored = eng.generate(input_ids=long_ids, sampling_params=greedy_params(1), rid="scored",
                              return_logprob=True, logprob_start_len=0, top_logprobs_num=100)
        assert done.wait(timeout=60)
    finally:
        eng.scheduler.schedule = schedule
    assert outputs[0]["meta_info"]["finish_reason"]["type"] == "length"
    scored_steps = [step for step in steps if any(rid == "scored" for rid, *_ in step)]
    # 99 scored prompt positions in chunks of at most LOGPROB_CHUNK: several steps, none over the budget
    assert len(scored_steps) >= -(-(len(long_ids) - 1) // LOGPROB_CHUNK)
    assert all(sum(n for *_, n in step) <= LOGPROB_CHUNK for step in steps)
    # ...and the decoding request took a step in each of them
    assert all(any(rid == "decoding" and length == 1 for rid, _, length, _ in step) for step in scored_steps)
    meta = scored["meta_info"]
    ref = hf_logprobs(hf_model, long_ids)
    assert len(meta["input_token_logprobs"]) == len(meta["input_top_logprobs"]) == len(long_ids)
    for pos in range(1, len(long_ids)):
        lp, tid, _ = meta["input_token_logprobs"][pos]
        assert tid == long_ids[pos] and lp == pytest.approx(ref[pos - 1, tid].item(), abs=1e-4)
        assert len(meta["input_top_logprobs"][pos]) == 100
        assert meta["input_top_logprobs"][pos][0][1] == int(ref[pos - 1].argmax())
    assert_no_leak(eng)


def _scored(item) -> int:
    """Prompt positions whose logprobs this item computes (position p scores prompt token p + 1)."""
    req = item.req
    if not (req.return_logprob and req.logprob_start_len >= 0) or req.prompt_logprobs_done:
        return 0
    lo = max(item.start, req.logprob_start_len - 1, 0)
    hi = min(item.start + item.length, len(req.prompt_ids) - 1)
    return max(hi - lo, 0)
