"""The examples: every program traces (no model); the agent's tool and control flow on a mock; and every
example runs on the bundled model and prints the structure it promises (one shared Runtime).

Example modules are loaded with ``runpy.run_path`` (their ``if __name__ == "__main__"`` block, which
loads a model of its own, does not run); their ``main(backend)`` is called with the shared Runtime.
"""

from __future__ import annotations

import ast
import json
import re
import runpy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import plait as pl
from plait.lang import MockBackend, Program
from plait.lang.ir import Gen, Select
from plait.lang.tool_primitives import CallTools
from plait.lang.tracer import ForkNode, JoinNode, StopNode

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_NAMES = ["quickstart", "few_shot_batch", "skeleton_of_thought", "react_agent", "json_extraction", "tool_agent"]


@pytest.fixture(scope="module")
def examples() -> dict[str, dict[str, Any]]:
    """Each example's module namespace (programs, constants, ``main``), loaded without running main."""
    return {name: runpy.run_path(str(EXAMPLES_DIR / f"{name}.py")) for name in EXAMPLE_NAMES}


@pytest.fixture(autouse=True)
def _restore_default_backend():
    """Examples set the default backend; leave the process as it was."""
    before = pl.get_default_backend()
    yield
    pl.set_default_backend(before)


def programs_of(namespace: dict[str, Any]) -> dict[str, Program]:
    return {name: value for name, value in namespace.items() if isinstance(value, Program)}


def gens(nodes: list[Any]) -> list[Gen]:
    return [n for n in nodes if isinstance(n, Gen)]


# ---------------------------------------------------------------------------------------------- traces
def test_every_example_has_main_and_programs_that_trace(examples):
    pl.set_default_backend(None)
    for name, ns in examples.items():
        assert callable(ns.get("main")), f"{name} has no main(backend)"
        programs = programs_of(ns)
        assert programs, f"{name} defines no module-level @pl.function program"
        for program in programs.values():
            trace = program.trace(chat_template="chatml")
            assert trace.calls, f"{name}.{program.name}: the trace found no gen/select"
            assert f"trace of {program.name}(" in str(trace)


def test_quickstart_traces(examples):
    ns = examples["quickstart"]
    chat = ns["multi_turn_chat"].trace(chat_template="chatml")
    assert [c.name for c in chat.calls] == ["answer_1", "answer_2"] and chat.stopped is None
    assert chat.constant_prefix.startswith("<|im_start|>system\nYou are a helpful assistant.")
    (select,) = ns["sentiment"].trace().calls
    assert isinstance(select, Select) and select.choices == ("positive", "negative")
    (date,) = ns["moon_landing_date"].trace().calls
    assert re.fullmatch(dict(date.overrides)["regex"], "1969-07-20")
    (info,) = ns["city_info"].trace().calls
    assert json.loads(dict(info.overrides)["json_schema"]) == ns["CITY_SCHEMA"]


def test_few_shot_prefix_holds_every_shot(examples):
    ns = examples["few_shot_batch"]
    program, shots = ns["few_shot_qa"], ns["SHOTS"]
    trace = program.trace(chat_template="default")
    for question, answer in shots:
        assert f"Q: {question}\nA: {answer}\n\n" in trace.constant_prefix
    items = [{"question": q} for q in ns["QUESTIONS"]]
    assert program.batch_prefix(items, chat_template="default") == trace.constant_prefix
    assert [c.name for c in trace.calls] == ["answer"]


def test_skeleton_of_thought_traces_through_fork_and_join(examples):
    ns = examples["skeleton_of_thought"]
    trace = ns["skeleton_of_thought"].trace(chat_template="chatml")
    assert trace.stopped is None  # the points reach the branches by string building only
    (fork,) = [n for n in trace.nodes if isinstance(n, ForkNode)]
    assert len(fork.branches) == ns["NUM_POINTS"]
    assert all([g.name for g in gens(list(b))] == ["expansion"] for b in fork.branches)
    assert JoinNode("gather_variable") in trace.nodes
    names = [c.name for c in trace.calls]
    assert names == ["point_1", "point_2", "point_3", "expansion", "expansion", "expansion", "summary"]


def test_react_agent_trace_stops_at_the_first_decision(examples):
    trace = examples["react_agent"]["react_agent"].trace()
    assert [type(c).__name__ + ":" + c.name for c in trace.calls] == ["Gen:thought_0", "Select:action_0"]
    assert isinstance(trace.nodes[-1], StopNode) and "'action_0'" in trace.stopped


def test_json_extraction_trace_carries_the_pydantic_schema(examples):
    ns = examples["json_extraction"]
    (call,) = ns["extract_person"].trace().calls
    schema = json.loads(dict(call.overrides)["json_schema"])
    assert schema == ns["Person"].model_json_schema() and schema["additionalProperties"] is False


