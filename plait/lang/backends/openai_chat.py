"""Chat markup for OpenAI-compatible chat models: render role blocks as text and parse them back.

The language renders a program's roles into one prompt string through the backend's chat template,
and ``GenerateCall`` carries that string. A chat completions API needs a list of messages instead,
so the OpenAI backend renders roles with a reversible ChatML markup (``CHAT_MARKUP``) and
``parse_chat_prompt`` turns the prompt back into messages. A prompt without the markup is a plain
completion prompt.

Tools (``call_tools`` on this backend) travel through the chat API's own ``tools`` field; the markup
keeps what the API needs to see them again: the calls an assistant turn made (``render_api_calls``:
``<tool_call>`` blocks holding the API's id, name and arguments text) and tool result blocks
(``<|im_start|>tool <call id>``), which ``chat_messages_for_generation`` turns back into assistant
``tool_calls`` and ``role: "tool"`` messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from plait.lang.backends.base import BackendCapabilityError, ChatTemplate
from plait.lang.tool_format import RenderedBlock, ToolRendering
from plait.lang.tools import Tool, ToolCall, ToolResult

ROLES = ("system", "user", "assistant")
_BEGIN, _END = "<|im_start|>", "<|im_end|>"
_CALL = re.compile(r"\n?<tool_call>\n(\{.*?\})\n</tool_call>", re.DOTALL)


class ApiToolRendering(ToolRendering):
    """Tools for a chat API with a ``tools`` field: declared there (not in the text), results as
    ``tool`` blocks that name their call id."""

    uses_api = True

    def declaration(self, template: ChatTemplate, content: str | None, tools: Sequence[Tool]) -> list[RenderedBlock]:
        prefix, suffix = template.role_prefix_and_suffix["system"]
        return [] if content is None else [RenderedBlock("system", prefix, content, suffix)]

    def results(self, template: ChatTemplate, calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> list[RenderedBlock]:
        return [RenderedBlock("tool", f"{_BEGIN}tool {r.call.id}\n", r.content, f"{_END}\n") for r in results]


CHAT_MARKUP = ChatTemplate(
    name="openai-chat",
    role_prefix_and_suffix={role: (f"{_BEGIN}{role}\n", f"{_END}\n") for role in ROLES},
    default_system_prompt=None,
    stop_str=(_END,),
    tools=ApiToolRendering(),
)

_BLOCK = re.compile(r"<\|im_start\|>(system|user|assistant|tool)(?: ([^\n]*))?\n(.*?)<\|im_end\|>\n?", re.DOTALL)
_OPEN = re.compile(r"<\|im_start\|>(system|user|assistant)\n", re.DOTALL)


def render_api_calls(content: str, calls: Sequence[dict[str, Any]]) -> str:
    """An assistant turn with ``calls`` (``{"id", "name", "arguments"}``, arguments as the API's text) in
    the markup: the content, then one ``<tool_call>`` block per call."""
    blocks = [f"<tool_call>\n{json.dumps({'id': c['id'], 'name': c['name'], 'arguments': c['arguments']})}\n</tool_call>"
              for c in calls]
    return "\n".join([content, *blocks] if content else blocks)


def _assistant_message(content: str) -> dict[str, Any]:
    """An assistant message; ``<tool_call>`` blocks written by ``render_api_calls`` become ``tool_calls``."""
    calls = []
    for match in _CALL.finditer(content):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            call = None
        if not isinstance(call, dict) or set(call) != {"id", "name", "arguments"}:
            return {"role": "assistant", "content": content}  # not the markup's calls: plain text
        calls.append({"id": call["id"], "type": "function",
                      "function": {"name": call["name"], "arguments": call["arguments"]}})
    if not calls:
        return {"role": "assistant", "content": content}
    text = _CALL.sub("", content)
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


@dataclass
class ChatPrompt:
    """A prompt parsed into closed ``messages`` plus the role block left open at its end, if any."""

    messages: list[dict[str, Any]]
    open_role: str | None
    open_text: str


def has_chat_markup(prompt: str) -> bool:
    """Whether ``prompt`` contains role blocks rendered with ``CHAT_MARKUP``."""
    return _OPEN.search(prompt) is not None


def parse_chat_prompt(prompt: str) -> ChatPrompt:
    """Split a prompt rendered with ``CHAT_MARKUP`` into messages.

    Raises ``BackendCapabilityError`` when text stands outside the role blocks (a chat API has no
    place for it).
    """
    messages: list[dict[str, Any]] = []
    pos = 0
    for block in _BLOCK.finditer(prompt):
        _reject_stray_text(prompt[pos : block.start()])
        role, header, content = block.group(1), block.group(2), block.group(3)
        if role == "tool":
            messages.append({"role": "tool", "tool_call_id": header or "", "content": content})
        elif role == "assistant":
            messages.append(_assistant_message(content))
        else:
            messages.append({"role": role, "content": content})
        pos = block.end()
    rest = prompt[pos:]
    opened = _OPEN.search(rest)
    if opened is None:
        _reject_stray_text(rest)
        return ChatPrompt(messages, None, "")
    _reject_stray_text(rest[: opened.start()])
    return ChatPrompt(messages, opened.group(1), rest[opened.end() :])


def chat_messages_for_generation(prompt: str) -> list[dict[str, Any]]:
    """The messages to send to a chat completions API for a ``gen`` at the end of ``prompt``.

    The generation must start right after an open assistant block (as in SGLang's OpenAI backend) or
    after a closed message; an assistant block with text already in it cannot be continued by a chat
    API, and neither can a gen inside a system or user block.
    """
    parsed = parse_chat_prompt(prompt)
    if parsed.open_role is None:
        return parsed.messages
    if parsed.open_role != "assistant":
        raise BackendCapabilityError(
            f"a chat completions API generates assistant messages only, but this gen is inside a "
            f"{parsed.open_role} block; put the gen inside assistant(...)"
        )
    if parsed.open_text:
        raise BackendCapabilityError(
            "a chat completions API cannot continue a partly written assistant message "
            f"(the assistant block already holds {parsed.open_text[:40]!r}); put the gen first in the "
            "assistant block, or use a completions model (OpenAI(..., api='completions')) or a "
            "Runtime/Endpoint backend"
        )
    return parsed.messages


def _reject_stray_text(text: str) -> None:
    if text.strip():
        raise BackendCapabilityError(
            f"text outside any role block ({text.strip()[:40]!r}) cannot be sent to a chat completions "
            "API; put it inside system/user/assistant, or use api='completions'"
        )
