"""Tool-calling programs on the MockBackend: the agent loop, parallel calls, errors fed back, the step
limit, tool_choice, execute=False with pl.tool_results, declaration checks, tracing, forks, streaming."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import plait as pl
from plait.lang import MockBackend, RoleError, ToolCallError, ToolDeclarationError
from plait.lang.backends.base import GenerateCall, ToolRequest
from plait.lang.tool_format import HERMES
from plait.lang.tool_primitives import CallTools


@pl.tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    if city == "Atlantis":
        raise ValueError("no such city")
    return f"sunny in {city}"


@pl.tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def call_text(name: str, **arguments) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def checked(mock: MockBackend) -> list[GenerateCall]:
    """The tool-calling turns the mock served; each output it gave must be what the grammar allows:
    text without a call, or calls of offered tools whose arguments validate against their schema."""
    turns = [c for c in mock.calls_of("generate") if c.tools is not None]
    for turn in turns:
        assert turn.params.ebnf == HERMES.grammar([pl.Tool.from_openai(t) for t in turn.tools.tools],
                                                  turn.tools.choice, turn.tools.parallel)
    return turns


def validate_calls(text: str, tools: list[pl.Tool]) -> None:
    _, calls = HERMES.parse(text)
    schemas = {t.name: t.parameters for t in tools}
    for name, arguments in calls:
        jsonschema.validate(arguments, schemas[name])


@pl.function
def weather_agent(s, question, **options):
    s += pl.system("You are helpful.", tools=[get_weather, add])
    s += pl.user(question)
    s += pl.call_tools("answer", **{"max_tokens": 64, **options})


def scripted(*turns: str):
    """A mock output function that gives ``turns`` in order, one per tool-calling turn."""
    def output(call: GenerateCall) -> str:
        done = call.prompt.count("<|im_start|>assistant\n") - 1
        return turns[min(done, len(turns) - 1)]
    return output


def test_agent_loop_calls_runs_feeds_back_and_answers():
    mock = MockBackend(default=scripted("Let me look.\n" + call_text("get_weather", city="Paris"), "It is sunny."))
    state = weather_agent.run(question="Weather in Paris?", backend=mock)
    assert state["answer"] == "It is sunny."
    text = state.text()
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\nLet me look.\n" + call_text("get_weather", city="Paris") + "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny in Paris\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is sunny.<|im_end|>\n")
    assert text.startswith("<|im_start|>system\nYou are helpful.\n\n# Tools\n\n") and '"name": "add"' in text
    meta = state.get_meta_info("answer")
    [result] = meta["tool_results"]
    assert (result.call.name, result.call.arguments, result.content) == ("get_weather", {"city": "Paris"}, "sunny in Paris")
    assert meta["steps"] == 1 and meta["max_steps_reached"] is False and state.tool_calls("answer") == [result.call]
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2] == {"role": "assistant", "content": "Let me look.", "tool_calls": [result.call.openai_dict()]}
    assert messages[3] == {"role": "tool", "tool_call_id": result.call.id, "name": "get_weather", "content": "sunny in Paris"}
    assert [(c.kind, c.name) for c in state.calls] == [("call_tools", "answer")] * 2
    turns = checked(mock)
    assert [t.tools.choice for t in turns] == ["auto", "auto"] and turns[0].tools.parallel
    assert turns[0].params.max_new_tokens == 64 and "<|im_end|>" in turns[0].params.stop
    assert [t["function"]["name"] for t in turns[0].tools.tools] == ["get_weather", "add"]


def test_parallel_calls_run_and_their_results_come_back_together():
    both = call_text("add", a=2, b=3) + "\n" + call_text("get_weather", city="Oslo")
    mock = MockBackend(default=scripted(both, "Done."))
    state = weather_agent.run(question="q", backend=mock)
    validate_calls(both, [add, get_weather])
    assert [r.content for r in state.get_meta_info("answer")["tool_results"]] == ["5", "sunny in Oslo"]
    assert ("<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nsunny in Oslo\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\nDone.") in state.text()
    assert [m["role"] for m in state.messages()][-4:] == ["assistant", "tool", "tool", "assistant"]


def test_a_failing_tool_is_reported_to_the_model_not_raised():
    mock = MockBackend(default=scripted(call_text("get_weather", city="Atlantis"), "Sorry."))
    state = weather_agent.run(question="q", backend=mock)
    [result] = state.get_meta_info("answer")["tool_results"]
    assert result.error == "ValueError: no such city" and state["answer"] == "Sorry."
    assert "<tool_response>\nError: ValueError: no such city\n</tool_response>" in mock.calls_of("generate")[1].prompt


def test_the_step_limit_ends_with_an_answer_turn_without_tools():
    def output(call: GenerateCall) -> str:
        return "I give up." if call.tools.choice == "none" else call_text("add", a=1, b=1)

    mock = MockBackend(default=output)
    state = weather_agent.run(question="q", backend=mock, max_steps=2)
    turns = checked(mock)
    assert [t.tools.choice for t in turns] == ["auto", "auto", "none"]
    assert turns[-1].params.ebnf.startswith("start: TEXT\n")  # no call can be written in the last turn
    meta = state.get_meta_info("answer")
    assert state["answer"] == "I give up." and meta["steps"] == 2 and meta["max_steps_reached"]
    assert len(meta["tool_results"]) == 2


def test_tool_choice_applies_to_the_first_turn():
    mock = MockBackend(default=scripted(call_text("add", a=1, b=2), "3"))
    weather_agent.run(question="q", backend=mock, tool_choice="required")
    turns = checked(mock)
    assert [t.tools.choice for t in turns] == ["required", "auto"]
    assert turns[0].params.ebnf.startswith("start: call (")
    mock = MockBackend(default=scripted(call_text("add", a=1, b=2), "3"))
    weather_agent.run(question="q", backend=mock, tool_choice=add, parallel=False)
    first = checked(mock)[0]
    assert first.tools == ToolRequest(first.tools.tools, "add", False)
    assert "fn_0: \"add" in first.params.ebnf and "get_weather" not in first.params.ebnf.split("call_body")[1]


def test_execute_false_returns_the_calls_for_the_program_to_answer():
    @pl.function
    def manual(s):
        s += pl.system(tools=[add])
        s += pl.user("1+2?")
        s += pl.call_tools("turn", execute=False)
        calls = s.tool_calls("turn")
        s += pl.tool_results([(c, add(**c.arguments) * 10) for c in calls])
        s += pl.call_tools("answer")

    mock = MockBackend(default=scripted("Adding.\n" + call_text("add", a=1, b=2), "It is 30."))
    state = manual.run(backend=mock)
    [call] = state.tool_calls("turn")
    assert state["turn"] == "Adding." and call.arguments == {"a": 1, "b": 2}
    assert state.get_meta_info("turn")["tool_results"] == []
    assert "<tool_response>\n30\n</tool_response>" in state.text() and state["answer"] == "It is 30."
    assert state.text().startswith("<|im_start|>system\n# Tools\n")  # no system prompt: the tool list alone
    single = pl.tool_result(call, {"x": 1})
    assert single.results[0].content == '{"x": 1}' and single.results[0].value == {"x": 1}


def test_calls_need_declared_tools():
    @pl.function
    def undeclared(s):
        s += pl.user("hi")
        s += pl.call_tools("a", tools=[add])

    with pytest.raises(ToolDeclarationError, match="no tools were declared"):
        undeclared.run(backend=MockBackend())

    @pl.function
    def other(s):
        s += pl.system("x", tools=[get_weather])
        s += pl.call_tools("a", tools=[add])

    with pytest.raises(ToolDeclarationError, match="never declared"):
        other.run(backend=MockBackend())

    @pl.function
    def inside(s):
        s += pl.system("x", tools=[add])
        with s.assistant():
            s += pl.call_tools("a")

    with pytest.raises(RoleError, match="cannot go inside the open 'assistant' block"):
        inside.run(backend=MockBackend())


def test_a_call_cut_by_max_tokens_raises():
    mock = MockBackend(default=call_text("add", a=1, b=2))  # 7 mock tokens
    with pytest.raises(ToolCallError, match="raise max_tokens"):
        weather_agent.run(question="q", backend=mock, max_tokens=4)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"max_steps": 0}, ValueError, "from 1 to 64"),
    ({"max_steps": 65}, ValueError, "from 1 to 64"),
    ({"regex": "a"}, ValueError, "does not take"),
    ({"tool_choice": "none"}, ValueError, "use pl.gen"),
    ({"tool_choice": 3}, ValueError, "'auto', 'required' or a tool"),
    ({"execute": False, "max_steps": 2}, ValueError, "one turn is made"),
    ({"temperature": -1}, ValueError, "temperature"),
    ({"parallel": "yes"}, TypeError, "True or False"),
    ({"tools": []}, ToolDeclarationError, "offers no tools"),
    ({"tools": [add], "tool_choice": "get_weather"}, ToolDeclarationError, "not among"),
])
def test_call_tools_arguments_are_checked_when_written(kwargs, error, message):
    with pytest.raises(error, match=message):
        pl.call_tools("a", **kwargs)


def test_system_with_tools_takes_text_only():
    with pytest.raises(TypeError, match="content as a str"):
        pl.system(pl.gen("x"), tools=[add])
    with pytest.raises(ToolDeclarationError, match="declares no tools"):
        pl.system("x", tools=[])


def test_trace_shows_the_declaration_in_the_constant_prefix_and_the_tool_call():
    trace = weather_agent.trace(chat_template="chatml")
    listing = str(trace)
    assert "<system> declaring tools ['get_weather', 'add'] </system>" in listing
    assert "call_tools 'answer'(declared tools, tool_choice='auto', max_steps=8, max_new_tokens=64)" in listing
    assert trace.constant_prefix.startswith("<|im_start|>system\nYou are helpful.\n\n# Tools")
    assert trace.constant_prefix.endswith("<|im_start|>user\n")
    assert any(isinstance(c, CallTools) for c in trace.calls) and trace.stopped is None


def test_forks_keep_the_declared_tools_and_streaming_works():
    @pl.function
    def forked(s):
        s += pl.system("x", tools=[add])
        forks = s.fork(2)
        forks += lambda i: pl.user(f"q{i}")
        forks += pl.call_tools("answer")
        forks.join()

    mock = MockBackend(default=lambda call: "forty-two")
    state = forked.run(backend=mock)
    assert state["answer"] == ["forty-two", "forty-two"]
    mock = MockBackend(default=scripted(call_text("add", a=20, b=22), "42 it is"))
    state = weather_agent.run(question="q", backend=mock, stream=True)
    streamed = "".join(state.text_iter())
    assert streamed == state.text() and state["answer"] == "42 it is"
    assert re.search(r"<tool_response>\n42\n</tool_response>", streamed)
