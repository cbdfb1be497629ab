"""Outputs of one sample that wait together in the HTTP process leave as one event (``RequestStream``):
what the merged event carries equals what the separate events carried together."""

from __future__ import annotations

import asyncio

import pytest

from plait.runtime.server.process import EngineClient, EngineUnavailableError, RequestStream, _Pending, merge_outputs


class _Client:
    """The part of ``EngineClient`` a ``RequestStream`` uses."""

    _event = staticmethod(EngineClient._event)

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def _finish_stream(self, rid: str, pending: _Pending) -> None:
        if pending.expected:
            self.aborted.append(rid)


def _out(index: int, ids: list[int], text: str, finished: bool = False, **meta) -> tuple:
    payload = {"output_ids": ids, "meta_info": {"completion_tokens": meta.pop("count", len(ids)), **meta}}
    payload["text" if finished else "text_delta"] = text
    return ("out", "r", index, finished, payload)


async def _events(messages: list[tuple], expected: int = 1, trickle: list[tuple] = ()) -> list:
    """The events a stream yields when ``messages`` wait in its queue before it is read and ``trickle``
    arrives one message per read."""
    pending = _Pending(asyncio.Queue(), expected)
    for message in messages:
        pending.queue.put_nowait(message)
    stream, events = RequestStream(_Client(), "r", pending), []
    later = list(trickle)
    async for event in stream:
        events.append(event)
        if later:
            pending.queue.put_nowait(later.pop(0))
    return events


def test_waiting_outputs_leave_as_one_event_with_the_joined_deltas():
    events = asyncio.run(_events([
        _out(0, [5], "He"), _out(0, [6], "llo", count=2), _out(0, [7, 8], " wor", count=4),
    ], trickle=[_out(0, [9], "Hello world", finished=True, count=5)]))
    assert [(e.text_delta, e.output_ids, e.finished) for e in events] == [
        ("Hello wor", [5, 6, 7, 8], False), ("ld", [9], True)]
    assert events[0].text == "Hello wor" and events[1].text == "Hello world"
    assert events[0].meta_info["completion_tokens"] == 4  # the latest counts


def test_a_final_output_absorbs_the_deltas_before_it():
    events = asyncio.run(_events([_out(0, [1], "a"), _out(0, [2], "b"), _out(0, [3], "abc", finished=True)]))
    assert len(events) == 1 and events[0].finished
    assert (events[0].text, events[0].text_delta, events[0].output_ids) == ("abc", "abc", [1, 2, 3])


def test_outputs_of_other_samples_keep_their_order():
    events = asyncio.run(_events([
        _out(0, [1], "a"), _out(0, [2], "b"), _out(1, [3], "x"), _out(0, [4], "c"),
        _out(1, [5], "xy", finished=True), _out(0, [6], "abcd", finished=True),
    ], expected=2))
    assert [(e.index, e.text_delta, e.output_ids) for e in events] == [
        (0, "ab", [1, 2]), (1, "x", [3]), (0, "c", [4]), (1, "y", [5]), (0, "d", [6])]


def test_a_dead_engine_still_ends_the_stream_after_what_came_before():
    pending_messages = [_out(0, [1], "a"), _out(0, [2], "b"), ("dead", "the engine process exited")]
    seen = []

    async def read() -> None:
        pending = _Pending(asyncio.Queue(), 1)
        for message in pending_messages:
            pending.queue.put_nowait(message)
        async for event in RequestStream(_Client(), "r", pending):
            seen.append(event.text)

    with pytest.raises(EngineUnavailableError, match="exited"):
        asyncio.run(read())
    assert seen == ["ab"]


def test_merge_joins_output_logprobs_and_keeps_the_first_inputs():
    first = _out(0, [1], "a", input_token_logprobs=[(-0.5, 9, None)], output_token_logprobs=[(-1.0, 1, None)],
                 output_top_logprobs=[[(-1.0, 1, None)]], output_token_logprobs_length=1)
    second = _out(0, [2], "b", input_token_logprobs=[], output_token_logprobs=[(-2.0, 2, None)],
                  output_top_logprobs=[[(-2.0, 2, None)]], output_token_logprobs_length=2)
    merged = merge_outputs([first, second])[4]
    assert merged["output_ids"] == [1, 2] and merged["text_delta"] == "ab"
    meta = merged["meta_info"]
    assert meta["input_token_logprobs"] == [(-0.5, 9, None)]
    assert meta["output_token_logprobs"] == [(-1.0, 1, None), (-2.0, 2, None)]
    assert meta["output_top_logprobs"] == [[(-1.0, 1, None)], [(-2.0, 2, None)]]
    assert meta["output_token_logprobs_length"] == 2
    assert first[4]["output_ids"] == [1] and first[4]["meta_info"]["output_token_logprobs"] == [(-1.0, 1, None)]