# ---------------------------------------------------------------------------------------------- the agent
def test_calculator_evaluates_arithmetic_and_refuses_anything_else(examples):
    ns = examples["react_agent"]
    calculate, calculator_error = ns["calculate"], ns["CalculatorError"]
    assert calculate("12 * 7 + 5") == 89
    assert calculate("-(3 - 10) / 2") == 3.5
    for bad in ["__import__('os').system('true')", "2 ** 100000", "x + 1", "[1, 2]", "1 +", "'a' * 3", "True + 1"]:
        with pytest.raises(calculator_error):
            calculate(bad)
    with pytest.raises(ZeroDivisionError):
        calculate("1 / 0")
    assert ns["observe"]("1 / 0").startswith("error: ")
    assert ns["observe"]("6 * 7\n") == "42"


def test_every_expression_the_regex_allows_is_calculable(examples):
    ns = examples["react_agent"]
    calculate = ns["calculate"]

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(ns["EXPRESSION_REGEX"], fullmatch=True))
    def check(expression: str) -> None:
        try:
            value = calculate(expression)
        except ZeroDivisionError:
            return
        assert isinstance(value, (int, float))

    check()


def test_react_agent_control_flow_on_a_mock(examples):
    """Calculator first, finish once an observation exists; the observation is the calculator's."""
    ns = examples["react_agent"]

    def output(call) -> str:
        if call.params.regex == ns["EXPRESSION_REGEX"]:
            return "6 * 7\n"
        if call.params.regex == ns["NUMBER_REGEX"]:
            return "42\n"
        return " I will use the calculator."

    def choice_logprobs(prefix: str, choice: str) -> list[float]:
        observed = "Observation:" in prefix.rsplit("Question:", 1)[1]
        return [-0.1] if (choice == "finish") == observed else [-3.0]

    mock = MockBackend(default=output, choice_logprobs=choice_logprobs, chat_template="default")
    state = ns["react_agent"].run(question="What is 6 times 7?", backend=mock)
    assert state["action_0"] == "calculator" and state["input_0"] == "6 * 7\n"
    assert "Action Input: 6 * 7\nObservation: 42\nThought:" in state.text()
    assert state["action_1"] == "finish" and state["answer"] == "42\n" and "action_2" not in state


def test_tool_agent_declares_its_tools_in_the_constant_prefix(examples):
    ns = examples["tool_agent"]
    trace = ns["weather_agent"].trace(chat_template="chatml")
    assert trace.stopped is None
    [call] = trace.calls
    assert isinstance(call, CallTools) and call.choice == "required" and not call.parallel
    for tool in (ns["get_weather"], ns["compare"]):
        assert json.dumps(tool.chat_dict()) in trace.constant_prefix  # prefilled once by run_batch


def test_tool_agent_tools(examples):
    ns = examples["tool_agent"]
    assert ns["get_weather"]("Oslo") == {"city": "Oslo", "temperature": 3.0, "unit": "celsius", "sky": "snow"}
    assert ns["get_weather"]("paris", "fahrenheit")["temperature"] == 64.4
    with pytest.raises(ValueError, match="no weather data for 'Rome'"):
        ns["get_weather"]("Rome")
    assert ns["compare"](24.5, 3.0) == "a is larger"
    props = ns["get_weather"].parameters["properties"]
    assert props["unit"] == {"enum": ["celsius", "fahrenheit"], "description": "The temperature unit.",
                             "default": "celsius"}


def test_tool_agent_loop_on_a_mock(examples, capsys):
    """Look up both cities (one of them unknown: the error is fed back), compare, answer."""
    ns = examples["tool_agent"]
    script = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Atlantis"}}\n</tool_call>',
        '<tool_call>\n{"name": "compare", "arguments": {"a": 24.5, "b": 3.0}}\n</tool_call>',
        "Tokyo is warmer.",
    ]

    def output(call) -> str:
        return script[call.prompt.count("<|im_start|>assistant\n") - 1]

    state = ns["weather_agent"].run(question="Is it warmer in Tokyo or in Oslo?", backend=MockBackend(default=output))
    results = state.get_meta_info("answer")["tool_results"]
    assert [r.call.name for r in results] == ["get_weather", "get_weather", "compare"]
    assert results[1].content.startswith("Error: ValueError: no weather data for 'Atlantis'")
    assert results[2].content == "a is larger" and state["answer"] == "Tokyo is warmer."


# ---------------------------------------------------------------------------------------------- on the model
@pytest.fixture(scope="module")
def runtime(bundled_model_dir):
    with pl.Runtime() as backend:
        yield backend


def run_main(examples, name: str, runtime, capsys) -> str:
    examples[name]["main"](runtime)
    return capsys.readouterr().out


