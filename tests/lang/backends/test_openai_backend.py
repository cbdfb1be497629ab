"""The OpenAI backend with the official client against an httpx.MockTransport that checks request bodies."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from plait.lang.backends.base import Backend, BackendCapabilityError, GenerateCall
from plait.lang.backends.openai import OpenAI
from plait.lang.backends.openai_chat import CHAT_MARKUP, parse_chat_prompt
from plait.sampling import SamplingParams

USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
         "prompt_tokens_details": {"cached_tokens": 8}}


def chat(*blocks: tuple[str, str], open_assistant: bool = True) -> str:
    """A prompt rendered with the backend's chat template, as the language renders it."""
    roles = CHAT_MARKUP.role_prefix_and_suffix
    text = "".join(roles[role][0] + content + roles[role][1] for role, content in blocks)
    return text + (roles["assistant"][0] if open_assistant else "")


def completion_body(text="Paris.", reason="stop", logprobs=None, choices=None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": choices or [{"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}],
            "usage": USAGE}


def chat_body(content="Hello!", reason="stop", logprobs=None) -> dict:
    return {"id": "chat-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": reason, "logprobs": logprobs,
                         "message": {"role": "assistant", "content": content}}],
            "usage": USAGE}


class ClosableStream(httpx.SyncByteStream):
    def __init__(self, chunks: list[bytes]):
        self.chunks, self.closed = chunks, False

    def __iter__(self):
        yield from self.chunks

    def close(self) -> None:
        self.closed = True


