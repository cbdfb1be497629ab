"""SGLang's native protocol against a real ``plait serve`` process: results, streaming, logprobs, errors."""

from __future__ import annotations

import json
import time
from itertools import chain

import httpx
import pytest

from tests.server.server_helpers import assert_idle_and_flushed

pytestmark = pytest.mark.model
GREEDY = {"temperature": 0, "max_new_tokens": 10}
PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 5, 8,"]


@pytest.fixture(scope="module")
def server(default_server):
    yield default_server
    # the shared server's last user in a full run (tests/lang/backends/ runs before): stop it now
    assert default_server.stop() == 0, default_server.output()


@pytest.fixture(scope="module", autouse=True)
def idle_keep_alive(server):
    """A keep-alive connection that made one request when the module's server came up, and when (monotonic
    clock): it idles while the other tests run, so that the last test's 6 s of idling cost no extra time."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        assert _http_exchange(sock, "/health").startswith(b"HTTP/1.1 200")
        yield sock, time.monotonic()


def sse_events(response: httpx.Response) -> list:
    events = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_greedy_results_equal_the_in_process_engine(server, bundled_model_dir):
    import plait

    with plait.Engine(bundled_model_dir) as engine:
        expected = engine.generate(PROMPTS, GREEDY)
    got = server.post("/generate", {"text": PROMPTS, "sampling_params": GREEDY}).json()
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in expected]
    assert [o["text"] for o in got] == [o["text"] for o in expected]
    single = server.post("/generate", {"text": PROMPTS[0], "sampling_params": GREEDY}).json()
    assert isinstance(single, dict) and single["text"] == expected[0]["text"]
    meta = single["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 10}
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode(PROMPTS[0])) and meta["completion_tokens"] == 10
    assert meta["cached_tokens"] > 0  # the batch above cached this prompt


def test_input_ids_n_and_rid(server):
    ids = server.post("/generate", {"text": PROMPTS[2], "sampling_params": {"max_new_tokens": 0}}).json()
    assert ids["text"] == "" and ids["meta_info"]["completion_tokens"] == 0
    out = server.post("/generate", {"input_ids": [[504, 3575], [504]], "sampling_params": GREEDY}).json()
    assert len(out) == 2 and all(o["meta_info"]["prompt_tokens"] in (1, 2) for o in out)
    samples = server.post("/generate", {"text": "Once", "rid": "my-request",
                                        "sampling_params": {"n": 3, "max_new_tokens": 6, "seed": 7}}).json()
    assert len(samples) == 3 and len({s["text"] for s in samples}) > 1
    assert {s["meta_info"]["id"] for s in samples} == {"my-request_0", "my-request_1", "my-request_2"}
    again = server.post("/generate", {"text": "Once", "sampling_params": {"n": 3, "max_new_tokens": 6, "seed": 7}})
    assert [s["text"] for s in again.json()] == [s["text"] for s in samples]  # seeded: reproducible


def test_stream_is_cumulative_text_with_deltas(server):
    body = {"text": PROMPTS[1], "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 1}
    final = server.post("/generate", body).json()
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert len(events) > 1
    texts = [e["text"] for e in events]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1)) and texts[-1] == final["text"]
    # the text grows while streaming (the detokenizer process decodes the streamed ids), not only at the end
    assert len(set(texts[:-1])) > len(texts) // 2
    assert list(chain.from_iterable(e["output_ids"] for e in events)) == final["output_ids"]
    streamed = list(chain.from_iterable(e["meta_info"]["output_token_logprobs"] for e in events))
    assert [entry[1] for entry in streamed] == final["output_ids"]
    assert [entry[0] for entry in streamed] == pytest.approx([e[0] for e in final["meta_info"]["output_token_logprobs"]])
    assert [e["meta_info"]["finish_reason"] for e in events][:-1] == [None] * (len(events) - 1)
    batch = server.post("/generate", {"text": PROMPTS[:2], "sampling_params": GREEDY, "stream": True})
    indexes = {json.loads(line[5:])["index"] for line in batch.text.splitlines() if line.startswith("data: {")}
    assert indexes == {0, 1}


def test_relaxed_schema_reports_validation_and_streams_one_event(server):
    schema = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"], "not": {"const": "cow"}}},
              "required": ["kind"], "additionalProperties": False}  # llguidance refuses "not": relaxed
    body = {"text": "A pet as JSON:", "sampling_params": {"temperature": 0, "max_new_tokens": 20, "json_schema": schema}}
    meta = server.post("/generate", body).json()["meta_info"]
    assert meta["schema_relaxed"] == ["not"] and meta["schema_valid"] is True and meta["schema_attempts"] == 1
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=60) as r:
        events = sse_events(r)
    assert len(events) == 1 and events[0]["meta_info"]["schema_valid"] is True  # sent once validated


def test_logprob_entries(server):
    out = server.post("/generate", {
        "text": PROMPTS[0], "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True}).json()
    meta = out["meta_info"]
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == meta["prompt_tokens"] and inputs[0][0] is None
    assert all(isinstance(lp, float) and lp <= 0 and isinstance(text, str) for lp, _, text in inputs[1:])
    assert "".join(text for _, _, text in inputs) == PROMPTS[0]
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(len(top) == 2 and top[0][0] >= top[1][0] for top in meta["output_top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert [top[0][1] for top in meta["output_top_logprobs"]] == out["output_ids"]
    default = server.post("/generate", {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 1},
                                        "return_logprob": True}).json()["meta_info"]
    assert len(default["input_token_logprobs"]) == 1 and default["input_token_logprobs"][0][2] is None  # SGLang


SGLANG_CLIENT_BODY = {  # what sglang's RuntimeEndpoint.generate sends for a plain gen (0.5.23)
    "text": "Hi", "sampling_params": {
        "skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 2,
        "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [], "temperature": 1.0,
        "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "ignore_eos": False, "regex": None, "json_schema": None},
    "return_logprob": None, "logprob_start_len": [None], "top_logprobs_num": [None],
    "return_text_in_logprobs": [None],
}
BAD_REQUESTS = [
    (b"{not json", "not valid JSON"),
    ({"text": "x", "stream": "yes"}, "'stream'"),
    ({"text": "x", "sampling_params": {"temperature": "hot"}}, "'temperature'"),
    ({"text": "x", "image_data": "cat.png"}, "'image_data'"),
    ({"text": "x", "sampling_params": {"spaces_between_special_tokens": False}}, "'spaces_between_special_tokens'"),
    ({"text": "x", "sampling_params": {"max_new_tokens": -1}}, "'max_new_tokens'"),
    ({"text": "x", "sampling_params": {"max_new_tokens": 10**9}}, "context length"),
    ({"text": ""}, "empty"),
    ({"text": "hi " * 9000}, "at most"),
    ({"input_ids": [1, 10**7]}, "vocabulary"),
    ({"text": "x", "sampling_params": {"json_schema": "{not json"}}, "json_schema"),
    ({"text": "x", "sampling_params": {"regex": "(unclosed"}}, "regex"),
    ({"text": ["a", "b"], "rid": ["same", "same"]}, "'rid'"),
    ({"text": "x", "lora_path": "adapter-1"}, "LoRA"),
    ({"text": "x", "custom_logit_processor": "{\"callable\": 1}"}, "execute client code"),
    ({"text": "x", "sampling_params": {"stop_regex": "(unclosed"}}, "stop_regex"),
    ({"text": "x", "sampling_params": {"logit_bias": {"999999999": 5}}}, "logit_bias"),
    ({"text": "x", "extra_key": 7}, "'extra_key'"),
    ({"text": "x", "sampling_params": {"structural_tag": "{\"format\": {}}"}}, "structural_tag"),
    ({"text": "x", "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
    ({"sampling_params": {}}, "'text' or 'input_ids'"),
]


@pytest.mark.parametrize("body, needle", BAD_REQUESTS, ids=[n for _, n in BAD_REQUESTS])
def test_bad_input_is_a_400_naming_the_problem(server, body, needle):
    if isinstance(body, bytes):
        response = httpx.post(server.url + "/generate", content=body, timeout=30)
    else:
        response = server.post("/generate", body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_what_sglang_clients_send_by_default_is_accepted(server):
    response = server.post("/generate", SGLANG_CLIENT_BODY)
    assert response.status_code == 200, response.text
    assert response.json()["meta_info"]["completion_tokens"] <= 2


def test_info_health_and_metrics(server):
    info = server.get("/get_model_info").json()
    assert info["model_path"] == "smollm2-135m-instruct" and info["is_generation"] is True
    for path in ("/get_server_info", "/server_info"):
        assert "kv_slots_used" in server.get(path).json()["internal_states"][0]
    assert server.get("/health").status_code == 200
    assert server.get("/health_generate").status_code == 200
    metrics = server.get("/metrics").text
    for name in ("plait:requests_total", "plait:generation_tokens_total", "plait:time_to_first_token_seconds_bucket",
                 "plait:time_per_output_token_seconds_count", "plait:cache_hit_rate", "plait:num_queue_reqs",
                 "plait:kv_slots_used", "plait:e2e_request_latency_seconds_sum", "plait:new_token_ratio",
                 "plait:kv_sliding_slots_total", "plait:engine_overlapped_steps", "plait:engine_graph_steps",
                 "plait:engine_piecewise_graph_steps",
                 "plait:budget_searches", "plait:budget_search_seconds", "plait:budget_endings_learned"):
        assert name in metrics
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("plait:") and "{" not in line)
    assert float(values["plait:generation_tokens_total"]) > 0 and float(values["plait:engine_steps"]) > 0


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (stats := server.stats())["running"] + stats["waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def test_a_client_that_disconnects_aborts_its_request(server):
    long = {"text": "Tell me a story.", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json={**long, "stream": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    assert wait_idle(server)["running"] == 0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=long, timeout=1.0)
    stats = wait_idle(server)
    assert stats["running"] == 0 and stats["generated_tokens"] < 1500


def test_program_id_pins_until_end_program(server):
    if "program_id" not in server.get("/get_server_info").json()["plait_extensions"]:
        pytest.skip("this engine has no program-aware caching")
    body = {"text": "A program's shared prefix. " * 5, "sampling_params": {"max_new_tokens": 2},
            "program_id": "run-1"}
    assert server.post("/generate", body).status_code == 200
    assert server.stats()["pinned_tokens"] > 0
    assert server.post("/end_program", {"program_id": "run-1"}).json() == {"success": True}
    assert server.stats()["pinned_tokens"] == 0


def test_zz_no_slot_leaked(server):
    assert_idle_and_flushed(server)


def _http_exchange(sock, path: str) -> bytes:
    """One ``GET path`` on an open keep-alive socket; returns the status line ("" if the server closed it)."""
    import socket

    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return b""
            data += chunk
    except (ConnectionResetError, socket.timeout):
        return b""
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0]


def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry(server, idle_keep_alive):
    """A connection idle for 6 s (past httpx's and so openai's 5 s pool expiry, uvicorn's old default
    keep-alive) is still open: a server closing idle connections as early as clients keep them lets a
    client reuse one just as it closes, and under load about 1 request in 250 failed with a read error."""
    import socket
    from urllib.parse import urlsplit

    sock, used_at = idle_keep_alive
    if time.monotonic() - used_at > 60:  # a slow run: keep well inside the server's 75 s keep-alive timeout
        url = urlsplit(server.url)
        sock = socket.create_connection((url.hostname, url.port), timeout=10)
        assert _http_exchange(sock, "/health").startswith(b"HTTP/1.1 200")
        used_at = time.monotonic()
    time.sleep(max(0.0, used_at + 6.0 - time.monotonic()))
    assert time.monotonic() - used_at >= 6.0
    try:
        assert _http_exchange(sock, "/health").startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
