"""The engine process's command loop: an unexpected exception from one request's submission becomes that
request's error, and the loop goes on serving the next commands."""

from __future__ import annotations

import multiprocessing
import threading
import time
from types import SimpleNamespace

from plait.runtime.server.process import _EngineServer, _Outbox


class BuggyEngine:
    """Fails a submission with an exception type the loop does not expect; counts aborts."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.shut_down = False

    def submit(self, **kwargs) -> None:
        raise AssertionError("an internal invariant broke")

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    def shutdown(self) -> None:
        self.shut_down = True


def test_an_unexpected_submit_error_answers_the_request_and_keeps_the_loop_running() -> None:
    http_side, engine_side = multiprocessing.Pipe()
    engine = BuggyEngine()
    server = _EngineServer(engine, engine_side)
    loop = threading.Thread(target=server.serve, daemon=True)
    loop.start()
    spec = {"input_ids": [1, 2], "sampling_params": SimpleNamespace(), "return_logprob": False,
            "logprob_start_len": -1, "top_logprobs_num": 0, "stream": False}
    http_side.send(("generate", "r1", spec))
    assert http_side.poll(10)
    [answer] = http_side.recv()
    assert answer[:2] == ("error", "r1") and "AssertionError: an internal invariant broke" in answer[2]
    http_side.send(("abort", "r2"))  # the loop is still there to take it
    http_side.send(("call", 7, "shutdown", None))
    assert http_side.poll(10)
    assert ("reply", 7, True, None) in http_side.recv()
    loop.join(10)
    assert not loop.is_alive() and engine.aborted == ["r2"] and engine.shut_down


class RecordingConn:
    """A pipe end that records what was sent and from which thread; ``gate`` holds a send while set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list]] = []
        self.gate = threading.Event()
        self.gate.set()

    def send(self, batch: list) -> None:
        self.gate.wait(10)
        self.sent.append((threading.current_thread().name, list(batch)))


def test_a_first_output_leaves_on_the_callers_thread_and_never_overtakes_queued_ones() -> None:
    """``_Outbox.put(urgent=True)`` ships at once on the calling (engine) thread when nothing waits or is
    being sent; otherwise it queues behind what is pending, so every message keeps its order."""
    conn = RecordingConn()
    outbox = _Outbox(conn)
    try:
        outbox.put(("out", "a", 0, False, {}), urgent=True)
        assert conn.sent == [(threading.current_thread().name, [("out", "a", 0, False, {})])]
        conn.gate.clear()  # the sender thread blocks in its next send
        outbox.put(("accepted", "b"))
        deadline = time.monotonic() + 10
        while not outbox.sending:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        outbox.put(("out", "b", 0, False, {}), urgent=True)  # a send is running: it must queue
        outbox.put(("out", "b", 0, False, {"later": 1}))
        conn.gate.set()
        while sum(len(batch) for _, batch in conn.sent) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        messages = [message for _, batch in conn.sent for message in batch]
        assert messages == [("out", "a", 0, False, {}), ("accepted", "b"), ("out", "b", 0, False, {}),
                            ("out", "b", 0, False, {"later": 1})]
        assert all(name == "plait-engine-sender" for name, _ in conn.sent[1:])
    finally:
        outbox.close()
