"""The tool primitives and their IR nodes: declare tools, let the model call them, append results.

- ``pl.system("...", tools=[...])`` (``DeclareTools``): a system block that declares the tools, in
  the chat template's own tool format where it has one (``tools=`` passed to the template).
- ``pl.call_tools(name, ...)`` (``CallTools``): assistant turns generated under a grammar that
  allows either a plain-text answer or calls of the declared tools whose arguments match their
  schemas; the calls are run and their results appended as tool turns, until the model answers
  (``execute=True``), or the calls of one turn are returned to the program (``execute=False``).
- ``pl.tool_result(call, value)`` / ``pl.tool_results([...])`` (``ToolResults``): the tool role, the
  results of calls the program ran itself, rendered together as the template renders tool messages.

The interpreter runs these nodes in ``plait.lang.tool_interpreter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from plait.lang.errors import ToolDeclarationError
from plait.lang.ir import Node
from plait.lang.models import check_model_name
from plait.lang.tools import Tool, ToolCall, ToolResult, _result_text, as_tools
from plait.sampling import SamplingParams

__all__ = [
    "DEFAULT_MAX_STEPS",
    "MAX_STEPS_LIMIT",
    "CallTools",
    "DeclareTools",
    "ToolResults",
    "call_tools",
    "declare_tools",
    "tool_result",
    "tool_results",
]

#: Tool-calling turns ``call_tools`` allows by default before the model must answer.
DEFAULT_MAX_STEPS = 8
#: The largest ``max_steps`` accepted.
MAX_STEPS_LIMIT = 64
#: Calls of one turn that are run; further calls of that turn get an error result.
MAX_CALLS_PER_TURN = 16
_CONSTRAINTS = ("regex", "json_schema", "ebnf", "choices")


@dataclass(frozen=True)
class DeclareTools(Node):
    """A system block that declares ``tools`` (with the system prompt ``content``, if any)."""

    tools: tuple[Tool, ...]
    content: str | None = None


@dataclass(frozen=True)
class CallTools(Node):
    """Assistant turns that may call tools (see ``call_tools``); the answer is stored in ``name``."""

    name: str | None
    tools: tuple[Tool, ...] | None  # None: every declared tool
    choice: str = "auto"
    max_steps: int = DEFAULT_MAX_STEPS
    parallel: bool = True
    execute: bool = True
    overrides: tuple[tuple[str, Any], ...] = ()
    model: str | None = None  # the model serving every turn (see ``plait.lang.models``); None: the default

    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)


@dataclass(frozen=True)
class ToolResults(Node):
    """Tool turns holding ``results`` of calls the program ran (rendered together, in order)."""

    results: tuple[ToolResult, ...]


def declare_tools(tools: Sequence[Any], content: str | None = None) -> Node:
    """A system block declaring ``tools`` (functions, ``@pl.tool`` or ``Tool``); what
    ``pl.system(content, tools=tools)`` returns."""
    if content is not None and not isinstance(content, str):
        raise TypeError(f"a system block with tools takes its content as a str, got {type(content).__name__}")
    declared = as_tools(tools)
    if not declared:
        raise ToolDeclarationError("pl.system(..., tools=[]) declares no tools; leave tools= out")
    return DeclareTools(declared, content)


def call_tools(
    name: str | None = None,
    tools: Sequence[Any] | None = None,
    *,
    tool_choice: Any = "auto",
    max_steps: int | None = None,
    parallel: bool = True,
    execute: bool = True,
    max_tokens: int | None = None,
    model: str | None = None,
    **sampling: Any,
) -> Node:
    """Let the model call tools; store its answer in ``name``.

    Each step is an assistant turn generated under a grammar: either a plain-text answer, or (text
    and then) calls of the tools, each a tool name and arguments valid for its schema. ``tools``:
    the tools it may call (default: every tool the prompt declared with ``pl.system(..., tools=)``;
    each must have been declared). ``tool_choice``: ``"auto"``, ``"required"`` (the first turn must
    call) or a tool / its name (the first turn calls that tool); later turns are ``"auto"``.
    ``parallel``: a turn may make several calls, which run concurrently.

    ``execute=True``: the calls run (``Tool.func``), a tool that raises gives an ``"Error: ..."``
    result, the results are appended as tool turns and the model continues, until it answers in text
    or ``max_steps`` (default 8) turns have called tools; then one more turn answers without tools.
    ``s[name]`` is the answer, ``s.get_meta_info(name)["tool_results"]`` every ``ToolResult``.
    ``execute=False``: one turn; ``s[name]`` is its text and ``s.tool_calls(name)`` the calls it
    made, for the program to run and answer with ``pl.tool_results``.

    ``max_tokens`` and other sampling options (``temperature``, ``top_p``, ``seed``, ...) apply to
    every turn; constraint options are not accepted (the turn's grammar is the constraint).
    ``model``: the model that serves every turn (as in ``pl.gen``; None: the ``s.using`` scope's).
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"call_tools name must be a str or None, got {type(name).__name__}")
    declared = as_tools(tools, "call_tools tools") if tools is not None else None
    if declared is not None and not declared:
        raise ToolDeclarationError("call_tools(tools=[]) offers no tools; use pl.gen for a plain answer")
    choice = _choice(tool_choice, declared)
    if max_steps is not None and not execute:
        raise ValueError("call_tools: max_steps limits the steps of execute=True; with execute=False one turn is made")
    steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS_LIMIT:
        raise ValueError(f"call_tools max_steps must be an int from 1 to {MAX_STEPS_LIMIT}, got {max_steps!r}")
    for flag, value in (("parallel", parallel), ("execute", execute)):
        if not isinstance(value, bool):
            raise TypeError(f"call_tools {flag} must be True or False, got {value!r}")
    bad = sorted(set(sampling) & set(_CONSTRAINTS)) + sorted(set(sampling) - set(SamplingParams.field_names()))
    if bad or "n" in sampling:
        raise ValueError(f"call_tools does not take {bad or ['n']}: its turns are constrained to answers and tool "
                         "calls; sampling options such as temperature, top_p, seed and max_tokens are accepted")
    overrides = {k: v for k, v in {**sampling, "max_new_tokens": max_tokens}.items() if v is not None}
    if isinstance(overrides.get("stop"), list):
        overrides["stop"] = tuple(overrides["stop"])
    validated = SamplingParams(**overrides)  # ValueError naming a bad field
    normalized = tuple(sorted((k, getattr(validated, k)) for k in overrides))
    return CallTools(name, declared, choice, steps, parallel, execute, normalized,
                     check_model_name(model, f"call_tools {name!r}"))


def _choice(tool_choice: Any, declared: tuple[Tool, ...] | None) -> str:
    if isinstance(tool_choice, Tool):
        tool_choice = tool_choice.name
    elif isinstance(tool_choice, dict):  # OpenAI's {"type": "function", "function": {"name": ...}}
        inner = tool_choice.get("function", tool_choice)
        tool_choice = inner.get("name") if isinstance(inner, dict) else None
    elif callable(tool_choice):
        tool_choice = getattr(tool_choice, "__name__", None)
    if tool_choice == "none":
        raise ValueError("call_tools tool_choice='none' makes no calls; use pl.gen for a plain answer")
    if not isinstance(tool_choice, str):
        raise ValueError(f"call_tools tool_choice must be 'auto', 'required' or a tool, got {tool_choice!r}")
    if tool_choice not in ("auto", "required") and declared is not None and tool_choice not in [t.name for t in declared]:
        raise ToolDeclarationError(f"call_tools tool_choice names {tool_choice!r}, which is not among its tools "
                                   f"{[t.name for t in declared]}")
    return tool_choice


def tool_result(call: ToolCall, value: Any) -> Node:
    """The tool turn with the result of ``call`` (a str as is, anything else as JSON)."""
    return tool_results([(call, value)])


def tool_results(results: Sequence[Any]) -> Node:
    """Tool turns for several calls of one assistant turn: ``[(call, value), ...]`` or ``ToolResult``s.

    They are rendered together, as the chat template renders consecutive tool messages.
    """
    out: list[ToolResult] = []
    for item in results:
        if isinstance(item, ToolResult):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], ToolCall):
            call, value = item
            out.append(ToolResult(call, _result_text(value), value))
        else:
            raise TypeError(f"tool_results takes (ToolCall, value) pairs or ToolResult objects, got {item!r}")
    if not out:
        raise ValueError("tool_results needs at least one result")
    return ToolResults(tuple(out))
