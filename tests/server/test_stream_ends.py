"""Requests cut off by the server's side (the engine process died, the shutdown deadline passed) end
cleanly: a stream with an error event and ``[DONE]``, a waiting caller with a 503 and a message.

A fake engine speaks the engine pipe's protocol from a thread (no model), behind the real app and
uvicorn on loopback: it accepts every request, sends one token and then never finishes it.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import httpx
import pytest

from plait.runtime.server.app import DrainingServer, ServerConfig, create_app
from plait.runtime.server.process import EngineClient, EngineInfo
from tests.server.server_helpers import free_port

INFO = EngineInfo(model="fake", tokenizer_dir=None, context_length=128, max_prompt_tokens=127, vocab_size=1000,
                  kv_slots_total=1000, config={}, supports_program_id=False)
MODEL = "fake"


class FakeProcess:
    def __init__(self) -> None:
        self.up = True

    def is_alive(self) -> bool:
        return self.up

    def join(self, timeout: float | None = None) -> None:
        pass

    def kill(self) -> None:
        self.up = False


class FakeEngine:
    """The engine end of the pipe: accepts, sends one token per request, never finishes one."""

    def __init__(self) -> None:
        self.http_end, self.conn = multiprocessing.Pipe(duplex=True)
        self.process = FakeProcess()
        self.aborted: list[str] = []
        self.accepted: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            if not self.process.up:
                self.conn.close()  # the process is gone: the HTTP side's reader sees the pipe close
                return
            if not self.conn.poll(0.02):
                continue
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "generate":
                rid = message[1]
                payload = {"output_ids": [7], "meta_info": {"id": rid, "prompt_tokens": 2, "completion_tokens": 1,
                                                            "cached_tokens": 0, "finish_reason": None},
                           "text_delta": "x"}
                self.conn.send([("accepted", rid), ("out", rid, 0, False, payload)])
                self.accepted.append(rid)
            elif message[0] == "abort":
                self.aborted.append(message[1])
            elif message[0] == "call":
                self.conn.send([("reply", message[1], True, {} if message[2] == "stats" else None)])
                if message[2] == "shutdown":
                    return

    def die(self) -> None:
        """The engine process is gone: its end of the pipe closes."""
        self.process.up = False


def serve_fake(shutdown_timeout: float) -> tuple[DrainingServer, FakeEngine, str, threading.Thread]:
    engine = FakeEngine()
    client = EngineClient(MODEL, {}, detokenizer_process=False)
    client.info, client._process = INFO, engine.process
    client._conn = client._outputs = engine.http_end
    config = ServerConfig(model=MODEL, shutdown_timeout=shutdown_timeout)
    port = free_port()
    import uvicorn

    server = DrainingServer(uvicorn.Config(create_app(config, client, None), host="127.0.0.1", port=port,
                                           log_level="error", timeout_graceful_shutdown=shutdown_timeout + 2.0))
    server.drain_s = shutdown_timeout
    server.on_deadline = lambda: client.fail_pending("the server is shutting down (test deadline)")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    return server, engine, url, thread


def read_stream(url: str, path: str, body: dict, results: dict, key: str) -> None:
    with httpx.stream("POST", url + path, json=body, timeout=30) as response:
        results[key] = (response.status_code, [line for line in response.iter_lines() if line.startswith("data:")])


def post(url: str, path: str, body: dict, results: dict, key: str) -> None:
    response = httpx.post(url + path, json=body, timeout=30)
    results[key] = (response.status_code, response.json())


def run_requests(url: str) -> tuple[dict, list[threading.Thread]]:
    results: dict = {}
    threads = [
        threading.Thread(target=read_stream, args=(url, "/generate", {"input_ids": [1, 2], "stream": True}, results,
                                                   "native")),
        threading.Thread(target=read_stream, args=(url, "/v1/completions", {"model": MODEL, "prompt": [1, 2],
                                                                            "stream": True}, results, "openai")),
        threading.Thread(target=post, args=(url, "/generate", {"input_ids": [1, 2]}, results, "plain")),
    ]
    for thread in threads:
        thread.start()
    return results, threads


def check_cut_off(results: dict, status: int) -> None:
    for key in ("native", "openai"):
        code, lines = results[key]
        assert code == 200 and len(lines) >= 3, (key, results[key])
        assert lines[-1] == "data: [DONE]", (key, lines)
        error = json.loads(lines[-2][5:])["error"]
        assert error["code"] == status and error["message"], (key, error)
    code, body = results["plain"]
    assert code == status and body["error"]["message"], results["plain"]


def wait_streaming(engine: FakeEngine, url: str) -> None:
    deadline = time.monotonic() + 10
    while len(engine.accepted) < 3:
        assert time.monotonic() < deadline, "the requests did not reach the engine"
        time.sleep(0.02)
    time.sleep(0.3)  # their first token reached the clients


def test_engine_death_ends_streams_with_an_error_and_done():
    server, engine, url, thread = serve_fake(shutdown_timeout=5.0)
    try:
        results, threads = run_requests(url)
        wait_streaming(engine, url)
        engine.die()
        for t in threads:
            t.join(15)
        check_cut_off(results, 503)
        assert "not available" in results["plain"][1]["error"]["message"]
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        assert httpx.head(url + "/health", timeout=5).status_code == 503
    finally:
        server.should_exit = True
        thread.join(15)


def test_shutdown_deadline_ends_streams_with_an_error_and_done():
    server, engine, url, thread = serve_fake(shutdown_timeout=1.0)
    results, threads = run_requests(url)
    wait_streaming(engine, url)
    started = time.monotonic()
    server.should_exit = True  # what SIGTERM does
    for t in threads:
        t.join(15)
    thread.join(15)
    assert time.monotonic() - started < 6
    check_cut_off(results, 503)
    assert "shutting down" in results["plain"][1]["error"]["message"]
    assert len(engine.aborted) >= 3  # the engine was told to stop every cut-off request