def sse(events: list[dict]) -> ClosableStream:
    return ClosableStream([f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"])


class Server:
    """Answers each path with the next scripted (status, body) and records every request body."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.script: dict[str, list] = {}

    def reply(self, path: str, body, status: int = 200) -> None:
        self.script.setdefault(path, []).append((status, body))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/v1")
        self.requests.append((path, json.loads(request.content)))
        status, body = self.script[path].pop(0)
        if isinstance(body, ClosableStream):
            return httpx.Response(status, stream=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(status, json=body)

    def last(self, path: str) -> dict:
        return [body for p, body in self.requests if p == path][-1]


@pytest.fixture
def server() -> Server:
    return Server()


def backend(server: Server, **kwargs) -> OpenAI:
    client = openai.OpenAI(api_key="test-key", base_url="http://api.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(server)))
    return OpenAI("test-model", client=client, **kwargs)


def test_plain_prompt_uses_completions_with_every_sampling_option(server):
    lp = {"tokens": [" Paris", ".", "\n"], "token_logprobs": [-0.1, -0.5, -1.0], "text_offset": [10, 16, 17],
          "top_logprobs": [{" Paris": -0.1, " Lyon": -3.0}, {".": -0.5, ",": -1.5}, {"\n": -1.0, " ": -2.0}]}
    server.reply("/completions", completion_body(" Paris.\n", "length", lp))
    params = SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, stop=["END"], seed=5,
                            frequency_penalty=0.5, presence_penalty=-0.5)
    result = backend(server).generate(GenerateCall("Capital of France:", params, return_logprob=True,
                                                   top_logprobs_num=2))
    body = server.last("/completions")
    assert body == {"model": "test-model", "prompt": "Capital of France:", "max_tokens": 3, "temperature": 0.7,
                    "top_p": 0.9, "stop": ["END"], "seed": 5, "frequency_penalty": 0.5, "presence_penalty": -0.5,
                    "logprobs": 2}
    assert result.text == " Paris.\n" and result.finished
    assert result.finish_reason == {"type": "length", "length": 3}
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (11, 3, 8)
    assert result.output_token_logprobs == [(-0.1, -1, " Paris"), (-0.5, -1, "."), (-1.0, -1, "\n")]
    assert result.output_top_logprobs[0] == [(-0.1, -1, " Paris"), (-3.0, -1, " Lyon")]
    assert result.meta["endpoint"] == "completions"


def test_chat_prompt_is_parsed_into_messages(server):
    server.reply("/chat/completions", chat_body("Hi there.", logprobs={"content": [
        {"token": "Hi", "logprob": -0.2, "bytes": None, "top_logprobs": [{"token": "Hi", "logprob": -0.2, "bytes": None}]},
    ]}))
    prompt = chat(("system", "Be brief."), ("user", "Say hi."))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop=["<|im_end|>", "\n\n"])
    result = backend(server).generate(GenerateCall(prompt, params, return_logprob=True, top_logprobs_num=1))
    body = server.last("/chat/completions")
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    assert body["stop"] == ["\n\n"]  # the template's end-of-turn marker is the API's business
    assert body["logprobs"] is True and body["top_logprobs"] == 1
    assert body["max_tokens"] == 8 and body["temperature"] == 0.0
    assert result.text == "Hi there." and result.finish_reason == {"type": "stop", "matched": None}
    assert result.output_token_logprobs == [(-0.2, -1, "Hi")]
    assert result.meta["endpoint"] == "chat"


def test_json_schema_goes_through_response_format(server):
    server.reply("/chat/completions", chat_body('{"name": "Ada"}'))
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    result = backend(server).generate(GenerateCall(chat(("user", "Who?")), SamplingParams(json_schema=schema)))
    assert server.last("/chat/completions")["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert json.loads(result.text) == {"name": "Ada"}


def test_options_outside_the_api_are_refused_or_sent_as_extra_fields(server):
    plain = backend(server)
    for params in (SamplingParams(top_k=5), SamplingParams(regex=r"\d+"), SamplingParams(ignore_eos=True)):
        with pytest.raises(BackendCapabilityError, match="extra_sampling=True"):
            plain.generate(GenerateCall("x", params))
    with pytest.raises(BackendCapabilityError, match="json_schema"):  # completions have no response_format
        plain.generate(GenerateCall("x", SamplingParams(json_schema={"type": "object"})))
    assert server.requests == []  # nothing was sent
    server.reply("/completions", completion_body("42"))
    backend(server, extra_sampling=True).generate(
        GenerateCall("n=", SamplingParams(top_k=5, min_new_tokens=1, regex=r"\d+", stop_token_ids=[7])))
    body = server.last("/completions")
    assert (body["top_k"], body["min_tokens"], body["regex"], body["stop_token_ids"]) == (5, 1, r"\d+", [7])
    with pytest.raises(ValueError, match="n=2"):
        plain.generate(GenerateCall("x", SamplingParams(n=2)))


def test_stop_regex_needs_extra_fields_and_logit_bias_is_the_apis_own(server):
    with pytest.raises(BackendCapabilityError, match="stop_regex"):
        backend(server).generate(GenerateCall("x", SamplingParams(stop_regex=r"\d+")))
    server.reply("/completions", completion_body("42"))
    backend(server).generate(GenerateCall("n=", SamplingParams(logit_bias={"42": -100, 7: 5})))
    assert server.last("/completions")["logit_bias"] == {"7": 5.0, "42": -100.0}
    server.reply("/completions", completion_body("42"))
    backend(server, extra_sampling=True).generate(GenerateCall("n=", SamplingParams(stop_regex=[r"\d+"])))
    assert server.last("/completions")["stop_regex"] == [r"\d+"]


def test_chat_prompts_a_chat_api_cannot_take(server):
    be = backend(server)
    cases = [
        (chat(("user", "Hi")) + "Sure, ", "partly written assistant"),
        (chat(("user", "Hi"), open_assistant=False) + CHAT_MARKUP.role_prefix_and_suffix["user"][0], "user block"),
        ("Preamble. " + chat(("user", "Hi")), "outside any role block"),
    ]
    for prompt, message in cases:
        with pytest.raises(BackendCapabilityError, match=message):
            be.generate(GenerateCall(prompt, SamplingParams()))
    with pytest.raises(BackendCapabilityError, match="needs role blocks"):
        backend(server, api="chat").generate(GenerateCall("plain text", SamplingParams()))
    assert server.requests == []


def test_parse_chat_prompt_round_trip():
    parsed = parse_chat_prompt(chat(("user", "a\nb"), ("assistant", "c"), ("user", "<b>d</b>")))
    assert parsed.messages == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
                               {"role": "user", "content": "<b>d</b>"}]
    assert parsed.open_role == "assistant" and parsed.open_text == ""


def test_stream_chat_yields_cumulative_snapshots(server):
    def chunk(content=None, reason=None):
        return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": reason}]}

    usage_chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                   "usage": USAGE}
    server.reply("/chat/completions", sse([chunk("Hel"), chunk("lo"), chunk(" you", "length"), usage_chunk]))
    snaps = list(backend(server).stream(GenerateCall(chat(("user", "Hi")), SamplingParams(max_new_tokens=3))))
    assert [s.text for s in snaps] == ["Hel", "Hello", "Hello you"]
    assert [s.finished for s in snaps] == [False, False, True]
    assert snaps[-1].finish_reason == {"type": "length", "length": 3} and snaps[-1].prompt_tokens == 11
    body = server.last("/chat/completions")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_closing_a_stream_early_closes_the_http_response(server):
    def chunk(text):
        return {"id": "c", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}

    body = sse([chunk("one"), chunk(" two"), chunk(" three")])
    server.reply("/completions", body)
    stream = backend(server).stream(GenerateCall("Count:", SamplingParams()))
    assert next(stream).text == "one"
    stream.close()
    assert body.closed  # the server sees the connection go away and stops generating


def echo_choice(index: int, tokens: list[str], logprobs: list, prefix_len: int = 0) -> dict:
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {"index": index, "text": "".join(tokens), "finish_reason": "length",
            "logprobs": {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
                         "top_logprobs": [None] + [{t: lp} for t, lp in zip(tokens[1:], logprobs[1:])]}}


def test_select_scores_choices_with_echoed_prompt_logprobs(server):
    # "The answer is " + "yes" tokenizes as "The| answer| is| yes": the space merges into the choice
    server.reply("/completions", completion_body(choices=[
        echo_choice(1, ["The", " answer", " is", " no", " way"], [None, -2.0, -0.5, -1.5, -4.0]),
        echo_choice(0, ["The", " answer", " is", " yes"], [None, -2.0, -0.5, -0.3]),
    ]))
    server.reply("/completions", completion_body(choices=[
        echo_choice(0, [" yes"], [None]), echo_choice(1, [" no", " way"], [None, -6.0]),
    ]))
    scores = backend(server).score_choices("The answer is ", ["yes", "no way"], unconditional=True)
    first, second = [body for path, body in server.requests]
    assert first["prompt"] == ["The answer is yes", "The answer is no way"]
    assert (first["echo"], first["logprobs"], first["max_tokens"]) == (True, 1, 0)
    assert second["prompt"] == [" yes", " no way"]  # the choice tokens alone, boundary space included
    assert [s.token_logprobs for s in scores] == [[-0.3], [-1.5, -4.0]]
    assert [s.unconditional_token_logprobs for s in scores] == [[0.0], [0.0, -6.0]]


def test_select_without_prompt_logprobs_is_a_capability_error(server):
    with pytest.raises(BackendCapabilityError, match="Runtime/Endpoint"):
        backend(server).score_choices(chat(("user", "Pick")), ["a", "b"])
    server.reply("/completions", {"error": {"message": "echo is not supported", "type": "invalid_request_error"}},
                 status=400)
    with pytest.raises(BackendCapabilityError, match="echo is not supported"):
        backend(server).score_choices("Pick:", [" a", " b"])


def test_protocol_and_no_op_hooks(server):
    be = backend(server)
    assert isinstance(be, Backend) and be.name == "openai test-model"
    assert be.chat_template() is CHAT_MARKUP
    be.cache_prefix("x", "p")
    be.begin_program("p")
    be.end_program("p")
    assert server.requests == []
    with pytest.raises(ValueError, match="api must be"):
        OpenAI("m", api="bogus", client=object())
    assert OpenAI("gpt-3.5-turbo-instruct", client=object()).api == "completions"
