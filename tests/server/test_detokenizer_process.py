"""The detokenizer process (``plait serve``'s default ``--detokenizer process``): what ``StreamDecoder``
adds to the engine's messages, and the three processes' life cycle (one ends, the others notice)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from plait.runtime.server.process import (
    EngineClient,
    EngineUnavailableError,
    StreamDecoder,
    merge_outputs,
)


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from plait.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(bundled_model_dir)


def _out(rid: str, index: int, ids: list[int], finished: bool = False, text: str | None = None) -> tuple:
    payload = {"output_ids": ids, "meta_info": {"completion_tokens": len(ids)}}
    if text is not None:
        payload["text" if finished else "text_delta"] = text
    return ("out", rid, index, finished, payload)


def test_registered_streams_get_their_text_from_the_ids(tokenizer):
    """A registered stream's payloads get ``text_delta`` from their ids, with the prompt's tail as context
    (the first token's leading space), a character split across tokens held until complete, several
    ids in one payload (merged outputs) included; each output of an ``n > 1`` stream has its own."""
    prompt = tokenizer.encode("Say hello:", add_special_tokens=False)
    ids = tokenizer.encode(" Hello there, caf\u00e9 \U0001F389 friends", add_special_tokens=False)
    text = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]
    decoder = StreamDecoder(tokenizer)
    assert decoder.process([("decode", "r", prompt[-5:], True, 2), ("accepted", "r")]) == [("accepted", "r")]
    assert set(decoder.streams["r"].detokenizers) == {0, 1}  # made at registration, off the first token's path
    deltas: dict[int, list[str]] = {0: [], 1: []}
    parts = [ids[:3]] + [[token] for token in ids[3:]]
    for part in parts:
        batch = decoder.process([_out("r", 0, part), _out("r", 1, part)])
        for message in batch:
            deltas[message[2]].append(message[4]["text_delta"])
    assert "".join(deltas[0]) == "".join(deltas[1]) == text
    assert deltas[0][0].startswith(" Hello")
    assert all("\ufffd" not in delta for delta in deltas[0])
    assert "" in deltas[0]  # the emoji's first byte-level tokens wait for its last
    # merged payloads (the HTTP side joins them) carry the joined deltas
    assert merge_outputs([_out("r", 0, [1], text="a"), _out("r", 0, [2], text="b")])[4]["text_delta"] == "ab"


def test_other_messages_pass_unchanged_and_streams_end_with_their_outputs(tokenizer):
    decoder = StreamDecoder(tokenizer)
    engine_decoded = _out("r", 0, [42], text="x!")  # a stream the engine decodes itself (stop strings)
    plain = _out("q", 0, [42])  # not registered: a request that is not streamed
    reply = ("reply", 3, True, {"running": 0})
    decoder.process([("decode", "r", [], True, 2)])
    assert decoder.process([engine_decoded, plain, reply]) == [engine_decoded, plain, reply]
    assert engine_decoded[4]["text_delta"] == "x!" and "text_delta" not in plain[4]
    decoder.process([_out("r", 0, [], finished=True, text="x!")])
    assert "r" in decoder.streams  # output 1 still runs
    decoder.process([_out("r", 1, [], finished=True, text="x!")])
    assert "r" not in decoder.streams
    decoder.process([("decode", "e", [1, 2], True, 1), ("error", "e", "bad schema")])
    assert not decoder.streams  # refused by the engine: nothing kept


def test_the_streams_it_keeps_are_bounded(tokenizer):
    decoder = StreamDecoder(tokenizer, max_streams=3)
    decoder.process([("decode", f"r{i}", [], True, 1) for i in range(5)])
    assert list(decoder.streams) == ["r2", "r3", "r4"] and decoder.dropped == 2


# ------------------------------------------------------------------------------------ real processes
async def _stream_text(client: EngineClient, rid: str, prompt: list[int], tokens: int) -> tuple[str, str, list]:
    """(streamed deltas joined, final text, events) of one greedy streamed request."""
    spec = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True},
            "return_logprob": False, "logprob_start_len": -1, "top_logprobs_num": 0, "stream": True}
    stream = await client.submit(rid, spec, 1)
    events = [event async for event in stream]
    return "".join(e.text_delta for e in events), events[-1].text, events


def _kill_and_wait(process, deadline_s: float = 30.0) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(deadline_s)
    assert not process.is_alive()


@pytest.mark.model
def test_a_dead_detokenizer_or_engine_ends_the_server_cleanly(tokenizer):
    """Streams decoded in the detokenizer process equal the engine's text; when the detokenizer dies the
    client reports itself dead naming it (requests get ``EngineUnavailableError``, nothing hangs); when
    the engine dies the detokenizer ends by itself."""
    settings = {"max_total_tokens": 1024, "grammar_compile_workers": 1}
    prompt = tokenizer.encode("Count with me: 1, 2, 3,")

    async def run_until_detokenizer_dies() -> None:
        client = EngineClient("smollm2-135m-instruct", settings)
        await asyncio.to_thread(client.start)
        client.attach(asyncio.get_running_loop())
        try:
            streamed, final, events = await _stream_text(client, "a", prompt, 24)
            assert streamed == final and len(events) > 2 and sum(bool(e.text_delta) for e in events) > 2
            assert client.alive
            _kill_and_wait(client._detokenizer)
            await asyncio.sleep(0.5)
            assert not client.alive
            with pytest.raises(EngineUnavailableError, match="detokenizer"):
                await _stream_text(client, "b", prompt, 4)
        finally:
            await client.shutdown(timeout=30)
        assert not client._process.is_alive()

    async def run_until_engine_dies() -> None:
        client = EngineClient("smollm2-135m-instruct", settings)
        await asyncio.to_thread(client.start)
        client.attach(asyncio.get_running_loop())
        try:
            _kill_and_wait(client._process)
            client._detokenizer.join(30)
            assert not client._detokenizer.is_alive()  # its input closed with the engine: it ended by itself
            assert client._detokenizer.exitcode == 0
            await asyncio.sleep(0.5)
            with pytest.raises(EngineUnavailableError, match="engine process exited"):
                await _stream_text(client, "c", prompt, 4)
        finally:
            await client.shutdown(timeout=30)

    asyncio.run(run_until_detokenizer_dies())
    asyncio.run(run_until_engine_dies())
