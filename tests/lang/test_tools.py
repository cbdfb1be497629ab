"""Tool declarations (schemas from type hints and docstrings) and running calls (errors become results)."""

from __future__ import annotations

import asyncio
import enum
import json
import threading
import time
from typing import Annotated, Literal, Optional

import jsonschema
import pydantic
import pytest

import plait as pl
from plait.lang import ToolDeclarationError
from plait.lang.tools import MAX_SCHEMA_BYTES, MAX_TOOLS, Tool, ToolCall, as_tools, run_tool_calls, tool_schema


class Point(pydantic.BaseModel):
    x: int
    y: int


class Box(pydantic.BaseModel):
    width: int


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


@pl.tool
def get_weather(city: str, unit: Unit = Unit.CELSIUS, days: int = 1) -> str:
    """Get the weather forecast.

    Longer explanation that is not part of the summary.

    Args:
        city: The city's name,
            as people write it.
        unit (Unit): The temperature unit.
        days: How many days.

    Returns:
        A sentence.
    """
    return f"{days} day(s) of sun in {city}, in {unit.value}"


def test_tool_from_function_has_name_description_and_schema():
    assert isinstance(get_weather, Tool) and get_weather.name == "get_weather"
    assert get_weather.description == "Get the weather forecast."
    assert get_weather.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city's name, as people write it."},
            "unit": {"enum": ["celsius", "fahrenheit"], "description": "The temperature unit.", "default": "celsius"},
            "days": {"type": "integer", "description": "How many days.", "default": 1},
        },
        "required": ["city"],
        "additionalProperties": False,
    }
    assert get_weather("Oslo") == "1 day(s) of sun in Oslo, in celsius"  # still the function
    assert get_weather.chat_dict() == {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather forecast.", "parameters": get_weather.parameters}}


def test_schema_of_every_supported_hint():
    def f(a: list[str], b: dict[str, float], c: Optional[int], d: Literal["x", "y"], e: tuple[int, str],
          g: Annotated[str, "a note"], h: bool | None = None, p: Point | None = None, q: tuple[int, ...] = ()):
        """F.

        :param a: the a's
        :param b: the b's
        """

    schema = tool_schema(f, {"a": "the a's"})
    props = schema["properties"]
    assert props["a"] == {"type": "array", "items": {"type": "string"}, "description": "the a's"}
    assert props["b"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["c"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert props["d"] == {"enum": ["x", "y"]}
    assert props["e"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert props["g"] == {"type": "string", "description": "a note"}
    assert props["p"]["anyOf"][0]["properties"]["x"] == {"title": "X", "type": "integer"}
    assert props["q"] == {"type": "array", "items": {"type": "integer"}, "default": []}
    assert schema["required"] == ["a", "b", "c", "d", "e", "g"]
    jsonschema.Draft202012Validator.check_schema(schema)
    sphinx = Tool.from_function(f)  # :param lines give the descriptions
    assert sphinx.parameters["properties"]["b"]["description"] == "the b's" and sphinx.description == "F."


@pytest.mark.parametrize("func, message", [
    (lambda x: x, "has no type hint"),
    (lambda *args: 0, "named parameters only"),
])
def test_bad_functions_are_refused_at_declaration(func, message):
    with pytest.raises(ToolDeclarationError, match=message):
        Tool.from_function(func, name="f")


def test_bad_declarations_are_refused():
    def f(x: object) -> None: ...

    with pytest.raises(ToolDeclarationError, match="has no JSON schema"):
        pl.tool(f)

    def g(x: dict[int, str]) -> None: ...

    with pytest.raises(ToolDeclarationError, match="keys are strings"):
        pl.tool(g)
    with pytest.raises(ToolDeclarationError, match="1-64 letters"):
        Tool("bad name", None, {"type": "object"})
    with pytest.raises(ToolDeclarationError, match="schema of an object"):
        Tool("f", None, {"type": "string"})
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(200)}}
    with pytest.raises(ToolDeclarationError, match=f"limit is {MAX_SCHEMA_BYTES}"):
        Tool("f", None, huge)
    with pytest.raises(ToolDeclarationError, match="unique"):
        as_tools([get_weather, get_weather])
    many = [Tool(f"t{i}", None, {"type": "object"}) for i in range(MAX_TOOLS + 1)]
    with pytest.raises(ToolDeclarationError, match=f"at most {MAX_TOOLS}"):
        as_tools(many)
    with pytest.raises(ToolDeclarationError, match="a list of tools"):
        as_tools(get_weather)


def test_as_tools_accepts_functions_tools_and_openai_dicts():
    def ping(host: str) -> str:
        """Ping a host."""
        return "pong"

    spec = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    tools = as_tools([ping, get_weather, spec])
    assert [t.name for t in tools] == ["ping", "get_weather", "lookup"]
    assert tools[0].func is ping and tools[2].func is None
    assert pl.tool(name="renamed", description="Other.")(ping).name == "renamed"


# ------------------------------------------------------------------------------------------ running
def test_run_converts_arguments_and_formats_results():
    @pl.tool
    def area(box: Box, unit: Unit, scale: Optional[float] = None) -> dict:
        """Area."""
        assert isinstance(box, Box) and isinstance(unit, Unit)
        return {"area": box.width ** 2 * (scale or 1), "unit": unit}

    [result] = run_tool_calls([ToolCall("c1", "area", {"box": {"width": 3}, "unit": "celsius"})], {"area": area})
    assert result.error is None and json.loads(result.content) == {"area": 9, "unit": "celsius"}
    assert result.value["area"] == 9


def test_failures_become_error_results_not_exceptions():
    @pl.tool
    def boom(x: int) -> int:
        """Fails."""
        raise ValueError(f"bad x {x}")

    tools = {"boom": boom, "get_weather": get_weather, "declared": Tool("declared", None, {"type": "object"})}
    calls = [ToolCall("1", "boom", {"x": 2}), ToolCall("2", "nope", {}), ToolCall("3", "get_weather", {"town": "x"}),
             ToolCall("4", "get_weather", "not json"), ToolCall("5", "declared", {}),
             ToolCall("6", "get_weather", {"city": "Rome", "unit": "kelvin"})]
    results = run_tool_calls(calls, tools)
    assert [r.content.split(":")[0:2] for r in results] == [["Error", " ValueError"], ["Error", " LookupError"],
                                                           ["Error", " TypeError"], ["Error", " TypeError"],
                                                           ["Error", " TypeError"], ["Error", " ValueError"]]
    assert results[0].content == "Error: ValueError: bad x 2" and results[0].error == "ValueError: bad x 2"
    assert "no tool named 'nope'" in results[1].content and "'city'" in results[2].content
    assert all(r.value is None for r in results)


def test_parallel_calls_run_concurrently_and_keep_their_order():
    lock, active, peak = threading.Lock(), [0], [0]

    @pl.tool
    def slow(tag: str) -> str:
        """Takes a while."""
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return tag

    calls = [ToolCall(str(i), "slow", {"tag": t}) for i, t in enumerate("abc")]
    results = run_tool_calls(calls, {"slow": slow}, parallel=True)
    assert [r.content for r in results] == ["a", "b", "c"] and peak[0] == 3
    peak[0] = 0
    assert [r.content for r in run_tool_calls(calls, {"slow": slow}, parallel=False)] == ["a", "b", "c"]
    assert peak[0] == 1


def test_async_tools_run_to_completion():
    @pl.tool
    async def fetch(url: str) -> str:
        """Fetch."""
        await asyncio.sleep(0)
        return f"body of {url}"

    [result] = run_tool_calls([ToolCall("1", "fetch", {"url": "u"})], {"fetch": fetch})
    assert result.content == "body of u"
