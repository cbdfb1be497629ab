"""call_tools on the OpenAI backend: the chat API's tools fields, tool_calls read back (whole and
streamed), and the next request carrying the assistant tool_calls and role "tool" results with their ids.
The official client runs against an httpx.MockTransport (tests/lang/backends/test_openai_backend.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")

import plait as pl
from plait.lang import BackendCapabilityError
from plait.lang.backends.base import GenerateCall, ToolRequest
from plait.lang.backends.openai_chat import CHAT_MARKUP, parse_chat_prompt, render_api_calls
from plait.sampling import SamplingParams
from tests.lang.backends.test_openai_backend import USAGE, Server, backend, chat, sse


@pl.tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    if city == "Atlantis":
        raise LookupError("no such city")
    return f"sunny in {city}"


@pl.tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def tool_reply(*calls: tuple[str, str, str], content: str | None = None) -> dict:
    return {"id": "chat-1", "object": "chat.completion", "created": 1, "model": "m", "usage": USAGE, "choices": [{
        "index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": content, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in calls]}}]}


def answer(text: str) -> dict:
    return {"id": "chat-2", "object": "chat.completion", "created": 1, "model": "m", "usage": USAGE, "choices": [{
        "index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": text}}]}


@pl.function
def agent(s, **options):
    s += pl.system("Be brief.", tools=[get_weather, add])
    s += pl.user("Weather in Paris and Atlantis, and 2+3?")
    s += pl.call_tools("answer", max_tokens=32, **options)


@pytest.fixture
def server() -> Server:
    return Server()


def test_agent_loop_through_the_tools_api(server):
    server.reply("/chat/completions", tool_reply(("call_a", "get_weather", '{"city": "Paris"}'),
                                                 ("call_b", "get_weather", '{"city": "Atlantis"}'),
                                                 ("call_c", "add", '{"a": 2, "b": 3}'), content="Checking."))
    server.reply("/chat/completions", answer("Sunny in Paris; 5."))
    state = agent.run(backend=backend(server))
    assert state["answer"] == "Sunny in Paris; 5."
    results = state.get_meta_info("answer")["tool_results"]
    assert [(r.call.id, r.content) for r in results] == [
        ("call_a", "sunny in Paris"), ("call_b", "Error: LookupError: no such city"), ("call_c", "5")]
    first, second = [body for path, body in server.requests if path == "/chat/completions"]
    assert first["tools"] == [get_weather.chat_dict(), add.chat_dict()]
    assert first["tool_choice"] == "auto" and first["parallel_tool_calls"] is True
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Weather in Paris and Atlantis, and 2+3?"}]
    assert "extra_body" not in first and "response_format" not in first  # no grammar: the API constrains calls
    assert second["messages"][2:] == [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Atlantis"}'}},
            {"id": "call_c", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny in Paris"},
        {"role": "tool", "tool_call_id": "call_b", "content": "Error: LookupError: no such city"},
        {"role": "tool", "tool_call_id": "call_c", "content": "5"}]
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "tool", "tool", "tool", "assistant"]
    assert state.messages()[2]["content"] == "Checking."


def test_tool_choice_step_limit_and_invalid_arguments(server):
    server.reply("/chat/completions", tool_reply(("c1", "add", '{"a": 1')))  # arguments the API did not finish
    server.reply("/chat/completions", answer("Could not add."))
    state = agent.run(backend=backend(server), tool_choice=add, parallel=False, max_steps=1)
    first, last = [body for path, body in server.requests if path == "/chat/completions"]
    assert first["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert first["parallel_tool_calls"] is False
    assert last["tool_choice"] == "none" and "parallel_tool_calls" not in last  # the step limit: answer now
    [result] = state.get_meta_info("answer")["tool_results"]
    assert result.error.startswith("TypeError: the arguments must be a JSON object")
    assert state.get_meta_info("answer")["max_steps_reached"] and state["answer"] == "Could not add."


def test_streamed_tool_calls_are_assembled(server):
    def chunk(delta: dict, reason=None) -> dict:
        return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    server.reply("/chat/completions", sse([
        chunk({"role": "assistant", "content": "On it."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_x", "type": "function",
                               "function": {"name": "add", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 4, '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"b": 5}'}}]}, "tool_calls")]))
    server.reply("/chat/completions", sse([chunk({"content": "Nine."}, "stop")]))
    state = agent.run(backend=backend(server), stream=True)
    assert "".join(state.text_iter("answer")) == "Nine."
    [result] = state.get_meta_info("answer")["tool_results"]
    assert (result.call.id, result.call.arguments, result.content) == ("call_x", {"a": 4, "b": 5}, "9")
    assert server.last("/chat/completions")["messages"][3] == {"role": "tool", "tool_call_id": "call_x", "content": "9"}


def test_tools_need_the_chat_api(server):
    call = GenerateCall("plain prompt", SamplingParams(), tools=ToolRequest((add.chat_dict(),)))
    with pytest.raises(BackendCapabilityError, match="chat completions API"):
        backend(server).generate(call)


def test_markup_round_trip():
    text = render_api_calls("Let me see.", [{"id": "c1", "name": "add", "arguments": '{"a": 1}'}])
    roles = CHAT_MARKUP.role_prefix_and_suffix
    prompt = (chat(("user", "Hi")) + text + roles["assistant"][1] + "<|im_start|>tool c1\n1<|im_end|>\n"
              + roles["assistant"][0])
    parsed = parse_chat_prompt(prompt)
    assert parsed.messages[1:] == [
        {"role": "assistant", "content": "Let me see.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}]
    plain = parse_chat_prompt(chat(("assistant", '<tool_call>\n{"name": "x"}\n</tool_call>'), open_assistant=False))
    assert plain.messages == [{"role": "assistant", "content": '<tool_call>\n{"name": "x"}\n</tool_call>'}]
    assert json.loads(text.split("\n")[2]) == {"id": "c1", "name": "add", "arguments": '{"a": 1}'}
