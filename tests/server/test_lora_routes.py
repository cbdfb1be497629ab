"""LoRA over HTTP: ``lora_path`` on /generate, OpenAI's ``model`` naming an adapter, /v1/models listing
adapters, /load_lora_adapter and /unload_lora_adapter; and the engine process's handling of them.

The HTTP side runs the real app and uvicorn on loopback against a fake engine speaking the engine
pipe's protocol (no model); the engine process's command loop runs against a recording engine. The
engine's own LoRA behaviour is tested in tests/runtime/test_lora.py.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import httpx
import pytest

from plait.runtime.server.app import DrainingServer, ServerConfig, create_app
from plait.runtime.server.process import EngineClient, EngineInfo, _EngineServer
from tests.server.server_helpers import free_port

MODEL = "base-model"
INFO = EngineInfo(model=MODEL, tokenizer_dir=None, context_length=128, max_prompt_tokens=127, vocab_size=1000,
                  kv_slots_total=1000, config={"lora_paths": (("a1", "/adapters/a1"),)}, supports_program_id=False)


class FakeEngine:
    """The engine end of the pipe: knows adapters by name, answers each request with one finished token
    (an error for an unknown adapter, as the engine's ``UnknownLoraError``), records what it got."""

    def __init__(self) -> None:
        self.http_end, self.conn = multiprocessing.Pipe(duplex=True)
        self.loaded = {"a1"}
        self.specs: list[dict] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "generate":
                rid, spec = message[1], message[2]
                self.specs.append(spec)
                if spec.get("lora_path") not in (None, *self.loaded):
                    message = f"unknown LoRA adapter {spec['lora_path']!r}; loaded adapters: {sorted(self.loaded)}"
                    self.conn.send([("error", rid, message)])
                    continue
                payload = {"output_ids": [7], "text": "x", "meta_info": {
                    "id": rid, "prompt_tokens": 2, "completion_tokens": 1, "cached_tokens": 0,
                    "finish_reason": {"type": "length", "length": 1}}}
                self.conn.send([("accepted", rid), ("out", rid, 0, True, payload)])
            elif message[0] == "call":
                call_id, name, arg = message[1:]
                if name == "load_lora_adapter":
                    ok = arg[1].startswith("/adapters/")
                    if ok:
                        self.loaded.add(arg[0])
                    self.conn.send([("reply", call_id, ok, None if ok else "LoraFormatError: not a directory")])
                elif name == "unload_lora_adapter":
                    ok = arg in self.loaded
                    self.loaded.discard(arg)
                    self.conn.send([("reply", call_id, ok, None if ok else "UnknownLoraError: unknown adapter")])
                else:
                    self.conn.send([("reply", call_id, True, {} if name == "stats" else None)])
                    if name == "shutdown":
                        return


@pytest.fixture(scope="module")
def fake_server():
    engine = FakeEngine()
    client = EngineClient(MODEL, {}, detokenizer_process=False)
    client.info, client._conn, client._outputs = INFO, engine.http_end, engine.http_end
    client._process = type("Alive", (), {"is_alive": lambda self: True, "join": lambda self, t=None: None,
                                         "kill": lambda self: None})()
    import uvicorn

    port = free_port()
    server = DrainingServer(uvicorn.Config(create_app(ServerConfig(model=MODEL), client, None), host="127.0.0.1",
                                           port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield engine, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_adapters_over_http(fake_server):
    engine, url = fake_server
    ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert ids == [MODEL, "a1"]
    # native: one adapter, or one per prompt
    assert httpx.post(url + "/generate", json={"input_ids": [1, 2], "lora_path": "a1"}).status_code == 200
    assert engine.specs[-1]["lora_path"] == "a1"
    r = httpx.post(url + "/generate", json={"input_ids": [[1, 2], [3, 4]], "lora_path": ["a1", None]})
    assert r.status_code == 200 and [s["lora_path"] for s in engine.specs[-2:]] == ["a1", None]
    r = httpx.post(url + "/generate", json={"input_ids": [1, 2], "lora_path": "nope"})
    assert r.status_code == 400 and "a1" in r.json()["error"]["message"]
    # OpenAI: the model names the adapter
    r = httpx.post(url + "/v1/completions", json={"model": "a1", "prompt": [1, 2], "max_tokens": 1})
    assert r.status_code == 200 and engine.specs[-1]["lora_path"] == "a1"
    httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 1})
    assert engine.specs[-1]["lora_path"] is None
    r = httpx.post(url + "/v1/completions", json={"model": "a2", "prompt": [1, 2], "max_tokens": 1})
    assert r.status_code == 404 and "a1" in r.json()["error"]["message"]
    # loading and unloading at run time
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/adapters/a2"})
    assert r.status_code == 200 and r.json()["loaded_adapters"] == ["a1", "a2"]
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [MODEL, "a1", "a2"]
    assert httpx.get(url + "/v1/models/a2").json()["parent"] == MODEL
    r = httpx.post(url + "/v1/completions", json={"model": "a2", "prompt": [1, 2], "max_tokens": 1})
    assert r.status_code == 200 and engine.specs[-1]["lora_path"] == "a2"
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "a3", "lora_path": "/elsewhere"})
    assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"]
    for body in ({"lora_name": "a3"}, {"lora_name": "", "lora_path": "/adapters/x"}, {"lora_name": MODEL,
                                                                                     "lora_path": "/adapters/x"}):
        assert httpx.post(url + "/load_lora_adapter", json=body).status_code == 400
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 400
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [MODEL, "a1"]


class RecordingEngine:
    """Records the engine process's calls into the engine."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def submit(self, **kwargs) -> list[str]:
        self.calls.append(("submit", kwargs.get("lora_path")))
        kwargs["on_admitted"](None)
        return []

    def load_lora_adapter(self, name: str, path: str) -> None:
        self.calls.append(("load", name, path))

    def unload_lora_adapter(self, name: str) -> None:
        raise ValueError(f"LoRA adapter {name!r} is in use")

    def shutdown(self) -> None:
        pass


def test_engine_process_passes_adapters_on() -> None:
    http_side, engine_side = multiprocessing.Pipe()
    engine = RecordingEngine()
    loop = threading.Thread(target=_EngineServer(engine, engine_side).serve, daemon=True)
    loop.start()
    spec = {"input_ids": [1, 2], "sampling_params": {}, "return_logprob": False, "logprob_start_len": -1,
            "top_logprobs_num": 0, "stream": False, "lora_path": "a1"}
    http_side.send(("generate", "r1", spec))
    http_side.send(("call", 1, "load_lora_adapter", ("a2", "/p")))
    http_side.send(("call", 2, "unload_lora_adapter", "a1"))
    replies: list = []
    deadline = time.monotonic() + 10
    while len([m for m in replies if m[0] == "reply"]) < 2:
        assert time.monotonic() < deadline and http_side.poll(10)
        replies += http_side.recv()
    assert ("accepted", "r1") in replies and ("submit", "a1") in engine.calls and ("load", "a2", "/p") in engine.calls
    assert ("reply", 1, True, None) in replies
    assert any(m[:3] == ("reply", 2, False) and "in use" in m[3] for m in replies)
    http_side.send(("call", 3, "shutdown", None))
    loop.join(10)
