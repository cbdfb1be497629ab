"""OpenAI API for agents against a real ``plait serve``: tool calling, the Responses API, reasoning output and
an agent framework (the OpenAI Agents SDK), driven by the official ``openai`` client.

The bundled model is tiny, so tests force the flow where the model's own choice would make it
nondeterministic (``tool_choice='required'`` or a named function) and assert what must hold whatever it
writes: every call parses and matches its tool's schema, tool results are read back, loops end.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest

from tests.server.server_helpers import assert_idle_and_flushed, start_server

openai = pytest.importorskip("openai", reason="the openai package is in the test extra")
pytestmark = pytest.mark.model
MODEL = "smollm2-135m-instruct"
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Current time in a time zone", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}
SCHEMAS = {t["name"]: t["parameters"] for t in (WEATHER, TIME)}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    server = start_server("--reasoning-parser", "qwen3")
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_call(name: str, arguments: str) -> dict:
    """A returned call parses and matches its tool's schema."""
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, temperature=0, **{"messages": QUESTION, **kwargs})


def test_required_named_and_parallel_calls_match_their_schemas(client):
    single = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    choice = single.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    check_call(call.function.name, call.function.arguments)
    named = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                 parallel_tool_calls=False, max_tokens=60)
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and check_call("get_time", call.function.arguments)["zone"] in ("UTC", "CET")
    parallel = chat(client, tools=TOOLS, tool_choice="required", max_tokens=120)
    calls = parallel.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    complete = calls if parallel.choices[0].finish_reason == "tool_calls" else calls[:-1]  # a cut may end the last
    for c in complete:
        check_call(c.function.name, c.function.arguments)


