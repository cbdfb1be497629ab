"""How tools appear in a prompt: the declaration, the calls the model writes, and the results.

A ``ToolRendering`` belongs to a chat template (``ChatTemplate.tools``):

- ``PlainToolRendering`` (templates without tool support, e.g. SmolLM2's ChatML, and the named
  templates): the tool list goes into the system message in the Hermes style, calls are written in
  the Hermes ``<tool_call>`` format, results come back as a user turn of ``<tool_response>`` blocks.
  This is the text ``plait serve`` renders for such templates, so both agree.
- ``NativeToolRendering`` (``native_tool_rendering``): the model's own Jinja template renders the
  declaration (``tools=``) and the results (``role: "tool"`` messages), and its rendering of an
  assistant ``tool_calls`` message gives the call syntax the model writes (Qwen's Hermes format,
  Llama 3.1's JSON). Derived from sentinel renderings, like ``template_from_renderer``.

A ``CallSyntax`` writes calls, reads them back (``parse``) and builds the grammar (llguidance Lark
with ``%json`` per tool) that a tool-calling turn is generated under: either plain text that never
contains a call's opening, or (optional text then) calls whose arguments match their tool's schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from plait.lang.backends.base import ChatTemplate
from plait.lang.tools import Tool, ToolCall, ToolResult
from plait.tool_text import tools_system_prompt as system_prompt_for

__all__ = [
    "HERMES",
    "CallSyntax",
    "NativeToolRendering",
    "PlainToolRendering",
    "RenderedBlock",
    "ToolRendering",
    "native_tool_rendering",
    "tool_rendering_of",
    "tools_system_prompt",
]

logger = logging.getLogger(__name__)
Renderer = Callable[[list[dict[str, Any]], "list[dict[str, Any]] | None"], str]


@dataclass(frozen=True)
class RenderedBlock:
    """A block of prompt text: ``prefix`` and ``suffix`` are template markup, ``content`` the message."""

    role: str
    prefix: str
    content: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.content + self.suffix


# ------------------------------------------------------------------------------------------ call syntax
@dataclass(frozen=True)
class CallSyntax:
    """How a turn writes calls: each is ``open + name + infix + <arguments JSON> + close``; calls are
    joined by ``separator``; text may come first, then ``content_separator`` (None: a turn is either
    text or calls). ``compact``: the arguments JSON has no spaces after ``,`` and ``:``.
    ``parallel``: the template can render several calls in one turn."""

    open: str
    infix: str
    close: str
    separator: str = "\n"
    content_separator: str | None = "\n"
    compact: bool = False
    parallel: bool = True

    def dumps(self, value: Any) -> str:
        return json.dumps(value, separators=(",", ":") if self.compact else None, ensure_ascii=False)

    def render(self, content: str, calls: Sequence[ToolCall]) -> str:
        """The text of a turn with ``content`` and ``calls`` in this syntax."""
        written = self.separator.join(f"{self.open}{c.name}{self.infix}{self.dumps(c.arguments)}{self.close}"
                                      for c in calls)
        if content and calls and self.content_separator is not None:
            return content + self.content_separator + written
        return written or content

    def parse(self, text: str) -> tuple[str, list[tuple[str, Any]]]:
        """``(content, [(name, arguments), ...])`` of a turn; ValueError if a call is malformed or cut."""
        start = text.find(self.open)
        if start < 0:
            return text, []
        content = text[:start]
        if self.content_separator and content.endswith(self.content_separator):
            content = content[: len(content) - len(self.content_separator)]
        calls: list[tuple[str, Any]] = []
        pos, decoder = start, json.JSONDecoder()
        while True:
            if not text.startswith(self.open, pos):
                raise ValueError(f"expected a tool call at {text[pos:pos + 40]!r}")
            name_end = text.find(self.infix, pos + len(self.open))
            if name_end < 0:
                raise ValueError("a tool call ends before its arguments")
            name = text[pos + len(self.open):name_end]
            try:
                arguments, end = decoder.raw_decode(text, name_end + len(self.infix))
            except json.JSONDecodeError as exc:
                raise ValueError(f"the arguments of the call to {name!r} are not complete JSON ({exc.msg})") from None
            if not text.startswith(self.close, end):
                raise ValueError(f"the call to {name!r} is not closed with {self.close!r}")
            calls.append((name, arguments))
            pos = end + len(self.close)
            rest = text[pos:]
            if not rest.strip():
                return content, calls
            if rest.startswith(self.separator + self.open):
                pos += len(self.separator)
            elif rest.lstrip().startswith(self.open):
                pos += len(rest) - len(rest.lstrip())
            else:
                raise ValueError(f"unexpected text after a tool call: {rest[:40]!r}")

    def grammar(self, tools: Sequence[Tool], choice: str, parallel: bool) -> str:
        """The Lark grammar (llguidance) of a turn under ``choice``: ``"auto"`` (text without a call's
        opening, or calls), ``"required"`` (calls only), ``"none"`` (text only) or a tool's name."""
        lines = ["%llguidance {}", "ANY: /(.|\\n)*/",
                 f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{_lark_regex(self.open)}(.|\\n)*/"]
        if choice == "none":
            return "\n".join(["start: TEXT", *lines]) + "\n"
        callable_tools = [t for t in tools if choice in ("auto", "required") or t.name == choice]
        many = parallel and self.parallel
        calls = f"call ({_lit(self.separator)} call)*" if many else "call"
        if choice != "auto":
            lines.insert(0, f"start: {calls}")
        elif self.content_separator is None:
            lines.insert(0, f"start: TEXT | {calls}")
        else:  # text, or (text then) calls: the lazy head ends at the first call's opening
            lines.insert(0, f"start: TEXT | head call_body{' more' if many else ''}")
            lines.append(f"head[lazy]: ANY {_lit(self.open)}")
            if many:
                lines.append(f"more: ({_lit(self.separator)} call)*")
        lines.append(f"call: {_lit(self.open)} call_body")
        lines.append("call_body: " + " | ".join(f"fn_{i}" for i in range(len(callable_tools))))
        # at most one more space per boundary, as response_format's JSON style (docs/constrained.md): with
        # no free whitespace, llguidance's mask refuses tokens that span the end of a forced stretch
        style = {"item_separator": "," if self.compact else ", ", "key_separator": ":" if self.compact else ": ",
                 "whitespace_pattern": "[ ]?"}
        for i, tool in enumerate(callable_tools):
            lines.append(f"fn_{i}: {_lit(tool.name + self.infix)} args_{i} {_lit(self.close)}")
            lines.append(f"args_{i}: %json {_schema_for_lark(tool.parameters, style)}")
        return "\n".join(lines) + "\n"


def _lit(text: str) -> str:
    return json.dumps(text)


def _lark_regex(text: str) -> str:
    """``text`` as a literal inside a Lark ``/regex/``."""
    return "".join(c if c.isalnum() or c == "_" else ("\\n" if c == "\n" else f"\\x{{{ord(c):x}}}") for c in text)


def _schema_for_lark(schema: dict[str, Any], style: dict[str, Any]) -> str:
    """The schema as ``%json`` text. ``::`` only occurs inside strings, escaped there, so the grammar is
    never taken for GBNF (which is recognized by ``::=``)."""
    styled = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **style}}
    return json.dumps(styled).replace("::", ":\\u003a")


