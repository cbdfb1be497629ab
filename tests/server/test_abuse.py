"""A bounded fuzz / abuse run against one real ``plait serve`` (loopback, bundled model, well under a minute).

Whatever one client sends, every other client keeps being served: each bad request below gets the 4xx
that names its problem (never a 5xx or a dropped connection) while a plain client runs alongside and
must keep getting the same greedy text; then a disconnect storm (streams and waiting callers that leave
mid-request) must leave no request running and no KV slot used (invariant 2), and outputs unchanged.
"""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest

from tests.server.server_helpers import MODEL, assert_idle_and_flushed, start_server

pytestmark = pytest.mark.model
API_KEY = "abuse-key"
BODY_LIMIT = 400_000
KV_SLOTS = 4096  # smaller than the context (8192): a request may fit the context but never the KV pool
PROMPT_LOGPROBS = 50_000  # prompt positions x top logprobs per request
PLAIN = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
SCHEMA_OK = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _deep_schema(depth: int) -> str:
    """A JSON schema (as a string: the body itself stays shallow) of ``depth`` nested arrays."""
    return '{"type": "array", "items": ' * depth + '{"type": "integer"}' + "}" * depth


def _chain_grammar(rules: int) -> str:
    """A Lark grammar of ``rules`` chained rules (one deep derivation)."""
    lines = ["start: r0"] + [f"r{i}: \"a\" r{i + 1}" for i in range(rules - 1)] + [f"r{rules - 1}: \"a\""]
    return "\n".join(lines)


def _completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields}


