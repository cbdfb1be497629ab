"""SGLang's ``/generate`` fields against a real ``plait serve``: what is honoured (stop_regex, logit_bias,
cache namespaces, rid expansion, prompt ids, streamed logprob counts, null meaning the default), what is
ignored and reported, and bounded error bodies; plus the smaller native routes. This server makes
streamed text on its engine thread (``--detokenizer engine``; the other servers of the tests use the
default detokenizer process)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.server.server_helpers import assert_idle_and_flushed, start_server

pytestmark = pytest.mark.model
COUNT = "Count with me: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    server = start_server("--detokenizer", "engine")
    yield server
    assert server.stop() == 0, server.output()


def generate(server, body: dict) -> dict:
    response = server.post("/generate", body)
    assert response.status_code == 200, response.text
    return response.json()


def greedy(n: int, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": n, "ignore_eos": True, **extra}


def test_streamed_text_made_on_the_engine_thread_matches_the_final_text(server):
    """With ``--detokenizer engine`` the engine thread makes a stream's text: it grows while streaming and
    ends as the engine's text of the same request, on the native and the OpenAI protocol, n > 1 too
    (tests/server/test_detokenizer_process.py checks the same of the detokenizer process)."""
    from itertools import chain

    body = {"text": COUNT, "sampling_params": greedy(20)}
    final = generate(server, body)
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [e["text"] for e in events]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1)) and texts[-1] == final["text"]
    assert len(set(texts[:-1])) > len(texts) // 2  # it grows while streaming, not only at the end
    assert list(chain.from_iterable(e["output_ids"] for e in events)) == final["output_ids"]
    model = server.get("/v1/models").json()["data"][0]["id"]
    chat = {"model": model, "messages": [{"role": "user", "content": COUNT}], "max_tokens": 16, "temperature": 0,
            "n": 2, "stream": True}
    plain = server.post("/v1/chat/completions", {**chat, "stream": False, "n": 1}).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=60) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
    for index in (0, 1):
        deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks
                  if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(deltas) == plain and sum(bool(d) for d in deltas) > 2


def test_stop_regex_is_honoured_streamed_or_not(server):
    full = generate(server, {"text": COUNT, "sampling_params": greedy(24)})["text"]
    match = re.search(r"1[5-9],", full)
    assert match is not None, full
    body = {"text": COUNT, "sampling_params": greedy(24, stop_regex=[r"1[5-9],"])}
    out = generate(server, body)
    assert out["text"] == full[: match.start()]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"1[5-9],"}
    events = [json.loads(line[5:]) for line in server.post("/generate", {**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    assert events[-1]["text"] == out["text"] and all(out["text"].startswith(e["text"]) for e in events)


def test_logit_bias_is_honoured(server):
    token = server.post("/tokenize", {"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    out = generate(server, {"text": COUNT, "sampling_params": greedy(3, logit_bias={str(token): 100})})
    assert out["output_ids"] == [token] * 3


def test_extra_key_and_cache_salt_separate_cached_prefixes(server):
    prompt = "A tenant's private system prompt with secret details inside. " * 4
    first = generate(server, {"text": prompt, "sampling_params": greedy(2), "extra_key": "tenant-a"})
    again = generate(server, {"text": prompt, "sampling_params": greedy(2), "extra_key": "tenant-a"})
    other = generate(server, {"text": prompt, "sampling_params": greedy(2), "extra_key": "tenant-b"})
    salted = generate(server, {"text": prompt, "sampling_params": greedy(2), "extra_key": "tenant-a",
                               "cache_salt": "s1"})
    default = generate(server, {"text": prompt, "sampling_params": greedy(2)})
    assert again["meta_info"]["cached_tokens"] > 10
    assert [o["meta_info"]["cached_tokens"] for o in (other, salted, default)] == [0, 0, 0]
    assert first["output_ids"] == other["output_ids"] == default["output_ids"]


def test_rid_of_a_batch_expands_and_prompt_ids_come_back(server):
    outs = generate(server, {"text": ["One", "Two"], "rid": "batch", "sampling_params": greedy(1),
                             "return_prompt_token_ids": True})
    assert [o["meta_info"]["id"] for o in outs] == ["batch_0", "batch_1"]
    ids = server.post("/tokenize", {"prompt": ["One", "Two"]}).json()["tokens"]
    assert [o["prompt_token_ids"] for o in outs] == ids


def test_session_id_keeps_the_session_prefix_pinned(server):
    body = {"text": "A session's shared prefix. " * 5, "sampling_params": greedy(2), "session_id": "chat-7"}
    generate(server, body)
    assert server.stats()["pinned_tokens"] > 0
    assert server.post("/end_program", {"program_id": "chat-7"}).json() == {"success": True}
    assert server.stats()["pinned_tokens"] == 0
    clash = server.post("/generate", {**body, "program_id": "other"})
    assert clash.status_code == 400 and "session_id" in clash.json()["error"]["message"]


def test_streamed_logprobs_carry_their_running_count(server):
    body = {"text": COUNT, "sampling_params": greedy(5), "return_logprob": True, "stream": True}
    events = [json.loads(line[5:]) for line in server.post("/generate", body).text.splitlines()
              if line.startswith("data: {")]
    seen = 0
    for event in events:
        meta = event["meta_info"]
        seen += len(meta["output_token_logprobs"])
        assert meta["output_token_logprobs_length"] == seen == meta["completion_tokens"]
    assert seen == 5


def test_null_means_the_default_and_operational_fields_are_accepted(server):
    body = {"text": COUNT, "stream": None, "rid": None, "return_logprob": None, "log_metrics": False,
            "priority": 3, "routed_dp_rank": 0, "bootstrap_host": None, "image_data": None,
            "sampling_params": {"max_new_tokens": 3, "temperature": 0, "top_p": None, "top_k": None,
                                "stop_regex": None, "logit_bias": None, "stream_interval": 4}}
    response = server.post("/generate", body)
    assert response.status_code == 200 and "x-plait-ignored-fields" not in response.headers
    plain = generate(server, {"text": COUNT, "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert response.json()["output_ids"] == plain["output_ids"]


def test_unknown_fields_are_ignored_and_reported(server):
    body = {"text": COUNT, "temprature": 0, "sampling_params": {"max_new_tokens": 2, "top_q": 1}}
    response = server.post("/generate", body)
    assert response.status_code == 200, response.text
    assert response.headers["x-plait-ignored-fields"] == "temprature, sampling_params.top_q"
    streamed = server.post("/generate", {**body, "stream": True})
    assert streamed.headers["x-plait-ignored-fields"] == "temprature, sampling_params.top_q"


def test_errors_do_not_echo_large_payloads(server):
    image = "A" * 1_000_000
    for body in ({"text": "x", "image_data": image}, {"text": "x", "stream": image},
                 {"text": "x", "sampling_params": {"stop": [image, ""]}}):
        response = server.post("/generate", body)
        assert response.status_code == 400 and len(response.content) < 4000, response.content[:200]


def test_tokenize_and_detokenize_routes(server):
    for prefix in ("", "/v1"):
        tok = server.post(prefix + "/tokenize", {"prompt": "Hello world"}).json()
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] > 0
        text = server.post(prefix + "/detokenize", {"tokens": tok["tokens"]}).json()["text"]
        assert text == "Hello world"
    chat = server.post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}],
                                     "return_token_strs": True}).json()
    assert "<|im_start|>" in chat["token_strs"] and chat["count"] == len(chat["tokens"])
    both = server.post("/detokenize", {"tokens": [[tok["tokens"][0]], tok["tokens"]]}).json()["text"]
    assert both == ["Hello", "Hello world"]
    assert server.post("/tokenize", {"prompt": 3}).status_code == 400
    assert server.post("/detokenize", {"tokens": [10**9]}).status_code == 400


def test_separate_reasoning_route(server):
    out = server.post("/separate_reasoning", {"text": "<think>Let me add.</think>It is 4.",
                                              "reasoning_parser": "qwen3", "return_blocks": True}).json()
    assert (out["reasoning_text"], out["text"]) == ("Let me add.", "It is 4.")
    assert out["blocks"] == [{"type": "reasoning", "text": "Let me add."}, {"type": "text", "text": "It is 4."}]
    bad = server.post("/separate_reasoning", {"text": "x", "reasoning_parser": "nope"})
    assert bad.status_code == 400 and "reasoning_parser" in bad.json()["error"]["message"]


def test_model_and_probe_routes(server):
    name = server.get("/v1/models").json()["data"][0]["id"]
    assert server.get(f"/v1/models/{name}").json()["id"] == name
    missing = server.get("/v1/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    info = server.get("/model_info").json()
    assert info["is_generation"] is True and info["has_image_understanding"] is False
    assert server.get("/ready").status_code == 200 and server.get("/ping").status_code == 200
    encode = server.post("/encode", {"text": "x"})
    assert encode.status_code == 404 and "generative" in encode.json()["error"]["message"]


def test_structural_tag_is_served_as_a_grammar(server):
    prompt = 'Call: <call=add>{"a": 1}</call>\nCall: <call=add>{"a": 2}</call>\nCall: <call=add>{"a": 3}</call>\nCall:'
    free = generate(server, {"text": prompt, "sampling_params": greedy(12)})["text"]
    assert free.startswith(' <call=add>{"a"'), free  # what the model writes unconstrained
    schema = {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"],
              "additionalProperties": False}
    tag = {"type": "structural_tag", "triggers": ["<call="],
           "structures": [{"begin": "<call=add>", "schema": schema, "end": "</call>"}]}
    out = generate(server, {"text": prompt, "sampling_params": greedy(20, structural_tag=json.dumps(tag))})["text"]
    body = re.match(r' <call=add>(.*?)</call>', out, re.DOTALL)
    assert body is not None, out  # after the trigger: the begin, a document of the schema, the end
    assert set(json.loads(body.group(1))) == {"b"}
    for bad in ("{}", '{"format": {"type": "any"}}', "not json"):
        response = server.post("/generate", {"text": "x", "sampling_params": {"structural_tag": bad}})
        assert response.status_code == 400 and "structural_tag" in response.json()["error"]["message"]


def test_zz_no_slot_leaked(server):
    assert_idle_and_flushed(server)


def test_batch_outputs_share_the_logprobs_of_their_shared_prompt_positions():
    from plait.runtime.server.native import align_shared_input_logprobs

    prompt = [5, 6, 7, 8, 9]  # SGLang's select: [s + choice for choice in choices], logprobs from position 3
    paris = {"input_token_logprobs": [[-2.43866539, 8, " France"], [-0.45095062, 9, " is"], [-0.258, 70, " Paris"]],
             "input_top_logprobs": [["a"], ["b"], ["c"]]}
    banana = {"input_token_logprobs": [[-2.43866062, 8, " France"], [-0.45094872, 9, " is"], [-5.5, 25, " a"],
                                       [-13.8, 26, " banana"]],
              "input_top_logprobs": [["x"], ["y"], ["z"], ["w"]]}
    other = {"input_token_logprobs": [(-1.0, 8, None), (-0.4, 10, None)]}  # diverges at position 4
    unrelated = {"input_token_logprobs": [[-3.0, 2, "q"]]}
    no_logprobs: dict = {}
    align_shared_input_logprobs([(prompt[:3] + [8, 9, 70], paris), (prompt[:3] + [8, 9, 25, 26], banana),
                                 (prompt[:3] + [8, 10], other), ([1, 2], unrelated), ([5, 6], no_logprobs)])
    assert banana["input_token_logprobs"][:2] == paris["input_token_logprobs"][:2]
    assert banana["input_token_logprobs"][2:] == [[-5.5, 25, " a"], [-13.8, 26, " banana"]]  # past the shared part
    assert banana["input_top_logprobs"] == [["a"], ["b"], ["z"], ["w"]]
    assert other["input_token_logprobs"] == [(-2.43866539, 8, None), (-0.4, 10, None)]  # tuples stay tuples
    assert unrelated["input_token_logprobs"] == [[-3.0, 2, "q"]] and no_logprobs == {}