@pytest.mark.model
def test_quickstart_runs(examples, runtime, capsys):
    out = run_main(examples, "quickstart", runtime, capsys)
    roles = re.findall(r"^\s*(system|user|assistant): (.*)$", out, re.MULTILINE)
    assert [r for r, _ in roles] == ["system", "user", "assistant", "user", "assistant"]
    assert "Paris" in roles[2][1]  # greedy, bundled model: the answer it gives
    cached = json.loads(re.search(r"cached prompt tokens per call: (\[.*\])", out).group(1))
    assert cached[0] == 0 and cached[1] > 20  # the second turn reuses the first turn's prompt and answer
    assert re.findall(r"-> (\w+)", out) and set(re.findall(r"-> (\w+)", out)) <= {"positive", "negative"}
    date = re.search(r"Apollo 11 landed on (\S+)", out).group(1)
    assert re.fullmatch(examples["quickstart"]["moon_landing_date"].trace().calls[0].overrides_dict()["regex"], date)
    document = json.loads(re.search(r"^JSON: (.*)$", out, re.MULTILINE).group(1))
    jsonschema.validate(document, examples["quickstart"]["CITY_SCHEMA"])


@pytest.mark.model
def test_few_shot_batch_runs_with_the_prefix_cached(examples, runtime, capsys):
    ns = examples["few_shot_batch"]
    out = run_main(examples, "few_shot_batch", runtime, capsys)
    prefix = ns["few_shot_qa"].batch_prefix([{"question": q} for q in ns["QUESTIONS"]])
    prefix_tokens = len(runtime.engine.tokenizer.encode(prefix))
    rows = re.findall(r"^Q: (.*)\nA: (.*)\s+\[(\d+) of (\d+) prompt tokens cached\]$", out, re.MULTILINE)
    assert [q for q, *_ in rows] == ns["QUESTIONS"]
    for _, answer, cached, prompt in rows:
        assert "\n" not in answer
        # the prefix ends in "Q: ", whose last token merges with the question's first word
        assert prefix_tokens - 1 <= int(cached) < int(prompt)


@pytest.mark.model
def test_skeleton_of_thought_runs(examples, runtime, capsys):
    out = run_main(examples, "skeleton_of_thought", runtime, capsys)
    skeleton = out.split("Skeleton:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line[:3] for line in skeleton] == ["1. ", "2. ", "3. "]
    assert all(len(line) > 3 for line in skeleton)
    expanded = re.findall(r"^Point (\d) expanded \(branch (\d)\):\nIt helps because(.+)$", out, re.MULTILINE)
    assert [(p, b) for p, b, _ in expanded] == [("1", "0"), ("2", "1"), ("3", "2")]
    assert re.search(r"^Summary:\nIn short,.+$", out, re.MULTILINE)


@pytest.mark.model
def test_react_agent_runs(examples, runtime, capsys):
    ns = examples["react_agent"]
    out = run_main(examples, "react_agent", runtime, capsys)
    blocks = out.split("Question: ")[1:]
    assert len(blocks) == len(ns["QUESTIONS"])
    for block in blocks:
        actions = re.findall(r"action: (\S+)", block)
        assert actions and set(actions) <= set(ns["ACTIONS"])
        inputs = re.findall(r"input: (.+) -> observation: (.+)", block)
        assert len(inputs) == actions.count("calculator")
        for expression, observation in inputs:
            assert re.fullmatch(ns["EXPRESSION_REGEX"], expression + "\n")
            assert observation == ns["observe"](expression)
        assert re.search(r"answer: -?\d+(\.\d+)? \((correct|expected -?\d+)\)", block)


@pytest.mark.model
def test_json_extraction_runs(examples, runtime, capsys):
    ns = examples["json_extraction"]
    out = run_main(examples, "json_extraction", runtime, capsys)
    people = re.findall(r"^Person: Person\((.*)\)$", out, re.MULTILINE)
    assert len(people) == len(ns["TEXTS"])
    for fields in people:
        assert re.fullmatch(r"name='.+', age=\d+, city='.+', occupation='.+', employment='[a-z-]+'", fields)


@pytest.mark.model
def test_tool_agent_runs(examples, runtime, capsys):
    ns = examples["tool_agent"]
    out = run_main(examples, "tool_agent", runtime, capsys)
    blocks = out.split("Question: ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ns["QUESTIONS"]
    for block in blocks:
        calls = re.findall(r"^  call: (\w+)\((\{.*\})\) -> (.*)$", block, re.MULTILINE)
        assert calls  # the first turn must call a tool
        for name, arguments, content in calls:
            tool = ns[name]
            arguments = ast.literal_eval(arguments)
            jsonschema.validate(arguments, tool.parameters)  # the grammar allows valid arguments only
            try:
                expected = tool(**arguments)
            except ValueError as exc:
                expected = f"Error: ValueError: {exc}"
            assert content == (expected if isinstance(expected, str) else json.dumps(expected))
        assert re.search(r"^  answer: .+", block, re.MULTILINE)