def _chat(content, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


# (name, path, body: a JSON-able object or raw bytes/str, expected status, a word the message must contain)
CASES = [
    ("invalid json", "/generate", b'{"text": ', 400, "JSON"),
    ("not utf-8", "/generate", b'{"text": "\xff\xfe"}', 400, "UTF-8"),
    ("nested arrays", "/generate", "[" * 2000, 400, "deep"),
    ("nested objects", "/v1/completions", '{"a":' * 2000 + "1" + "}" * 2000, 400, "deep"),
    ("nested in a field", "/v1/chat/completions", json.dumps(_chat("hi", metadata=_nested(100))), 400, "deep"),
    ("body over the limit", "/generate", json.dumps({"text": "a" * BODY_LIMIT}), 413, "max-body-bytes"),
    ("lone surrogate: text", "/generate", '{"text": "ab\\ud800", "sampling_params": {"max_new_tokens": 2}}', 400,
     "surrogate"),
    ("lone surrogate: rid", "/generate", '{"text": "ab", "rid": "\\udc00x"}', 400, "surrogate"),
    ("lone surrogate: prompt", "/v1/completions", '{"model": "%s", "prompt": "\\udfff"}' % MODEL, 400, "surrogate"),
    ("lone surrogate: chat", "/v1/chat/completions",
     '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}' % MODEL, 400, "surrogate"),
    ("lone surrogate: key", "/generate", '{"text": "ab", "\\ud800": 1}', 400, "surrogate"),
    ("lone surrogate: chat template", "/apply_chat_template",
     '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "surrogate"),
    ("lone surrogate: tokenize", "/tokenize", '{"prompt": "\\ud800"}', 400, "surrogate"),
    ("prompt [[1, [2]]]", "/v1/completions", _completion(prompt=[[1, [2]]]), 400, "prompt"),
    ("prompt [['a']]", "/v1/completions", _completion(prompt=[["a"]]), 400, "prompt"),
    ("prompt [1, 'a']", "/v1/completions", _completion(prompt=[1, "a"]), 400, "prompt"),
    ("user: 5", "/v1/completions", _completion(user=5), 400, "user"),
    ("user: 5 (chat)", "/v1/chat/completions", _chat("hi", user=5), 400, "user"),
    ("token outside the vocabulary", "/generate", {"input_ids": [10**9]}, 400, "vocabulary"),
    ("n = 10000", "/generate", {"text": "a", "sampling_params": {"n": 10000, "max_new_tokens": 1}}, 400, "max-n"),
    ("n = 10000 (openai)", "/v1/completions", _completion(n=10000), 400, "max-n"),
    ("prompt logprobs volume", "/generate", {"text": "word " * 2000, "return_logprob": True, "logprob_start_len": 0,
                                             "top_logprobs_num": 100, "sampling_params": {"max_new_tokens": 1}},
     400, "max-prompt-logprobs"),
    ("echo logprobs volume", "/v1/completions", _completion(prompt="word " * 3000, echo=True, logprobs=20,
                                                            max_tokens=1), 400, "max-prompt-logprobs"),
    ("never fits the KV pool", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": KV_SLOTS + 100}},
     400, "KV"),
    ("never fits the KV pool (chat)", "/v1/chat/completions", _chat("a", max_tokens=KV_SLOTS + 100), 400, "KV"),
    ("over the context", "/v1/completions", _completion(max_tokens=10**7), 400, "max_tokens"),
    ("prompt far over the context", "/generate", {"text": "word " * 70_000}, 400, "characters"),
    ("negative max_tokens", "/v1/completions", _completion(max_tokens=-1), 400, "max_tokens"),
    ("temperature NaN", "/generate", '{"text": "a", "sampling_params": {"temperature": NaN}}', 400, "temperature"),
    ("wrong type: stream", "/generate", {"text": "a", "stream": "yes"}, 400, "stream"),
    ("not an object", "/v1/chat/completions", [1, 2, 3], 400, "object"),
    ("empty body", "/generate", b"", 400, "JSON"),
    ("bad regex", "/generate", {"text": "a", "sampling_params": {"regex": "(", "max_new_tokens": 2}}, 400, "regex"),
    ("bad schema JSON", "/generate", {"text": "a", "sampling_params": {"json_schema": "{", "max_new_tokens": 2}},
     400, "json_schema"),
    ("unknown model", "/v1/completions", _completion(model="nope"), 404, "does not exist"),
    # the engine's own bounds, reached through the server
    ("stop string too long", "/generate", {"text": "a", "sampling_params": {"stop": ["x" * 100_000]}}, 400, "stop"),
    ("stop list too long", "/v1/completions", _completion(stop=[str(i) for i in range(5000)]), 400, "stop"),
    ("cyclic $ref", "/generate", {"text": "a", "sampling_params": {"json_schema": json.dumps({"$ref": "#"})}}, 400,
     "cyclic"),
    ("schema nested too deep", "/generate", {"text": "a", "sampling_params": {"json_schema": _deep_schema(300)}},
     400, "nests deeper"),
    ("5000-rule grammar", "/generate", {"text": "a", "sampling_params": {"ebnf": _chain_grammar(5000)}}, 400, "rules"),
]


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    server = start_server("--max-body-bytes", str(BODY_LIMIT), "--max-total-tokens", str(KV_SLOTS),
                          "--max-prompt-logprobs", str(PROMPT_LOGPROBS), api_key=API_KEY)
    yield server
    assert server.stop() == 0, server.output()


def send(server, path: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        content = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    else:
        content = json.dumps(body).encode()
    headers = {**server.headers, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


class PlainClient(threading.Thread):
    """Sends the same greedy request over and over; records every answer."""

    def __init__(self, server, expected: str):
        super().__init__(daemon=True)
        self.server, self.expected = server, expected
        self.stop = threading.Event()
        self.answers: list[tuple[int, str | None]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            response = send(self.server, "/generate", PLAIN)
            self.answers.append((response.status_code, response.json().get("text")))


def test_bad_requests_get_a_4xx_while_others_are_served(server):
    expected = send(server, "/generate", PLAIN).json()["text"]
    plain = PlainClient(server, expected)
    plain.start()
    try:
        failures = []
        for name, path, body, status, word in CASES:
            response = send(server, path, body)
            message = response.json().get("error", {}).get("message", "") if response.content else ""
            if response.status_code != status or word.lower() not in message.lower():
                failures.append((name, response.status_code, message[:200]))
        assert not failures, failures
    finally:
        plain.stop.set()
        plain.join(60)
    assert plain.answers and all(answer == (200, expected) for answer in plain.answers), plain.answers
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert_idle_and_flushed(server)


def test_transport_edges(server):
    url = server.url
    assert httpx.head(url + "/health", timeout=10).status_code == 200
    assert httpx.head(url + "/ready", timeout=10).status_code == 200
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=10).status_code == 200
    for header in ("Basic " + API_KEY, API_KEY, "Bearer", "Bearer wrong", f"Bearer  {API_KEY}x"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": header}, timeout=10).status_code == 401, header
    big = b"x" * (BODY_LIMIT + 1)  # refused by its Content-Length before it is read
    assert send(server, "/v1/chat/completions", big).status_code == 413

    def chunked():  # no Content-Length: the limit applies while the body streams in
        for _ in range(BODY_LIMIT // 10_000 + 2):
            yield b" " * 10_000

    response = httpx.post(url + "/generate", content=chunked(), headers=server.headers, timeout=30)
    assert response.status_code == 413 and "max-body-bytes" in response.json()["error"]["message"]
    ok = send(server, "/generate", '{"text": "smile \\ud83d\\ude00", "sampling_params": {"max_new_tokens": 2}}')
    assert ok.status_code == 200  # a surrogate *pair* is an ordinary character
    structured = send(server, "/generate", {"text": "JSON:", "sampling_params": {"json_schema": json.dumps(SCHEMA_OK),
                                                                                 "max_new_tokens": 24,
                                                                                 "temperature": 0}})
    assert structured.status_code == 200


def test_tiny_temperature_is_greedy(server):
    greedy = send(server, "/generate", PLAIN).json()["text"]
    for temperature in (1e-40, 1e-6):
        body = {**PLAIN, "sampling_params": {**PLAIN["sampling_params"], "temperature": temperature}}
        assert send(server, "/generate", body).json()["text"] == greedy, temperature


def test_disconnect_storm_leaks_nothing_and_changes_nothing(server):
    expected = send(server, "/generate", PLAIN).json()["text"]
    rng = random.Random(12)

    def leave_stream(i: int) -> None:
        body = {"text": f"Story {i}: once upon a time", "stream": True,
                "sampling_params": {"max_new_tokens": 64, "temperature": 0.8, "seed": i}}
        with httpx.stream("POST", server.url + "/generate", json=body, headers=server.headers, timeout=60) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= rng.randint(0, 4):
                    break  # leaving closes the connection mid-stream

    def leave_waiting(i: int) -> None:
        body = _chat(f"Tell me about the number {i}", max_tokens=64, n=2)
        try:
            send(server, "/v1/chat/completions", body, timeout=0.3 + 0.1 * (i % 4))
        except httpx.TimeoutException:
            pass

    started = time.monotonic()
    threads = [threading.Thread(target=leave_stream if i % 2 else leave_waiting, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert time.monotonic() - started < 60
    assert_idle_and_flushed(server)
    assert send(server, "/generate", PLAIN).json()["text"] == expected
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
