"""The engine API as a user calls it, on the bundled model: argument errors, sampling options,
concurrent callers, flush_cache / stats, a queue (abort while waiting, the context limit), shutdown and
a dead engine loop.

One module-scoped engine (plus a one-slot engine, and fresh ones for shutdown); every scenario on an
engine that goes on ends with the no-leak check.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import plait.runtime.engine as engine_module
from plait.runtime.engine import Engine
from tests.runtime.conftest import CHAT_QUESTIONS, RAW_PROMPTS
from tests.runtime.engine_helpers import assert_no_leak, greedy_params, wait_until

pytestmark = pytest.mark.model

LONG = {"temperature": 0.0, "max_new_tokens": 200, "ignore_eos": True}


def _serves(engine, ids) -> None:
    """A normal request still completes (checked after every refused one)."""
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0.0, "max_new_tokens": 2, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


# ---------------------------------------------------------------------------------------------- errors
# (generate kwargs built from (engine, prompt ids), the error type, a regex the message must match)
BAD_REQUESTS = {
    "temperature": (lambda e, ids: {"input_ids": ids, "sampling_params": {"temperature": -1}}, ValueError,
                    "temperature"),
    "top_p": (lambda e, ids: {"input_ids": ids, "sampling_params": {"top_p": 0}}, ValueError, "top_p"),
    "max_new_tokens": (lambda e, ids: {"input_ids": ids, "sampling_params": {"max_new_tokens": -1}}, ValueError,
                       "max_new_tokens"),
    "min_over_max": (lambda e, ids: {"input_ids": ids, "sampling_params": {"max_new_tokens": 2,
                                                                          "min_new_tokens": 3}},
                     ValueError, "min_new_tokens"),
    "unknown_key": (lambda e, ids: {"input_ids": ids, "sampling_params": {"temprature": 0.5}}, ValueError,
                    "temprature"),
    "empty_stop": (lambda e, ids: {"input_ids": ids, "sampling_params": {"stop": [""]}}, ValueError, "stop"),
    "empty_prompt": (lambda e, ids: {"prompt": ""}, ValueError, "empty"),
    "empty_input_ids": (lambda e, ids: {"input_ids": []}, ValueError, "empty"),
    "prompt_type": (lambda e, ids: {"prompt": 42}, TypeError, "prompt"),
    "too_long": (lambda e, ids: {"input_ids": [ids[-1]] * e.context_length}, ValueError, "context length"),
    "out_of_vocab": (lambda e, ids: {"input_ids": ids + [e.model_config.vocab_size]}, ValueError, "vocabulary"),
    "negative_id": (lambda e, ids: {"input_ids": [-1] + ids}, ValueError, "vocabulary"),
    "stop_id_out_of_vocab": (lambda e, ids: {"input_ids": ids, "sampling_params": {
        "stop_token_ids": [e.model_config.vocab_size]}}, ValueError, "stop_token_ids"),
    "prompt_and_ids": (lambda e, ids: {"prompt": "Hi", "input_ids": ids}, ValueError, "exactly one"),
    "neither": (lambda e, ids: {}, ValueError, "exactly one"),
    "logprob_start_negative": (lambda e, ids: {"input_ids": ids, "return_logprob": True, "logprob_start_len": -2},
                               ValueError, "logprob_start_len"),
    "logprob_start_past_prompt": (lambda e, ids: {"input_ids": ids, "return_logprob": True,
                                                  "logprob_start_len": len(ids)}, ValueError, "logprob_start_len"),
    "top_logprobs_negative": (lambda e, ids: {"input_ids": ids, "return_logprob": True, "top_logprobs_num": -1},
                              ValueError, "top_logprobs_num"),
    "params_per_prompt": (lambda e, ids: {"input_ids": [ids, ids], "sampling_params": [{}, {}, {}]}, ValueError,
                          "sampling_params"),
    "params_item_type": (lambda e, ids: {"input_ids": [ids, ids], "sampling_params": [{}, 3]}, ValueError,
                         "mapping"),
    "bool_ids": (lambda e, ids: {"input_ids": [True] + ids}, TypeError, "input_ids"),
    "float_ids": (lambda e, ids: {"input_ids": ids + [1.0]}, TypeError, "input_ids"),
    "rid_per_prompt": (lambda e, ids: {"input_ids": [ids, ids], "rid": ["a"]}, ValueError, "rid"),
    "rid_repeated_in_batch": (lambda e, ids: {"input_ids": [ids, ids], "rid": ["same", "same"]}, ValueError,
                              "already in use"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_a_clear_error(engine, chat_ids, case):
    make, error, message = BAD_REQUESTS[case]
    kwargs = make(engine, chat_ids)
    with pytest.raises(error, match=message):
        engine.generate(**kwargs)
    with pytest.raises(error, match=message):  # a stream fails at the call, not on first iteration
        engine.generate(**kwargs, stream=True)
    admitted = []  # the server's path (parameters parsed once, for the admission checks and the request)
    with pytest.raises(error, match=message):
        engine.submit(**kwargs, on_output=lambda index, event: None, on_admitted=admitted.append, stream=True)
    assert admitted == []
    _serves(engine, chat_ids)
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0


def test_async_bad_request_raises(engine, chat_ids):
    with pytest.raises(ValueError, match="temperature"):
        asyncio.run(engine.async_generate(input_ids=chat_ids, sampling_params={"temperature": -1}))
    _serves(engine, chat_ids)


def test_duplicate_rid_in_flight(engine, chat_ids):
    stream = engine.generate(input_ids=chat_ids, sampling_params=LONG, rid="dup", stream=True)
    first = next(stream)
    assert first["meta_info"]["id"] == "dup"
    with pytest.raises(ValueError, match="already in use"):
        engine.generate(input_ids=chat_ids, sampling_params=greedy_params(2), rid="dup")
    _serves(engine, chat_ids)  # the refused duplicate did not disturb the engine ...
    engine.abort("dup")
    final = list(stream)[-1]
    assert final["meta_info"]["finish_reason"]["type"] == "abort"  # ... nor the request owning the id
    assert engine.generate(input_ids=chat_ids, sampling_params=greedy_params(2), rid="dup")["meta_info"]["id"] == "dup"
    assert_no_leak(engine)


def test_unknown_engine_setting_fails_before_loading(bundled_model_dir, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(engine_module, "resolve_model", no_loading)
    monkeypatch.setattr(engine_module, "ModelRunner", no_loading)
    with pytest.raises(TypeError, match="bogus"):
        Engine(model=str(bundled_model_dir), bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        Engine(model="no/such/model", bogus=1)
    with pytest.raises(ValueError, match="dtype"):
        Engine(model=str(bundled_model_dir), dtype="int3")


# ---------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_batch_independent(engine, chat_ids, tok):
    story = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a short story."}]))
    seeded = {"temperature": 0.8, "seed": 123, "max_new_tokens": 12, "ignore_eos": True}
    alone = engine.generate(input_ids=story, sampling_params=seeded)["output_ids"]
    assert engine.generate(input_ids=story, sampling_params=seeded)["output_ids"] == alone
    batch = engine.generate(
        input_ids=[chat_ids, story, story, chat_ids],
        sampling_params=[{"temperature": 1.0, "max_new_tokens": 12}, seeded, {**seeded, "seed": 7}, greedy_params(5)],
    )
    assert batch[1]["output_ids"] == alone
    assert batch[2]["output_ids"] != alone  # the seed is what fixes the tokens
    assert_no_leak(engine)


def test_n_returns_n_samples(engine, tok):
    story = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a short story."}]))
    outs = engine.generate(input_ids=story, sampling_params={"n": 3, "temperature": 1.0, "max_new_tokens": 16,
                                                             "ignore_eos": True}, rid="many")
    assert isinstance(outs, list) and len(outs) == 3
    assert len({o["meta_info"]["id"] for o in outs}) == 3
    assert all(o["meta_info"]["completion_tokens"] == 16 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1  # independent samples, not one copied
    assert_no_leak(engine)


def test_min_new_tokens_and_ignore_eos(engine, chat_ids):
    eos = engine.tokenizer.eos_token_id
    short = engine.generate(input_ids=chat_ids, sampling_params={"temperature": 0.0, "max_new_tokens": 30})
    ids = short["output_ids"]
    assert ids[-1] == eos and short["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert len(ids) < 15  # the premise: the model answers briefly

    at_least = engine.generate(input_ids=chat_ids, sampling_params={"temperature": 0.0, "max_new_tokens": 30,
                                                                     "min_new_tokens": len(ids) + 3})
    assert at_least["meta_info"]["completion_tokens"] >= len(ids) + 3
    assert eos not in at_least["output_ids"][: len(ids) + 2]
    assert at_least["output_ids"][: len(ids) - 1] == ids[:-1]

    forced = engine.generate(input_ids=chat_ids, sampling_params={"temperature": 0.0, "max_new_tokens": 20,
                                                                   "ignore_eos": True})
    assert forced["meta_info"]["finish_reason"] == {"type": "length", "length": 20}
    assert forced["output_ids"][: len(ids)] == ids  # ran through the EOS it sampled
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- concurrency
def test_threads_are_batched_and_exact(engine, varied_prompt_ids):
    sequential = [engine.generate(input_ids=ids, sampling_params=greedy_params(12))["output_ids"]
                  for ids in varied_prompt_ids]
    steps_before = engine.stats()["steps"]
    barrier = threading.Barrier(len(varied_prompt_ids))
    results: dict[int, list[int]] = {}

    def call(k: int) -> None:
        barrier.wait()
        results[k] = engine.generate(input_ids=varied_prompt_ids[k], sampling_params=greedy_params(12))["output_ids"]

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(varied_prompt_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(k) for k in range(len(threads))] == sequential
    steps = engine.stats()["steps"] - steps_before
    assert steps < sum(map(len, sequential)) / 2, f"{steps} steps: the threads were not batched together"
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- flush / stats
def test_flush_cache_refused_while_running(engine, chat_ids):
    stream = engine.generate(input_ids=chat_ids, sampling_params=LONG, rid="flush-blocker", stream=True)
    next(stream)
    stats = engine.stats()
    assert stats["running"] == 1 and stats["waiting"] == 0
    assert stats["kv_slots_used"] >= len(chat_ids)
    assert engine.flush_cache() is False
    assert engine.stats()["kv_slots_cached"] > 0  # the refused flush dropped nothing
    engine.abort("flush-blocker")
    assert list(stream)[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.flush_cache() is True
    stats = engine.stats()
    assert stats["kv_slots_used"] == stats["kv_slots_cached"] == 0
    assert stats["kv_slots_total"] == engine.runner.pool.capacity
    assert_no_leak(engine)


def test_stats_count_cache_hits(engine, chat_ids):
    assert engine.flush_cache()
    before = engine.stats()
    engine.generate(input_ids=chat_ids, sampling_params=greedy_params(3))
    again = engine.generate(input_ids=chat_ids, sampling_params=greedy_params(3))
    assert again["meta_info"]["cached_tokens"] == len(chat_ids) - 1
    after = engine.stats()
    assert after["cached_tokens"] - before["cached_tokens"] == len(chat_ids) - 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == 2 * len(chat_ids)
    assert after["generated_tokens"] - before["generated_tokens"] == 6
    assert after["finished"] - before["finished"] == 2
    assert after["cache_hit_rate"] > 0
    assert after["running"] == after["waiting"] == 0
    assert 0 < after["kv_slots_cached"] == after["kv_slots_evictable"] <= after["kv_slots_used"]
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- a queue
@pytest.fixture(scope="module")
def one_slot_engine(bundled_model_dir):
    """Runs one request at a time, in a 64-token context: the next request has to wait."""
    eng = Engine(model=str(bundled_model_dir), max_running_requests=1, context_length=64)
    yield eng
    eng.shutdown()


def test_abort_waiting_and_threaded_requests(one_slot_engine, tok):
    eng = one_slot_engine
    ids = tok.encode(RAW_PROMPTS[1])
    outs: dict[str, dict] = {}

    def run(rid: str) -> None:
        outs[rid] = eng.generate(input_ids=ids, sampling_params=LONG, rid=rid)

    running = threading.Thread(target=run, args=("running",))
    running.start()
    wait_until(lambda: eng.stats()["running"] == 1, what="the first request to run")
    queued = threading.Thread(target=run, args=("queued",))
    queued.start()
    wait_until(lambda: eng.stats()["waiting"] == 1, what="the second request to queue")
    generated = eng.stats()["generated_tokens"]
    wait_until(lambda: eng.stats()["generated_tokens"] >= generated + 3, what="a few tokens")
    eng.abort("queued")
    queued.join(timeout=30)
    assert outs["queued"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert outs["queued"]["output_ids"] == [] and outs["queued"]["text"] == ""
    assert eng.stats()["running"] == 1  # the running one goes on
    eng.abort("running")
    running.join(timeout=30)
    assert outs["running"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert 3 <= outs["running"]["meta_info"]["completion_tokens"] < eng.context_length - len(ids)
    assert_no_leak(eng)


def test_generation_stops_at_the_context_length(one_slot_engine, tok):
    eng = one_slot_engine
    ids = tok.encode(RAW_PROMPTS[1])
    out = eng.generate(input_ids=ids, sampling_params=LONG)
    assert len(ids) + out["meta_info"]["completion_tokens"] == eng.context_length
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": eng.context_length - len(ids)}
    with pytest.raises(ValueError, match="context length 64"):
        eng.generate(input_ids=ids * 20, sampling_params=greedy_params(2))
    assert_no_leak(eng)


def test_chat_prompts_by_text(engine, tok):
    """``prompt=`` text and ``input_ids=`` of the same text give the same result."""
    text = tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTIONS[0]}])
    by_text = engine.generate(text, greedy_params(4))
    by_ids = engine.generate(input_ids=tok.encode(text), sampling_params=greedy_params(4))
    assert by_text["output_ids"] == by_ids["output_ids"] and by_text["text"] == by_ids["text"]
    assert by_text["meta_info"]["prompt_tokens"] == len(tok.encode(text))
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- shutdown / failure
def _in_flight(eng, ids) -> tuple[dict, list[threading.Thread]]:
    """Start a plain, an async and a batch-streaming caller; return where their results or errors land."""
    results: dict[str, object] = {}

    def catch(name, fn):
        def run():
            try:
                results[name] = fn()
            except RuntimeError as exc:
                results[name] = exc
        return threading.Thread(target=run)

    threads = [
        catch("sync", lambda: eng.generate(input_ids=ids, sampling_params=LONG)),
        catch("async", lambda: asyncio.run(eng.async_generate(input_ids=ids, sampling_params=LONG))),
        catch("stream", lambda: list(eng.generate(input_ids=[ids, ids], sampling_params=LONG, stream=True))),
    ]
    for t in threads:
        t.start()
    wait_until(lambda: eng.stats()["running"] == 4, what="every caller's request to run")
    return results, threads


def test_shutdown_aborts_requests_in_flight(bundled_model_dir, chat_ids):
    eng = Engine(model=str(bundled_model_dir), max_total_tokens=2048)
    results, threads = _in_flight(eng, chat_ids)
    eng.shutdown()
    for t in threads:
        t.join(timeout=30)
    shut = {"type": "abort", "message": "engine shut down"}
    assert results["sync"]["meta_info"]["finish_reason"] == shut
    assert results["async"]["meta_info"]["finish_reason"] == shut
    # the two streamed requests' snapshots interleave: check the last one of each
    last = {s["index"]: s["meta_info"]["finish_reason"] for s in results["stream"]}
    assert last == {0: shut, 1: shut}
    with pytest.raises(RuntimeError, match="shut down"):
        eng.generate(input_ids=chat_ids)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop dies on purpose
def test_a_dead_engine_loop_is_an_error_not_a_hang(bundled_model_dir, chat_ids):
    eng = Engine(model=str(bundled_model_dir), max_total_tokens=2048)
    results, threads = _in_flight(eng, chat_ids)
    eng._post("no-such-command", None)  # stands in for a bug that kills the loop thread
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), f"callers still waiting: {sorted(results)}"
    for name in ("sync", "async", "stream"):
        assert isinstance(results[name], RuntimeError) and "engine loop" in str(results[name])
    with pytest.raises(RuntimeError, match="died"):
        eng.generate(input_ids=chat_ids)
    eng.shutdown()


def test_n_with_seed_gives_distinct_reproducible_samples(engine):
    params = {"temperature": 1.0, "max_new_tokens": 8, "seed": 7, "n": 3}
    first = engine.generate("Tell me a fact:", params)
    again = engine.generate("Tell me a fact:", params)
    assert [o["output_ids"] for o in first] == [o["output_ids"] for o in again]
    assert len({tuple(o["output_ids"]) for o in first}) > 1
    assert_no_leak(engine)


def test_abort_by_group_id_aborts_every_sample(engine):
    results = {}
    worker = threading.Thread(target=lambda: results.update(out=engine.generate(
        "Write a long story:", {"max_new_tokens": 400, "n": 2, "ignore_eos": True}, rid="group-x")))
    worker.start()
    wait_until(lambda: engine.stats()["running"] >= 2, what="both samples running")
    engine.abort("group-x")
    worker.join(timeout=60)
    assert [o["meta_info"]["finish_reason"]["type"] for o in results["out"]] == ["abort", "abort"]
    assert all(o["meta_info"]["completion_tokens"] < 400 for o in results["out"])
    assert_no_leak(engine)


def test_submit_delivers_events_to_a_callback(engine, chat_ids):
    """Engine.submit queues without waiting; events reach on_output(index, event); final equals generate's."""
    import threading

    done = threading.Event()
    events: list[tuple[int, dict]] = []

    def on_output(index, event):
        events.append((index, event))
        if event["finished"] and sum(e["finished"] for _, e in events) == 2:
            done.set()

    params = {"temperature": 0, "max_new_tokens": 6}
    rids = engine.submit(input_ids=[chat_ids, chat_ids[:-1]], sampling_params=params, on_output=on_output,
                         stream=True)
    assert len(rids) == 2
    assert done.wait(60)
    finals = {i: e["output"] for i, e in events if e["finished"]}
    expected = engine.generate(input_ids=[chat_ids, chat_ids[:-1]], sampling_params=params)
    assert [finals[0]["output_ids"], finals[1]["output_ids"]] == [o["output_ids"] for o in expected]
    assert any(not e["finished"] for _, e in events)  # streamed snapshots came first
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(input_ids=chat_ids, sampling_params={"temperature": -1}, on_output=on_output)
    assert_no_leak(engine)


