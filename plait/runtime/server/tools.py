"""Function calling: tool declarations, the grammar a tool call is generated under, and reading calls back.

Tool calls use the Hermes / Qwen format, one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The output is constrained by a Lark grammar (llguidance) built from the tools' JSON schemas, so every
complete call parses and its arguments match the tool's schema:

- ``required``: one call (or several, with ``parallel_tool_calls``) and nothing else;
- a named function: calls of that function only;
- ``auto``: either text that never contains ``<tool_call>``, or text followed by calls;
- ``none``: no grammar, and the output is not read for calls.

``ToolCallParser`` reads the format back, streaming-safe: it turns text deltas into content deltas and
OpenAI-shaped tool-call pieces (header with id and name, then argument pieces).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.constrained.backends.llguidance_backend import JSON_OPTIONS
from plait.runtime.server.protocol import RequestError
from plait.tool_text import function_tool_dict
from plait.tool_text import tools_system_prompt as system_prompt_for

__all__ = ["FunctionTool", "ToolCallParser", "ToolChoice", "parse_chat_tools", "tool_grammar"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# the same JSON style as response_format (json.dumps' separators, bounded whitespace; docs/constrained.md)
_JSON_STYLE = JSON_OPTIONS


@dataclass(frozen=True)
class FunctionTool:
    """One function the model may call: its name, description and JSON schema of its arguments."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def chat_dict(self) -> dict[str, Any]:
        """The tool as chat templates and OpenAI's chat API show it."""
        return function_tool_dict(self.name, self.description, self.parameters)


@dataclass(frozen=True)
class ToolChoice:
    """What the model may do: ``mode`` is ``none``, ``auto``, ``required`` or ``function`` (then ``name``)."""

    tools: tuple[FunctionTool, ...]
    mode: str = "auto"
    name: str | None = None
    parallel: bool = True
    legacy: bool = False  # ``functions`` / ``function_call``: the answer carries ``message.function_call``

    @property
    def callable_tools(self) -> tuple[FunctionTool, ...]:
        return tuple(t for t in self.tools if self.mode != "function" or t.name == self.name)


def function_tool(spec: Any, where: str) -> FunctionTool:
    """A ``FunctionTool`` from ``{"name", "description", "parameters"}`` (the inside of a chat tool, a
    legacy function, or a Responses API tool)."""
    if not isinstance(spec, dict):
        raise RequestError(f"{where} must be an object", param="tools")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RequestError(f"{where}.name must be 1-64 letters, digits, '_', '-', '.' or ':', got {name!r}",
                           param="tools")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise RequestError(f"{where}.description must be a string", param="tools")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise RequestError(f"{where}.parameters must be a JSON Schema object", param="tools")
    return FunctionTool(name, description, parameters)


def _chat_tool(spec: Any, i: int) -> FunctionTool:
    if not isinstance(spec, dict) or spec.get("type") != "function" or not isinstance(spec.get("function"), dict):
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise RequestError(f"tools[{i}]: only function tools are supported ({{'type': 'function', 'function': "
                           f"{{...}}}}), got type {kind!r}", param="tools")
    return function_tool(spec["function"], f"tools[{i}].function")