#: The Hermes / Qwen format (``plait serve`` generates and reads the same)::
#:
#:     <tool_call>
#:     {"name": "get_weather", "arguments": {"city": "Paris"}}
#:     </tool_call>
HERMES = CallSyntax(open='<tool_call>\n{"name": "', infix='", "arguments": ', close="}\n</tool_call>")


# ------------------------------------------------------------------------------------------ renderings
class ToolRendering:
    """How one chat template shows tools. ``native``: rendered by the model's own template.
    ``uses_api``: the backend sends tools through an API of its own (no grammar in the request)."""

    syntax: CallSyntax = HERMES
    native = False
    uses_api = False

    def declaration(self, template: ChatTemplate, content: str | None, tools: Sequence[Tool]) -> list[RenderedBlock]:
        """The system block(s) that declare ``tools`` (with the system prompt ``content``, if any)."""
        raise NotImplementedError

    def results(self, template: ChatTemplate, calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> list[RenderedBlock]:
        """The block(s) after an assistant turn that made ``calls``, holding their ``results``."""
        raise NotImplementedError


def tools_system_prompt(tools: Sequence[Tool]) -> str:
    """How tools are described to a model whose template has no tool support (Hermes style; the same
    text ``plait serve`` renders)."""
    return system_prompt_for(t.chat_dict() for t in tools)


class PlainToolRendering(ToolRendering):
    """Tools for templates without tool support: listed in the system message, results as a user turn."""

    def declaration(self, template: ChatTemplate, content: str | None, tools: Sequence[Tool]) -> list[RenderedBlock]:
        prompt = tools_system_prompt(tools)
        prefix, suffix = _role(template, "system")
        return [RenderedBlock("system", prefix, f"{content}\n\n{prompt}" if content else prompt, suffix)]

    def results(self, template: ChatTemplate, calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> list[RenderedBlock]:
        prefix, suffix = _role(template, "user")
        text = "\n".join(f"<tool_response>\n{r.content}\n</tool_response>" for r in results)
        return [RenderedBlock("tool", prefix, text, suffix)]


def _role(template: ChatTemplate, role: str) -> tuple[str, str]:
    from plait.lang.errors import ChatTemplateError

    table = template.role_prefix_and_suffix
    if role not in table:
        raise ChatTemplateError(f"chat template {template.name!r} has no {role!r} role, which tools need")
    return table[role]


PLAIN = PlainToolRendering()


def tool_rendering_of(template: ChatTemplate) -> ToolRendering:
    """The template's tool rendering (``ChatTemplate.tools``), or the plain one."""
    rendering = template.tools
    return rendering if isinstance(rendering, ToolRendering) else PLAIN


# ------------------------------------------------------------------------------------------ native
_TOOL, _TOOL2 = "plait_sentinel_tool", "plait_sentinel_other"
_ARGS = {"plait_arg": "PLAITSENTINELVALUE"}
_U, _U2, _SYS, _CONTENT, _RESULT = ("PLAITSENTINELUSER", "PLAITSENTINELUSERTWO", "PLAITSENTINELSYSTEM",
                                    "PLAITSENTINELCONTENT", "PLAITSENTINELRESULT")


def _sentinel_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "PLAITSENTINELDESCRIPTION", "parameters": {
        "type": "object", "properties": {"plait_arg": {"type": "string"}}, "required": ["plait_arg"]}}}