def test_streams_without_their_text_leave_it_to_the_caller(engine, chat_ids):
    """``submit(stream=True, stream_text=False)`` (the server's HTTP process decodes streamed ids): no
    detokenizer on the engine thread and streamed events say ``"text": False`` with empty text; the final
    event has the same text as a stream with its text. A request with stop strings is still decoded here
    (the engine needs its text to find them), and its events say so."""
    import threading

    def run(params, **kwargs):
        done, events = threading.Event(), []

        def on_output(index, event):
            events.append(event)
            if event["finished"]:
                done.set()

        engine.submit(input_ids=chat_ids, sampling_params=params, on_output=on_output, stream=True, **kwargs)
        assert done.wait(60)
        return events

    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    ids_only = run(params, stream_text=False)
    with_text = run(params)
    streamed = [e for e in ids_only if not e["finished"]]
    assert streamed and all(e["text"] is False and e["output"]["text"] == "" for e in streamed)
    assert all(e.get("text") is True for e in with_text if not e["finished"])
    assert ids_only[-1]["output"]["text"] == with_text[-1]["output"]["text"] != ""
    assert ids_only[-1]["output"]["output_ids"] == with_text[-1]["output"]["output_ids"]
    word = with_text[-1]["output"]["text"].split()[-1]  # a stop string the output reaches
    stopped = run({**params, "stop": [word]}, stream_text=False)
    assert all(e["text"] is True for e in stopped if not e["finished"])
    assert word not in stopped[-1]["output"]["text"] and stopped[-1]["output"]["meta_info"]["finish_reason"]["type"] == "stop"
    assert_no_leak(engine)


