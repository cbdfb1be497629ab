"""Chat messages (OpenAI's shapes) rendered to prompt text with the model's own chat template.

Messages may carry tool calls (assistant ``tool_calls`` / legacy ``function_call``) and tool results
(role ``tool`` / legacy ``function``). A template that renders tools in the Hermes ``<tool_call>``
format (Qwen2.5, Qwen3, Hermes, ...) gets them as they are, with ``tools=``. For any other template
(SmolLM2's ChatML has no tool support) plait renders them itself, in the format tool calls are
generated in (``tools.py``): the tools go into the system message, calls into the assistant's text,
results into a user turn wrapped in ``<tool_response>``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.server.protocol import RequestError, expect_bool, short_repr
from plait.runtime.server.tools import CALL_OPEN, ToolChoice, render_call, tools_system_prompt

__all__ = ["ChatRenderOptions", "normalize_messages", "render_chat", "render_options"]

_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "continue_final_message",
                                       "tokenize", "chat_template", "documents"})
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_MESSAGE_FIELDS = {
    "system": {"role", "content", "name"}, "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "function_call", "refusal", "audio",
                  "reasoning_content", "reasoning"},
    "tool": {"role", "content", "tool_call_id", "name"}, "function": {"role", "content", "name"},
}


@dataclass(frozen=True)
class ChatRenderOptions:
    """How to render: ``add_generation_prompt``, ``continue_final_message`` and extra template variables
    (``chat_template_kwargs``, plus ``reasoning_effort``)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def render_options(body: dict[str, Any]) -> ChatRenderOptions:
    """The rendering options of a chat request (vLLM's names)."""
    continue_final = expect_bool("continue_final_message", body.get("continue_final_message") or False)
    add = body.get("add_generation_prompt")
    add = (not continue_final) if add is None else expect_bool("add_generation_prompt", add)
    if add and continue_final:
        raise RequestError("continue_final_message=true needs add_generation_prompt=false", param="continue_final_message")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise RequestError(f"chat_template_kwargs may not set {reserved}; use the request's own fields",
                           param="chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise RequestError(f"reasoning_effort must be none, minimal, low, medium, high or xhigh, got "
                               f"{short_repr(effort)}", param="reasoning_effort")
        kwargs = {"reasoning_effort": effort, **kwargs}
    return ChatRenderOptions(add, continue_final, dict(kwargs))


# ------------------------------------------------------------------------------------------ messages
def _text(content: Any, where: str, allow_none: bool = False) -> str | None:
    if content is None and allow_none:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image_url", "input_image", "input_audio", "file", "input_file"):
                raise RequestError(f"{where}: content of type {kind!r} needs a multimodal model; the served "
                                   "model reads text only", param="messages")
            else:
                raise RequestError(f"{where}: only text parts are supported, got {short_repr(part)}", param="messages")
        return "".join(parts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", param="messages")


def _arguments(text: Any, where: str) -> Any:
    """A call's ``arguments`` (a JSON string in OpenAI's API) as the object templates expect."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, str):
        raise RequestError(f"{where}.arguments must be a JSON string", param="messages")
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        raise RequestError(f"{where}.arguments is not valid JSON: {short_repr(text)}", param="messages") from None


def _tool_calls(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    calls = message.get("tool_calls") or []
    if message.get("function_call") is not None:
        calls = [{"id": None, "type": "function", "function": message["function_call"]}]
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", param="messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{where}.tool_calls[{j}] must be {{'type': 'function', 'function': {{'name', "
                               "'arguments'}}}}", param="messages")
        out.append({"id": call.get("id"), "type": "function", "function": {
            "name": function["name"], "arguments": _arguments(function.get("arguments", "{}"), f"{where}.tool_calls[{j}]")}})
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI chat messages; returns plain dicts (``developer`` becomes ``system``, text parts are
    joined, call arguments are parsed). Unknown roles, fields and non-text content are 400s."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("field 'messages' must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", param="messages")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}.role {short_repr(role)} is not one of {', '.join(_ROLES)}", param="messages")
        unknown = sorted(set(message) - _MESSAGE_FIELDS[role])
        if unknown:
            raise RequestError(f"{where} ({role}) has unsupported field(s) {unknown}", param="messages")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role}
        if role == "assistant":
            entry["content"] = _text(message.get("content"), where, allow_none=True)
            calls = _tool_calls(message, where)
            if calls:
                entry["tool_calls"] = calls
            elif entry["content"] is None:
                entry["content"] = ""
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            if isinstance(reasoning, str):
                entry["reasoning_content"] = reasoning
        else:
            entry["content"] = _text(message.get("content"), where)
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise RequestError(f"{where}: a tool message needs 'tool_call_id'", param="messages")
            entry["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------ rendering
@functools.lru_cache(maxsize=8)
def template_variables(template: str) -> frozenset[str]:
    """The variables a Jinja chat template reads (a regex guess if it does not parse with plain Jinja)."""
    import jinja2
    from jinja2 import meta

    try:
        return frozenset(meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateError:  # template extensions plain Jinja lacks: fall back to a textual guess
        return frozenset(re.findall(r"\b([A-Za-z_]\w*)\b", template))


def template_renders_tools(template: str) -> bool:
    """Whether the template renders ``tools`` itself, in the format tool calls are generated in."""
    return "tools" in template_variables(template) and CALL_OPEN in template


def _plain_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls and results as text, for templates that do not render them."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(render_call(c["function"]["name"], c["function"]["arguments"])
                              for c in message["tool_calls"])
            content = message.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role in ("tool", "function"):
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content")})
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _with_tools_in_system(messages: list[dict[str, Any]], choice: ToolChoice) -> list[dict[str, Any]]:
    prompt = tools_system_prompt(choice.tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}] + messages[1:]
    return [{"role": "system", "content": prompt}] + messages


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], choice: ToolChoice | None,
                options: ChatRenderOptions) -> str:
    """The prompt text for ``messages`` (from ``normalize_messages``); tools are shown unless ``none``."""
    template = tokenizer.chat_template if tokenizer is not None else None
    if template is None:
        raise RequestError("this model has no chat template; use /v1/completions or /generate")
    show_tools = choice is not None and choice.mode != "none"
    kwargs = dict(options.template_kwargs)
    if template_renders_tools(template):
        if show_tools:
            kwargs["tools"] = [t.chat_dict() for t in choice.tools]
    else:
        messages = _plain_tool_messages(messages)
        if show_tools:
            messages = _with_tools_in_system(messages, choice)
    try:
        text = tokenizer.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the model's Jinja template refused these messages (raise_exception)
        raise RequestError(f"the model's chat template cannot render these messages: {short_repr(str(exc), 300)}",
                           param="messages") from None
    return str(text)
