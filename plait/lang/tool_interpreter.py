"""Executing the tool nodes (``DeclareTools``, ``CallTools``, ``ToolResults``) on an ``Executor``.

Called by the interpreter (``Executor._execute``) on the state's worker thread. A ``CallTools`` turn
is an ordinary gen inside an assistant block (same call record, streaming and abort handling), with
the turn's grammar in ``params.ebnf`` and a ``ToolRequest`` in the ``GenerateCall``; the calls are read
back from its text with the template's ``CallSyntax`` (or taken from ``GenerateResult.tool_calls`` on a
backend with a tools API).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from plait.lang.backends.base import GenerateResult, ToolRequest
from plait.lang.errors import RoleError, ToolCallError, ToolDeclarationError
from plait.lang.ir import Gen, Node
from plait.lang.records import Segment
from plait.lang.symbolic import SymbolicValue
from plait.lang.tool_format import RenderedBlock, ToolRendering, tool_rendering_of
from plait.lang.tool_primitives import MAX_CALLS_PER_TURN, CallTools, DeclareTools, ToolResults
from plait.lang.tools import Tool, ToolCall, ToolResult, run_tool_calls

if TYPE_CHECKING:
    from plait.lang.interpreter import Executor

__all__ = ["TOOL_NODES", "execute_tool_node"]

TOOL_NODES = (DeclareTools, CallTools, ToolResults)


def execute_tool_node(ex: Executor, node: Node) -> None:
    """Run one tool node on ``ex`` (see the module docstring)."""
    if ex.cur_role is not None:
        raise RoleError(f"{type(node).__name__} writes whole turns of its own; it cannot go inside the open "
                        f"{ex.cur_role!r} block")
    rendering = tool_rendering_of(ex.run.template)
    if isinstance(node, DeclareTools):
        _declare(ex, node, rendering)
    elif isinstance(node, CallTools):
        _call_tools(ex, node, rendering)
    elif isinstance(node, ToolResults):
        _append_results(ex, rendering, [r.call for r in node.results], list(node.results))
    else:
        raise TypeError(f"not a tool node: {type(node).__name__}")


def _emit(ex: Executor, text: str, kind: str, role: str, name: str | None = None) -> None:
    text = str(text)  # a traced placeholder's own truth and length are blocked
    if not text:
        return
    with ex.changed:
        ex.text += text
        ex.segments.append(Segment(kind, text, role, name))
        ex.changed.notify_all()


def _emit_block(ex: Executor, block: RenderedBlock, kind: str) -> None:
    _emit(ex, block.prefix, "role_prefix", block.role)
    _emit(ex, block.content, kind, block.role)
    _emit(ex, block.suffix, "role_suffix", block.role)


def _declare(ex: Executor, node: DeclareTools, rendering: ToolRendering) -> None:
    content = None if node.content is None else str(node.content)  # a traced argument renders as its marker
    blocks = rendering.declaration(ex.run.template, content, node.tools)
    for block in blocks:
        _emit_block(ex, block, "text")
    if blocks:  # (a tools API takes the declaration outside the text: nothing to show then)
        ex.messages.append({"role": "system", "content": content or ""})
    ex.tools.update({t.name: t for t in node.tools})


def _append_results(ex: Executor, rendering: ToolRendering, calls: Sequence[ToolCall],
                    results: Sequence[ToolResult]) -> None:
    for block in rendering.results(ex.run.template, calls, results):
        _emit_block(ex, block, "tool")
    for r in results:
        ex.messages.append({"role": "tool", "tool_call_id": r.call.id, "name": r.call.name, "content": r.content})


def _offered_tools(ex: Executor, node: CallTools) -> tuple[Tool, ...]:
    """The tools this node may call; each must have been declared (the model has to know them)."""
    declared: dict[str, Tool] = ex.tools
    if not declared:
        raise ToolDeclarationError(
            "call_tools: no tools were declared in the prompt, so the model cannot know them; declare them "
            "first with s += pl.system('...', tools=[...])")
    tools = node.tools if node.tools is not None else tuple(declared.values())
    for t in tools:
        if t.name not in declared:
            raise ToolDeclarationError(f"call_tools offers {t.name!r}, which the prompt never declared (declared: "
                                       f"{sorted(declared)}); add it to pl.system(..., tools=[...])")
        if (t.description, t.parameters) != (declared[t.name].description, declared[t.name].parameters):
            raise ToolDeclarationError(f"call_tools offers {t.name!r} with another schema or description than the "
                                       "prompt declared")
    if node.choice not in ("auto", "required") and node.choice not in [t.name for t in tools]:
        raise ToolDeclarationError(f"call_tools tool_choice {node.choice!r} is not among the tools "
                                   f"{[t.name for t in tools]}")
    return tools


def _call_tools(ex: Executor, node: CallTools, rendering: ToolRendering) -> None:
    tools = _offered_tools(ex, node)
    if ex.run.symbolic:
        ex._role_begin("assistant")
        placeholder = SymbolicValue("tools", node.name or "_")
        _emit(ex, placeholder, "gen", "assistant", node.name)
        ex._role_end("assistant")
        ex._set_result(node.name, placeholder, {"tools": [t.name for t in tools], "tool_calls": placeholder})
        return
    by_name = {t.name: t for t in tools}
    all_results: list[ToolResult] = []
    steps, calls, content, result = 0, [], "", None
    for step in range(node.max_steps + 1):
        choice = "none" if step == node.max_steps else (node.choice if step == 0 else "auto")
        content, calls, result = _turn(ex, node, tools, choice, rendering)
        if not calls or not node.execute:
            break
        steps += 1
        results = run_tool_calls(calls[:MAX_CALLS_PER_TURN], by_name, node.parallel)
        skipped = f"RuntimeError: only {MAX_CALLS_PER_TURN} calls of one turn are run"
        results += [ToolResult(c, f"Error: {skipped}", None, skipped) for c in calls[MAX_CALLS_PER_TURN:]]
        all_results.extend(results)
        _append_results(ex, rendering, calls, results)
    assert result is not None
    meta: dict[str, Any] = {
        "tool_calls": list(calls) if not node.execute else [r.call for r in all_results],
        "tool_results": all_results,
        "steps": steps,
        "max_steps_reached": node.execute and steps == node.max_steps,
        "finish_reason": result.finish_reason,
    }
    ex._set_result(node.name, content, meta)


def _turn(ex: Executor, node: CallTools, tools: Sequence[Tool], choice: str,
          rendering: ToolRendering) -> tuple[str, list[ToolCall], GenerateResult]:
    """One assistant turn: generate under the turn's grammar, read the calls, record the message."""
    overrides = node.overrides_dict()
    if not rendering.uses_api:
        overrides["ebnf"] = rendering.syntax.grammar(tools, choice, node.parallel)
    request = ToolRequest(tuple(t.chat_dict() for t in tools), choice, node.parallel)
    ex._role_begin("assistant")
    first = len(ex.segments)
    result = ex._execute_gen(Gen(None, tuple(sorted(overrides.items())), model=node.model), tools=request)
    with ex.changed:  # the turn's text and call record carry the call_tools name (the gen itself stores nothing)
        for seg in ex.segments[first:]:
            seg.name = node.name
    ex.calls[-1] = replace(ex.calls[-1], kind="call_tools", name=node.name)
    ex._role_end("assistant")
    content, calls = _read_calls(result, rendering, choice, ex.run.backend.name if ex.run.backend else "")
    if calls:
        ex.messages[-1] = {"role": "assistant", "content": content, "tool_calls": [c.openai_dict() for c in calls]}
    return content, calls, result


def _read_calls(result: GenerateResult, rendering: ToolRendering, choice: str,
                backend: str) -> tuple[str, list[ToolCall]]:
    if result.tool_calls is not None:  # a backend with a tools API reported them
        calls = [ToolCall(c["id"], c["name"], _arguments(c["arguments"])) for c in result.tool_calls]
        return str(result.meta.get("content", result.text if not calls else "")), calls
    if choice == "none":
        return result.text, []
    try:
        content, parsed = rendering.syntax.parse(result.text)
    except ValueError as exc:
        finish = (result.finish_reason or {}).get("type")
        hint = ("raise max_tokens, or pass parallel=False if the model repeats its calls" if finish == "length"
                else "use a backend with constrained decoding")
        raise ToolCallError(f"cannot read the tool calls of the turn {result.text!r} ({exc}; finish reason "
                            f"{finish!r}, backend {backend!r}); {hint}") from None
    return content, [ToolCall("call_" + uuid.uuid4().hex[:24], name, args) for name, args in parsed]


def _arguments(text: Any) -> Any:
    """A reported call's arguments: decoded JSON, or the text as is when it is not JSON (the tool then
    reports the error to the model)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return text
