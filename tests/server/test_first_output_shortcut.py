"""A streamed sample's first output goes to the HTTP process twice: straight from the engine thread (its
text decoded there) and through the detokenizer; the HTTP side keeps whichever copy arrives first.
These tests take the three parts apart: the outbox, the forwarder, and the client's dispatch."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from plait.runtime.server.process import EngineClient, StreamDecoder, _Forwarder, _Outbox, _Pending
from plait.runtime.tokenizer import IncrementalDetokenizer


class _Pipe:
    """Records what is sent; ``block`` holds a send until released (a busy pipe)."""

    def __init__(self) -> None:
        self.sent: list = []
        self.block: threading.Event | None = None

    def send(self, batch: list) -> None:
        if self.block is not None:
            self.block.wait(10)
        self.sent.append(batch)


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from plait.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(bundled_model_dir)


def _event(ids: list[int], finished: bool = False, text: str = "") -> dict:
    return {"output": {"output_ids": ids, "meta_info": {"completion_tokens": len(ids)}, "text": text},
            "finished": finished, "text": False}


def test_an_idle_outbox_sends_the_direct_copy_at_once_and_the_item_the_usual_way():
    to_detokenizer, to_http = _Pipe(), _Pipe()
    outbox = _Outbox(to_detokenizer, direct=to_http)
    try:
        outbox.put(("out", "r", 0, False, {"n": 1}), urgent=True, direct=("out", "r", 0, False, {"n": "direct"}))
        assert to_http.sent == [[("out", "r", 0, False, {"n": "direct"})]]  # written by this thread, before put returned
        _wait_for(lambda: to_detokenizer.sent)
        assert to_detokenizer.sent == [[("out", "r", 0, False, {"n": 1})]]
        # busy (a send under way): the urgent item queues behind it and no direct copy is sent
        to_detokenizer.block = threading.Event()
        outbox.put(("accepted", "s"))
        _wait_for(lambda: outbox.sending)
        outbox.put(("out", "s", 0, False, {}), urgent=True, direct=("out", "s", 0, False, {"n": "direct"}))
        assert len(to_http.sent) == 1
        to_detokenizer.block.set()
        _wait_for(lambda: len(to_detokenizer.sent) == 3)
        assert to_detokenizer.sent[1:] == [[("accepted", "s")], [("out", "s", 0, False, {})]]
    finally:
        outbox.close()


def test_the_forwarder_marks_first_outputs_and_decodes_the_direct_copy_as_the_detokenizer_does(tokenizer):
    prompt = tokenizer.encode("Say hello:", add_special_tokens=False)
    ids = tokenizer.encode(" Hello there, caf\u00e9", add_special_tokens=False)
    to_detokenizer, to_http = _Pipe(), _Pipe()
    outbox = _Outbox(to_detokenizer, direct=to_http)
    try:
        forwarder = _Forwarder(outbox, "r", 0, IncrementalDetokenizer(tokenizer, prompt))
        forwarder.put(_event(ids[:2]))
        forwarder.put(_event(ids))
        _wait_for(lambda: sum(len(batch) for batch in to_detokenizer.sent) == 2)
    finally:
        outbox.close()
    (direct,), = to_http.sent
    first, second = [message for batch in to_detokenizer.sent for message in batch]
    assert direct[4]["first"] and first[4]["first"] and "first" not in second[4]
    assert "text_delta" not in first[4]  # the detokenizer decodes its copy
    decoder = StreamDecoder(tokenizer)
    decoder.process([("decode", "r", prompt, True, 1)])
    through_detokenizer = decoder.process([first, second])
    assert direct[4]["text_delta"] == through_detokenizer[0][4]["text_delta"]
    assert direct[4]["text_delta"] + through_detokenizer[1][4]["text_delta"] == tokenizer.decode(prompt + ids)[
        len(tokenizer.decode(prompt)):]


def test_a_finished_first_output_goes_direct_with_its_text_and_without_a_detokenizer():
    to_detokenizer, to_http = _Pipe(), _Pipe()
    outbox = _Outbox(to_detokenizer, direct=to_http)
    try:
        _Forwarder(outbox, "r", 0).put(_event([5, 6], finished=True, text="hi"))
        _Forwarder(outbox, "q", 0).put(_event([7]))  # streamed, no detokenizer for it: the usual way only
        _wait_for(lambda: sum(len(batch) for batch in to_detokenizer.sent) == 2)
    finally:
        outbox.close()
    assert [batch[0][1] for batch in to_http.sent] == ["r"] and to_http.sent[0][0][4]["text"] == "hi"


def _client_with(rid: str, n: int = 1) -> tuple[EngineClient, _Pending]:
    client = EngineClient("unused", {})
    pending = client._pending[rid] = _Pending(asyncio.Queue(), n)
    return client, pending


def _drain(pending: _Pending) -> list:
    items = []
    while not pending.queue.empty():
        items.append(pending.queue.get_nowait())
    return items


def _first(rid: str, index: int, text: str) -> tuple:
    return ("out", rid, index, False, {"output_ids": [1], "meta_info": {}, "text_delta": text, "first": True})


def test_the_client_keeps_the_first_copy_to_arrive_and_holds_outputs_that_overtake_the_answer():
    client, pending = _client_with("r", n=2)
    direct, relayed = _first("r", 0, "direct"), _first("r", 0, "relayed")
    later = ("out", "r", 0, False, {"output_ids": [2], "meta_info": {}, "text_delta": " more"})
    client._dispatch([direct])  # the direct copy overtook the engine's answer: held
    assert _drain(pending) == []
    client._dispatch([("accepted", "r"), relayed, later])
    assert _drain(pending) == [("accepted", "r"), direct, later]  # the relayed copy is dropped
    # the other output: its relayed copy arrives first, the direct one is the duplicate
    client._dispatch([_first("r", 1, "relayed")])
    client._dispatch([_first("r", 1, "direct")])
    assert _drain(pending) == [_first("r", 1, "relayed")]
    # a refused request's early copy goes nowhere; an unknown request's messages are ignored
    client2, refused = _client_with("x")
    client2._dispatch([_first("x", 0, "direct"), ("error", "x", "bad"), _first("nobody", 0, "?")])
    assert _drain(refused) == [("error", "x", "bad")]