def _assistant(content: str, calls: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in calls]}


def _tool_message(result: ToolResult) -> dict[str, Any]:
    return {"role": "tool", "content": result.content, "tool_call_id": result.call.id, "name": result.call.name}


class NativeToolRendering(ToolRendering):
    """Tools rendered by the model's own chat template, through ``render(messages, tools)``."""

    native = True

    def __init__(self, render: Renderer, syntax: CallSyntax, bos: str) -> None:
        self.render, self.syntax, self.bos = render, syntax, bos

    def declaration(self, template: ChatTemplate, content: str | None, tools: Sequence[Tool]) -> list[RenderedBlock]:
        messages = ([{"role": "system", "content": content}] if content is not None else []) + [
            {"role": "user", "content": _U}]
        text = self.render(messages, [t.chat_dict() for t in tools])
        cut = text.rfind(_role(template, "user")[0] + _U)
        if cut < 0 or not text.startswith(self.bos):
            raise ValueError(f"chat template {template.name!r} rendered the tool declaration unexpectedly")
        return [_split(template, "system", text[len(self.bos):cut], [content] if content else [])]

    def results(self, template: ChatTemplate, calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> list[RenderedBlock]:
        base = [{"role": "user", "content": _U},
                _assistant("", [(c.id, c.name, c.arguments) for c in calls])]
        before = self.render(base, None)
        after = self.render(base + [_tool_message(r) for r in results], None)
        if not after.startswith(before):
            raise ValueError(f"chat template {template.name!r} renders tool results by changing earlier turns")
        return [_split(template, "tool", after[len(before):], [r.content for r in results])]


def _split(template: ChatTemplate, role: str, text: str, contents: Sequence[str]) -> RenderedBlock:
    """``text`` as one block: a system block split at the template's system prefix/suffix; otherwise the
    markup before the first of ``contents`` and after the last is the prefix and suffix."""
    prefix, suffix = template.role_prefix_and_suffix.get("system", ("", ""))
    if role == "system" and prefix and text.startswith(prefix) and text.endswith(suffix):
        return RenderedBlock(role, prefix, text[len(prefix):len(text) - len(suffix)], suffix)
    first, end = -1, 0
    for c in contents:  # each content after the previous one (several results may read the same)
        at = text.find(c, end)
        if at < 0:
            return RenderedBlock(role, "", text, "")
        first, end = at if first < 0 else first, at + len(c)
    if first < 0:
        return RenderedBlock(role, "", text, "")
    return RenderedBlock(role, text[:first], text[first:end], text[end:])


def _call_region(render: Renderer, template: ChatTemplate, content: str,
                 calls: Sequence[tuple[str, str, Any]]) -> str:
    """What the template writes inside an assistant turn with ``content`` and ``calls``."""
    user_prefix, user_suffix = template.role_prefix_and_suffix["user"]
    a_prefix, a_suffix = template.role_prefix_and_suffix["assistant"]
    text = render([{"role": "user", "content": _U}, _assistant(content, calls), {"role": "user", "content": _U2}], None)
    start = text.index(_U + user_suffix + a_prefix) + len(_U + user_suffix + a_prefix)
    end = text.index(a_suffix + user_prefix + _U2, start)
    return text[start:end]


def _derive_syntax(render: Renderer, template: ChatTemplate) -> CallSyntax:
    one = _call_region(render, template, "", [("call_1", _TOOL, _ARGS)])
    name_at = one.find(_TOOL)
    spaced, compact = json.dumps(_ARGS), json.dumps(_ARGS, separators=(",", ":"))
    is_compact = spaced not in one and compact in one
    args = compact if is_compact else spaced
    args_at = one.find(args, name_at)
    if name_at <= 0 or args_at < 0:
        raise ValueError(f"the template writes a tool call as {one!r}, without the name then the JSON arguments")
    syntax = CallSyntax(one[:name_at], one[name_at + len(_TOOL):args_at], one[args_at + len(args):],
                        compact=is_compact)
    try:
        two = _call_region(render, template, "", [("call_1", _TOOL, _ARGS), ("call_2", _TOOL2, _ARGS)])
        second = syntax.render("", [ToolCall("call_2", _TOOL2, _ARGS)])
        first = syntax.render("", [ToolCall("call_1", _TOOL, _ARGS)])
        if not (two.startswith(first) and two.endswith(second) and len(two) >= len(first) + len(second)):
            raise ValueError(two)
        separator, parallel = two[len(first):len(two) - len(second)], True
    except Exception:  # noqa: BLE001 - the template renders one call per turn (Llama 3.1 raises for more)
        separator, parallel = "\n", False
    try:
        with_text = _call_region(render, template, _CONTENT, [("call_1", _TOOL, _ARGS)])
        ok = with_text.startswith(_CONTENT) and with_text.endswith(one)
        content_separator = with_text[len(_CONTENT):len(with_text) - len(one)] if ok else None
    except Exception:  # noqa: BLE001 - the template refuses text beside calls
        content_separator = None
    return CallSyntax(syntax.open, syntax.infix, syntax.close, separator, content_separator, is_compact, parallel)


def native_tool_rendering(template: ChatTemplate, render: Renderer) -> NativeToolRendering | None:
    """The template's own tool rendering, derived from ``render(messages, tools)`` (the model's Jinja
    template, no generation prompt); None when it does not render tools in a form plait can generate:
    the declaration must show the tools before the first user turn, a call must be written as its
    name then its JSON arguments, and results must follow the assistant turn without changing it."""
    if "user" not in template.role_prefix_and_suffix or "assistant" not in template.role_prefix_and_suffix:
        return None
    try:
        user_prefix = template.role_prefix_and_suffix["user"][0]
        plain = render([{"role": "system", "content": _SYS}, {"role": "user", "content": _U}], None)
        declared = render([{"role": "system", "content": _SYS}, {"role": "user", "content": _U}], [_sentinel_tool(_TOOL)])
        if declared == plain or declared.find(_TOOL) < 0 or declared.find(_TOOL) > declared.find(user_prefix + _U):
            return None  # the template ignores tools, or shows them in the user turn
        system_prefix = template.role_prefix_and_suffix.get("system", ("", ""))[0]
        at = plain.find(system_prefix) if system_prefix else 0
        bos = plain[:at] if at > 0 else ""
        rendering = NativeToolRendering(render, _derive_syntax(render, template), bos)
        check = rendering.results(template, [ToolCall("call_1", _TOOL, _ARGS)],
                                  [ToolResult(ToolCall("call_1", _TOOL, _ARGS), _RESULT)])
        if _RESULT not in check[0].content:
            return None
        rendering.declaration(template, _SYS, [Tool.from_openai(_sentinel_tool(_TOOL))])
        rendering.declaration(template, None, [Tool.from_openai(_sentinel_tool(_TOOL))])
        return rendering
    except Exception as exc:  # noqa: BLE001 - any failure: the plain rendering is used, and logged
        logger.info("chat template %r: tools are shown in plait's plain format (%s)", template.name, exc)
        return None


def with_native_tools(template: ChatTemplate, render: Renderer) -> ChatTemplate:
    """``template`` with its own tool rendering attached when ``render`` supports tools (else unchanged)."""
    from dataclasses import replace

    rendering = native_tool_rendering(template, render)
    return replace(template, tools=rendering) if rendering is not None else template

