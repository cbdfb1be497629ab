"""The engine's streaming API on the bundled model: abort, stop strings, UTF-8 safety, sync/async streams.

One module-scoped engine; every scenario ends with the no-leak check once the engine is idle.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.runtime.conftest import CHAT_QUESTIONS
from tests.runtime.engine_helpers import (
    FFFD, assert_cumulative, assert_no_leak, greedy_params, split_by_index, wait_until,
)

pytestmark = pytest.mark.model

LONG = {"temperature": 0.0, "max_new_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def haiku_ids(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTIONS[1]}]))


@pytest.fixture(scope="module")
def haiku_greedy(engine, haiku_ids) -> list[int]:
    """24 greedy tokens that nothing but the length ends (the reference for the stop tests)."""
    out = engine.generate(input_ids=haiku_ids, sampling_params={"temperature": 0.0, "max_new_tokens": 24,
                                                                 "ignore_eos": True})
    return out["output_ids"]


# ---------------------------------------------------------------------------------------------- abort
def test_abort_running_stream_leaves_others_alone(engine, chat_ids, haiku_ids):
    other_ref = engine.generate(input_ids=haiku_ids, sampling_params=greedy_params(30))["output_ids"]
    other: dict = {}
    worker = threading.Thread(target=lambda: other.update(
        out=engine.generate(input_ids=haiku_ids, sampling_params=greedy_params(30))))
    snapshots = []
    for snap in engine.generate(input_ids=chat_ids, sampling_params=LONG, rid="long-abort", stream=True):
        snapshots.append(snap)
        if len(snapshots) == 1:
            worker.start()
        if len(snapshots) == 3:
            threading.Thread(target=engine.abort, args=("long-abort",)).start()
    worker.join(timeout=60)
    final = assert_cumulative(snapshots)
    assert final["meta_info"]["id"] == "long-abort"
    assert final["meta_info"]["finish_reason"]["type"] == "abort"
    assert 3 <= final["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
    assert other["out"]["output_ids"] == other_ref
    assert other["out"]["meta_info"]["finish_reason"]["type"] == "length"
    # the id is free again once the aborted request has finished
    again = engine.generate(input_ids=chat_ids, sampling_params=greedy_params(2), rid="long-abort")
    assert again["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert_no_leak(engine)


def test_abort_unknown_id_is_harmless(engine, chat_ids):
    before = engine.generate(input_ids=chat_ids, sampling_params=greedy_params(4))
    engine.abort("no-such-request")
    after = engine.generate(input_ids=chat_ids, sampling_params=greedy_params(4))
    assert after["output_ids"] == before["output_ids"]
    assert engine.stats()["running"] == 0
    assert_no_leak(engine)


def test_closing_a_stream_aborts_its_request(engine, chat_ids):
    finished = engine.stats()["finished"]
    stream = engine.generate(input_ids=chat_ids, sampling_params=LONG, rid="closed-early", stream=True)
    next(stream), next(stream)
    stream.close()  # what ``break`` out of a for loop over the stream leads to
    wait_until(lambda: engine.stats()["finished"] == finished + 1, timeout=10, what="the abort")
    assert engine.stats()["running"] == 0
    assert engine.generate(input_ids=chat_ids, sampling_params=greedy_params(2), rid="closed-early")
    assert_no_leak(engine)


def test_cancelled_async_generate_is_aborted(engine, chat_ids):
    async def main():
        task = asyncio.ensure_future(engine.async_generate(input_ids=chat_ids, sampling_params=LONG, rid="cancel-me"))
        while engine.stats()["running"] == 0 or engine.stats()["generated_tokens"] == generated:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    generated = engine.stats()["generated_tokens"]
    asyncio.run(main())
    wait_until(lambda: engine.stats()["running"] == 0, timeout=10, what="the abort")
    assert engine.stats()["generated_tokens"] - generated < LONG["max_new_tokens"]
    assert_no_leak(engine)


def test_stream_into_a_closed_event_loop_does_not_kill_the_engine(engine, chat_ids):
    """An async stream that is never read, whose event loop is then closed: tokens have nowhere to go."""
    async def start():
        return await engine.async_generate(input_ids=chat_ids, sampling_params=LONG, rid="orphan", stream=True)

    loop = asyncio.new_event_loop()
    orphan = loop.run_until_complete(start())
    loop.close()
    generated = engine.stats()["generated_tokens"]
    wait_until(lambda: engine.stats()["generated_tokens"] >= generated + 3, timeout=10, what="tokens")
    engine.abort("orphan")
    wait_until(lambda: engine.stats()["running"] == 0, timeout=10, what="the abort")
    out = engine.generate(input_ids=chat_ids, sampling_params=greedy_params(2))  # the engine still serves
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    del orphan
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- stop
def _straddling_stop(tok, ids: list[int]) -> tuple[str, int, int]:
    """A 4-character stop string with 2 characters in token ``i - 1`` and 2 in token ``i``, occurring first
    there. Returns (stop, where it starts in the text, i)."""
    full = tok.decode(ids)
    ends = [len(tok.decode(ids[: k + 1])) for k in range(len(ids))]
    for i in range(len(ids) // 3, len(ids) - 1):
        b = ends[i - 1]  # text offset of the boundary between token i - 1 and token i
        stop = full[b - 2 : b + 2]
        if ends[i - 1] - (ends[i - 2] if i >= 2 else 0) >= 2 and ends[i] - b >= 2 and full.find(stop) == b - 2:
            assert all(full.startswith(tok.decode(ids[:k])) for k in range(i + 2))
            return stop, b - 2, i
    raise AssertionError(f"no straddling stop string in {full!r}")


def test_stop_string_across_token_boundary(engine, tok, haiku_ids, haiku_greedy):
    full = tok.decode(haiku_greedy)
    stop, at, i = _straddling_stop(tok, haiku_greedy)
    params = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True, "stop": [stop, "#never#"]}
    out = engine.generate(input_ids=haiku_ids, sampling_params=params)
    assert out["text"] == full[:at]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["output_ids"] == haiku_greedy[: i + 1]  # generation ends on the token completing the stop

    kept = engine.generate(input_ids=haiku_ids, sampling_params={**params, "no_stop_trim": True})
    assert kept["text"] == full[: at + len(stop)]
    assert kept["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}

    snapshots = list(engine.generate(input_ids=haiku_ids, sampling_params=params, stream=True))
    final = assert_cumulative(snapshots)  # every streamed text is a prefix of the trimmed final text
    assert final["text"] == full[:at]
    assert any(len(s["output_ids"]) == i for s in snapshots[:-1])  # a snapshot right before the stop's end
    assert_no_leak(engine)


def test_stop_token_ids(engine, tok, haiku_ids, haiku_greedy):
    j = next(k for k in range(3, len(haiku_greedy)) if haiku_greedy.index(haiku_greedy[k]) == k)
    stop_id = haiku_greedy[j]
    params = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True, "stop_token_ids": [stop_id]}
    out = engine.generate(input_ids=haiku_ids, sampling_params=params)
    assert out["output_ids"] == haiku_greedy[: j + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["text"] == tok.decode(haiku_greedy[:j])  # the stop token's text is trimmed ...
    kept = engine.generate(input_ids=haiku_ids, sampling_params={**params, "no_stop_trim": True})
    assert kept["text"] == tok.decode(haiku_greedy[: j + 1])  # ... unless no_stop_trim
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- UTF-8
# Raw prompts whose greedy continuations are emoji / CJK characters split over several byte-level tokens.
UNICODE_PROMPTS = [
    ("Emoji: 😀 😃 😄 😁 😆 😅", 16),
    ("My favourite emojis are 🍕🍔🍟🌭", 16),  # is cut inside a character at 16 tokens
    ("東京は日本の首都です。大阪は", 12),
    ("中文：我爱北京天安门。上海是", 14),
]


def test_multibyte_characters_never_stream_halves(engine, tok):
    prompts = [p for p, _ in UNICODE_PROMPTS]
    params = [{"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True} for _, n in UNICODE_PROMPTS]
    groups = split_by_index(engine.generate(prompts, params, stream=True))
    assert sorted(groups) == list(range(len(prompts)))
    split_chars = 0
    for k, (_, n) in enumerate(UNICODE_PROMPTS):
        final = assert_cumulative(groups[k])
        assert final["meta_info"]["finish_reason"] == {"type": "length", "length": n}
        assert final["text"] == tok.decode(final["output_ids"])
        assert any(ord(c) > 0x2E80 for c in final["text"])  # the prompt did force emoji / CJK output
        split_chars += sum(FFFD in tok.decode([t]) for t in final["output_ids"])
    assert split_chars > 0, "no output token was a partial character; the test checks nothing"
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- streams
def test_sync_stream_is_cumulative_and_matches_generate(engine, haiku_ids):
    ref = engine.generate(input_ids=haiku_ids, sampling_params=greedy_params(10))
    snapshots = list(engine.generate(input_ids=haiku_ids, sampling_params=greedy_params(10), stream=True))
    final = assert_cumulative(snapshots)
    assert len(snapshots) >= 5  # streamed token by token, not delivered at the end
    assert final["output_ids"] == ref["output_ids"] and final["text"] == ref["text"]
    assert final["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert "index" not in final
    assert_no_leak(engine)


def test_batch_stream_carries_index(engine, chat_ids, haiku_ids):
    prompts = [chat_ids, haiku_ids, chat_ids[:-3]]
    refs = [engine.generate(input_ids=p, sampling_params=greedy_params(6))["output_ids"] for p in prompts]
    groups = split_by_index(engine.generate(input_ids=prompts, sampling_params=greedy_params(6), stream=True))
    assert sorted(groups) == [0, 1, 2]
    for k, ref in enumerate(refs):
        final = assert_cumulative(groups[k])
        assert final["output_ids"] == ref
    # a list of one prompt is still a batch: its snapshots carry index 0
    single = list(engine.generate(input_ids=[haiku_ids], sampling_params=greedy_params(3), stream=True))
    assert [s["index"] for s in single] == [0] * len(single)
    assert assert_cumulative(single)["output_ids"] == refs[1][:3]
    assert_no_leak(engine)


def test_async_generate_and_async_stream(engine, chat_ids, haiku_ids):
    prompts = [chat_ids, haiku_ids, chat_ids[:-3], haiku_ids[:-2]]
    refs = [engine.generate(input_ids=p, sampling_params=greedy_params(6)) for p in prompts]

    async def stream_one(ids):
        return [snap async for snap in await engine.async_generate(
            input_ids=ids, sampling_params=greedy_params(6), stream=True)]

    async def main():
        plain = await asyncio.gather(*(engine.async_generate(input_ids=p, sampling_params=greedy_params(6))
                                       for p in prompts))
        streams = await asyncio.gather(*(stream_one(p) for p in prompts))
        batch = await engine.async_generate(input_ids=prompts, sampling_params=greedy_params(6))
        batch_stream = [s async for s in await engine.async_generate(
            input_ids=prompts, sampling_params=greedy_params(6), stream=True)]
        single = [s async for s in await engine.async_generate(
            input_ids=prompts[:1], sampling_params=greedy_params(6), stream=True)]
        return plain, streams, batch, batch_stream, single

    plain, streams, batch, batch_stream, single = asyncio.run(main())
    assert [s["index"] for s in single] == [0] * len(single)
    assert assert_cumulative(single)["output_ids"] == refs[0]["output_ids"]
    ref_ids = [r["output_ids"] for r in refs]
    assert [o["output_ids"] for o in plain] == ref_ids
    assert [o["text"] for o in plain] == [r["text"] for r in refs]
    assert [assert_cumulative(s)["output_ids"] for s in streams] == ref_ids
    assert [o["output_ids"] for o in batch] == ref_ids
    groups = split_by_index(batch_stream)
    assert [assert_cumulative(groups[k])["output_ids"] for k in range(len(prompts))] == ref_ids
    assert_no_leak(engine)