def make_choice(tools: list[FunctionTool], choice: Any, parallel: Any, legacy: bool = False,
                param: str = "tool_choice") -> ToolChoice:
    """Check ``tool_choice`` against ``tools``. ``choice``: a mode string, ``{"type": "function",
    "function": {"name"}}`` (chat), ``{"type": "function", "name"}`` (Responses) or ``{"name"}`` (legacy)."""
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise RequestError(f"tool names must be unique, got {names}", param="tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"at most {MAX_TOOLS} tools per request, got {len(tools)}", param="tools")
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise RequestError(f"{param} must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                               param=param)
        if choice != "none" and not tools:
            raise RequestError(f"{param}={choice!r} needs at least one tool", param=param)
        return ToolChoice(tuple(tools), choice, None, parallel, legacy)
    name = None
    if isinstance(choice, dict):
        inner = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        name = inner.get("name")
    if not isinstance(name, str):
        raise RequestError(f"{param} must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                           f"{{'name': ...}}}}, got {choice!r}", param=param)
    if name not in names:
        raise RequestError(f"{param} names the function {name!r}, which is not among the tools {names}", param=param)
    return ToolChoice(tuple(tools), "function", name, parallel, legacy)


def parse_chat_tools(body: dict[str, Any]) -> ToolChoice | None:
    """The tool settings of a chat request (``tools``/``tool_choice`` or legacy ``functions``/``function_call``);
    None when it declares no tools."""
    tools, functions = body.get("tools"), body.get("functions")
    if tools is not None and functions is not None:
        raise RequestError("send either 'tools' or the legacy 'functions', not both", param="functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise RequestError("functions must be a list", param="functions")
        declared = [function_tool(f, f"functions[{i}]") for i, f in enumerate(functions)]
        choice = body.get("function_call")
        return make_choice(declared, choice, False, legacy=True, param="function_call") if declared else None
    if body.get("function_call") is not None:
        raise RequestError("function_call needs 'functions'", param="function_call")
    if tools is None or tools == []:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise RequestError("tool_choice needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", param="tools")
    declared = [_chat_tool(t, i) for i, t in enumerate(tools)]
    return make_choice(declared, body.get("tool_choice"), body.get("parallel_tool_calls"))


# ------------------------------------------------------------------------------------------ grammar
def _lark_string(text: str) -> str:
    return json.dumps(text)


def _schema_for_lark(schema: dict[str, Any]) -> str:
    """The schema as ``%json`` text, in our JSON style. ``::`` is escaped inside strings, where it can
    only appear, so the grammar is never mistaken for GBNF (``lark_from_ebnf`` looks for ``::=``)."""
    styled = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **_JSON_STYLE}}
    return json.dumps(styled).replace("::", ":\\u003a")


