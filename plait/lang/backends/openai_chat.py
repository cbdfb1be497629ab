"""Chat markup for OpenAI-compatible chat models: render role blocks as text and parse them back.

The language renders a program's roles into one prompt string through the backend's chat template,
and ``GenerateCall`` carries that string. A chat completions API needs a list of messages instead,
so the OpenAI backend renders roles with a reversible ChatML markup (``CHAT_MARKUP``) and
``parse_chat_prompt`` turns the prompt back into messages. A prompt without the markup is a plain
completion prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from plait.lang.backends.base import BackendCapabilityError, ChatTemplate

ROLES = ("system", "user", "assistant")
_BEGIN, _END = "<|im_start|>", "<|im_end|>"

CHAT_MARKUP = ChatTemplate(
    name="openai-chat",
    role_prefix_and_suffix={role: (f"{_BEGIN}{role}\n", f"{_END}\n") for role in ROLES},
    default_system_prompt=None,
    stop_str=(_END,),
)

_BLOCK = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n?", re.DOTALL)
_OPEN = re.compile(r"<\|im_start\|>(system|user|assistant)\n", re.DOTALL)


@dataclass
class ChatPrompt:
    """A prompt parsed into closed ``messages`` plus the role block left open at its end, if any."""

    messages: list[dict[str, str]]
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
    messages: list[dict[str, str]] = []
    pos = 0
    for block in _BLOCK.finditer(prompt):
        _reject_stray_text(prompt[pos : block.start()])
        messages.append({"role": block.group(1), "content": block.group(2)})
        pos = block.end()
    rest = prompt[pos:]
    opened = _OPEN.search(rest)
    if opened is None:
        _reject_stray_text(rest)
        return ChatPrompt(messages, None, "")
    _reject_stray_text(rest[: opened.start()])
    return ChatPrompt(messages, opened.group(1), rest[opened.end() :])


def chat_messages_for_generation(prompt: str) -> list[dict[str, str]]:
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