def test_warm_up_steps_leave_the_engine_unchanged(engine, chat_ids):
    """The start-up warm-up (run on CUDA; here called directly) writes only the reserved pad row's slot
    0: greedy output is the same after it, and the sizes cover every power of two up to the budget."""
    from tests.runtime.engine_helpers import greedy_params

    before = engine.generate(input_ids=chat_ids, sampling_params=greedy_params(6))["output_ids"]
    assert engine.runner.warm_up_steps([2, 5, 40]) == [2, 5, 40]
    engine.flush_cache()
    assert engine.generate(input_ids=chat_ids, sampling_params=greedy_params(6))["output_ids"] == before


def test_warm_up_sizes_cover_every_power_of_two_up_to_the_largest_step():
    """The largest step is the prefill budget plus one token per decoding request beside it: every MoE
    token bucket up to it gets a warm-up step."""
    from plait.runtime.executor.model_runner import warm_up_sizes
    from plait.runtime.kernels.fused_moe_config import token_bucket

    assert warm_up_sizes(40) == [2, 4, 8, 16, 32, 40]
    assert warm_up_sizes(2048) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert warm_up_sizes(1) == [2]
    assert warm_up_sizes(2048, 1024) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3072]
    assert warm_up_sizes(256, 1024) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1280]
    for budget, rows in ((2048, 1024), (256, 1024), (40, 7), (3000, 256), (2048, 0)):
        sizes = warm_up_sizes(budget, rows)
        assert max(sizes) == max(2, budget) + rows
        reachable = {token_bucket(n) for n in range(2, budget + rows + 1)}
        assert reachable <= {token_bucket(n) for n in sizes}, (budget, rows)
    from plait.runtime.config import EngineConfig

    config = EngineConfig(chunked_prefill_size=2048, max_running_requests=1024)
    assert config.max_step_tokens == 3072 == max(warm_up_sizes(config.chunked_prefill_size,
                                                              config.max_running_requests))