def tool_grammar(choice: ToolChoice, thinking: str | None = None) -> str | None:
    """The Lark grammar (llguidance) the output must match under ``choice``; None for ``none``.

    ``thinking``: how a reasoning model's ``<think>`` block may precede the answer: None (no room for
    one), ``"optional"`` (a ``<think>...</think>`` block may come first; calls under ``required`` or a
    named function only) or ``"open"`` (the prompt opened ``<think>``: the output closes it first).
    """
    if choice.mode == "none":
        return None
    tools = choice.callable_tools
    lines = ["%llguidance {}", "ANY: /(.|\\n)*/"]
    prefix = ""
    if thinking == "open" or thinking == "optional" and choice.mode != "auto":
        opener = '"<think>" ' if thinking == "optional" else ""
        lines += [f'think[lazy]: {opener}ANY "</think>"', "NEWLINES: /\\n+/"]
        prefix = "think NEWLINES? " if thinking == "open" else "(think NEWLINES?)? "
    call = f'{_lark_string(CALL_OPEN)} call_body'
    calls = f'{call} ({_lark_string(chr(10))} {call})*' if choice.parallel else call
    if choice.mode == "auto":
        lines += [f"start: {prefix}(TEXT | head call_body{' more_calls' if choice.parallel else ''})",
                  f"head[lazy]: ANY {_lark_string(CALL_OPEN)}",
                  f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(CALL_OPEN)}(.|\\n)*/"]
        if choice.parallel:
            lines.append(f'more_calls: ({_lark_string(chr(10))} {call})*')
    else:
        lines.append(f"start: {prefix}{calls}")
    lines.append('call_body: "\\n" (' + " | ".join(f"fn_{i}" for i in range(len(tools))) + f') "\\n" '
                 f'{_lark_string(CALL_CLOSE)}')
    for i, tool in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name) + ', "arguments": '
        lines.append(f'fn_{i}: {_lark_string(head)} args_{i} "}}"')
        lines.append(f"args_{i}: %json {_schema_for_lark(tool.parameters)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ prompt
def tools_system_prompt(tools: tuple[FunctionTool, ...]) -> str:
    """How tools are described to a model whose chat template has no tool support (Hermes style)."""
    return system_prompt_for(t.chat_dict() for t in tools)


def render_call(name: str, arguments: Any) -> str:
    """One call in the tool-call format (for assistant turns rendered into the prompt)."""
    return f"{CALL_OPEN}\n" + json.dumps({"name": name, "arguments": arguments}) + f"\n{CALL_CLOSE}"


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class ToolCallPiece:
    """What one delta added to call number ``index``: its header (``id`` and ``name``) and/or arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCallParser:
    """Reads content and tool calls out of output text, fed in deltas (streaming) or whole.

    ``feed`` returns ``(content_delta, pieces)``. Text that could be the start of ``<tool_call>`` is held
    back until it is known. Arguments are passed through as generated (valid JSON under the grammar).
    """

    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    pending: str = ""
    state: str = "text"  # text -> header -> arguments -> close -> between -> header ...
    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def feed(self, delta: str) -> tuple[str, list[ToolCallPiece]]:
        self.pending += delta
        content, pieces = "", []
        while self.pending:
            progressed, text = self._step(pieces)
            content += text
            if not progressed:
                break
        self.content += content
        return content, _merge(pieces)

    def finish(self) -> tuple[str, list[ToolCallPiece]]:
        """The held-back text at the end (a ``<tool_call>`` prefix that never completed is content)."""
        text = self.pending if self.state == "text" else ""
        self.pending = ""
        self.content += text
        return text, []

    def _step(self, pieces: list[ToolCallPiece]) -> tuple[bool, str]:
        if self.state == "text":
            index = self.pending.find(CALL_OPEN)
            if index < 0:
                keep = _prefix_tail(self.pending, CALL_OPEN)
                text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                return False, text
            text, self.pending = self.pending[:index], self.pending[index + len(CALL_OPEN):]
            self.state = "header"
            return True, text
        if self.state == "header":
            match = _HEADER.match(self.pending)
            if not match:
                return False, ""
            name = json.loads(match.group(1))
            call = ParsedCall("call_" + uuid.uuid4().hex[:24], name)
            self.calls.append(call)
            pieces.append(ToolCallPiece(len(self.calls) - 1, call.id, name))
            self.pending = self.pending[match.end():]
            self.state, self.depth, self.in_string, self.escaped = "arguments", 0, False, False
            return True, ""
        if self.state == "arguments":
            return self._arguments(pieces), ""
        if self.state == "close":
            index = self.pending.find(CALL_CLOSE)
            if index < 0:
                return False, ""
            self.pending = self.pending[index + len(CALL_CLOSE):]
            self.calls[-1].complete = True
            self.state = "between"
            return True, ""
        # between calls: whitespace, then another call
        stripped = self.pending.lstrip()
        if stripped.startswith(CALL_OPEN):
            self.pending, self.state = stripped[len(CALL_OPEN):], "header"
            return True, ""
        self.pending = stripped
        return False, ""

    def _arguments(self, pieces: list[ToolCallPiece]) -> bool:
        """Pass argument characters through until the arguments' JSON value closes."""
        if not self.calls[-1].arguments:  # whitespace before the value: the header may have matched
            self.pending = self.pending.lstrip()  # before it arrived (streaming), so drop it here
            if not self.pending:
                return False
        end = None
        for i, char in enumerate(self.pending):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    end = i + 1
                    break
        taken = self.pending if end is None else self.pending[:end]
        if taken:
            self.calls[-1].arguments += taken
            pieces.append(ToolCallPiece(len(self.calls) - 1, arguments=taken))
        self.pending = "" if end is None else self.pending[end:]
        if end is not None:
            self.state = "close"
        return end is not None


def _prefix_tail(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def _merge(pieces: list[ToolCallPiece]) -> list[ToolCallPiece]:
    """Consecutive argument pieces of one call merge; a header stays its own piece (OpenAI streams a call's
    id and name first, with empty arguments, then the arguments)."""
    merged: list[ToolCallPiece] = []
    for piece in pieces:
        if merged and merged[-1].index == piece.index and piece.name is None and merged[-1].name is None:
            merged[-1].arguments += piece.arguments
        else:
            merged.append(piece)
    return merged