def test_agent_loop_reads_tool_results_and_ends(client):
    messages = list(QUESTION)
    first = chat(client, messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    message = first.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        args = check_call(call.function.name, call.function.arguments)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": f"Sunny and 21 C in {args}"})
    final = chat(client, messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=40)
    answer = final.choices[0]
    for call in answer.message.tool_calls or []:  # auto: text or calls, either way well-formed
        check_call(call.function.name, call.function.arguments)
    assert answer.message.tool_calls or answer.message.content
    none = chat(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_have_openai_chunk_shapes(server, client):
    kwargs = {"tools": TOOLS, "tool_choice": "required", "max_tokens": 120}
    whole = chat(client, **kwargs).choices[0]
    chunks = list(chat(client, stream=True, **kwargs))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for tc in chunk.choices[0].delta.tool_calls or []:
            if tc.index not in calls:  # the first piece of a call: id, type, name, empty arguments
                assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"name": tc.function.name, "arguments": ""}
            else:  # then arguments only
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_legacy_functions(client):
    out = chat(client, functions=[WEATHER], function_call={"name": "get_weather"}, max_tokens=60)
    choice = out.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.function_call.name == "get_weather"
    check_call("get_weather", choice.message.function_call.arguments)


RESPONSE_TOOLS = [{"type": "function", "strict": True, **WEATHER}, {"type": "function", "strict": True, **TIME}]


def test_responses_function_round_trip(client):
    first = client.responses.create(model=MODEL, instructions="Use the tools.", input="Weather in Paris?",
                                    tools=RESPONSE_TOOLS, tool_choice="required", parallel_tool_calls=False,
                                    temperature=0, max_output_tokens=60)
    assert first.status == "completed"
    [call] = [item for item in first.output if item.type == "function_call"]
    check_call(call.name, call.arguments)
    follow = client.responses.create(model=MODEL, previous_response_id=first.id, tools=RESPONSE_TOOLS,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 21 C"}], temperature=0, max_output_tokens=30)
    assert follow.previous_response_id == first.id and follow.usage.input_tokens > first.usage.input_tokens
    assert follow.usage.input_tokens_details.cached_tokens > 0  # the stored conversation's prefix is cached
    assert follow.output_text or any(item.type == "function_call" for item in follow.output)
    assert client.responses.retrieve(follow.id).id == follow.id
    with pytest.raises(openai.NotFoundError, match="previous response"):
        client.responses.create(model=MODEL, previous_response_id="resp_unknown", input="hi")


def test_responses_streamed_events(client):
    kwargs = {"model": MODEL, "input": "Weather in Paris?", "tools": RESPONSE_TOOLS, "tool_choice": "required",
              "parallel_tool_calls": False, "temperature": 0, "max_output_tokens": 60}
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [call] = [item for item in final.output if item.type == "function_call"]
    assert deltas == call.arguments and check_call(call.name, call.arguments)
    text = client.responses.create(model=MODEL, input="Say hello.", stream=True, temperature=0, max_output_tokens=8)
    events = list(text)
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete" or events[-1].type == "response.completed"
    assert streamed == events[-1].response.output_text


def test_openai_agents_sdk_runs_a_two_tool_agent(server):
    agents = pytest.importorskip("agents", reason="openai-agents is in the test extra")
    agents.set_tracing_disabled(True)  # no traces sent anywhere
    ran: list[tuple[str, str]] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        ran.append(("get_weather", city))
        return f"Sunny in {city}"

    @agents.function_tool
    def get_time(zone: str) -> str:
        """Current time in a time zone."""
        ran.append(("get_time", zone))
        return f"12:00 in {zone}"

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    def agent(tool_choice: str) -> object:
        # after a tool round the SDK resets tool_choice to auto, so the model then ends the loop or calls again
        return agents.Agent(
            name="helper", instructions="Answer with the tools.", tools=[get_weather, get_time],
            model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
            model_settings=agents.ModelSettings(tool_choice=tool_choice, temperature=0, max_tokens=60,
                                                parallel_tool_calls=False))

    async def run_all() -> list:
        question = "What is the weather in Paris and the time in UTC?"
        return [await agents.Runner.run(agent(choice), question, max_turns=4)
                for choice in ("get_weather", "get_time", "required")]

    results = asyncio.run(run_all())
    assert [name for name, _ in ran[:1]] == ["get_weather"] and "get_time" in [name for name, _ in ran]
    for result in results:
        assert isinstance(result.final_output, str) and len(result.raw_responses) >= 2  # tool round, then the end


def test_reasoning_content_is_split_off(client):
    forced = {"regex": r"<think>It is in France\.</think>\n\nParis\."}
    out = chat(client, max_tokens=30, extra_body=forced)
    message = out.choices[0].message
    assert message.content == "Paris." and message.reasoning_content == "It is in France."
    chunks = list(chat(client, max_tokens=30, stream=True, extra_body=forced))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == ("It is in France.", "Paris.")
    plain = chat(client, max_tokens=5, extra_body={"separate_reasoning": False, **forced})
    assert plain.choices[0].message.content.startswith("<think>")


def test_chat_template_options_usage_stats_and_unknown_fields(bundled_model_dir, server, client):
    from plait.runtime.tokenizer import Tokenizer

    start = "The weather in Paris is"
    prefix = [*QUESTION, {"role": "assistant", "content": start}]
    continued = chat(client, messages=prefix, max_tokens=5,
                     extra_body={"continue_final_message": True, "add_generation_prompt": False})
    rendered = httpx.post(server.url + "/apply_chat_template", json={"messages": QUESTION, "add_generation_prompt": True})
    expected = Tokenizer.from_dir(bundled_model_dir).encode(rendered.json()["text"] + start, add_special_tokens=False)
    assert continued.usage.prompt_tokens == len(expected)  # the assistant turn is left open and continued
    chunks = list(chat(client, max_tokens=4, stream=True, stream_options={"include_usage": True,
                                                                          "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks) and chunks[-1].usage.completion_tokens == 4
    raw = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": QUESTION, "max_tokens": 2, "frobnicate": 1, "prompt_cache_key": "tenant-a",
        "safety_identifier": "u1", "store": False, "metadata": {"a": "b"}, "service_tier": "auto", "verbosity": "low",
        "chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "low"})
    assert raw.status_code == 200 and raw.headers["x-plait-ignored-fields"] == "frobnicate"
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="def f(", suffix="return 1", max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="generative"):
        client.embeddings.create(model=MODEL, input="hello")


def test_zz_no_slot_leaked(server):
    assert_idle_and_flushed(server)
