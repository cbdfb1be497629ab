"""What the router reads from a request body to route it: its routing text and its affinity key.

Bodies are parsed JSON (the router forwards the original bytes unchanged). Both functions are cheap
and bounded: the text is built only up to ``max_chars`` characters.
"""

from __future__ import annotations

import json
from typing import Any

AFFINITY_FIELDS = ("program_id", "session_id")  # plait's program runs; SGLang's session_id names the same


def affinity_key(body: Any) -> str | None:
    """The program run a request belongs to (``program_id``, else ``session_id``), or None."""
    if not isinstance(body, dict):
        return None
    for name in AFFINITY_FIELDS:
        value = body.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def routing_text(body: Any, max_chars: int) -> str:
    """The start of the request's prompt as one string (at most ``max_chars`` characters; "" if none).

    ``text`` / ``prompt`` (a string, or the first of a list), ``input_ids`` (token ids written as
    ``"1,2,3,"``), chat ``messages`` (each ``role`` and content, in order: a stable rendering, not the
    model's template) or the Responses API's ``instructions`` and ``input``.
    """
    if not isinstance(body, dict):
        return ""
    parts = _Parts(max_chars)
    for name in ("text", "prompt"):
        value = body.get(name)
        if isinstance(value, list) and value and not isinstance(value[0], int):
            value = value[0]  # a batch: routed by its first prompt
        if isinstance(value, str):
            parts.add(value)
        elif isinstance(value, list):
            _add_ids(parts, value)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids:
        _add_ids(parts, ids[0] if isinstance(ids[0], list) else ids)
    if isinstance(body.get("instructions"), str):
        parts.add("\x1dinstructions\x1f" + body["instructions"])
    for name in ("messages", "input"):
        value = body.get(name)
        if isinstance(value, str):
            parts.add(value)
        elif isinstance(value, list):
            for message in value:
                if parts.full:
                    break
                _add_message(parts, message)
    return parts.text()


class _Parts:
    def __init__(self, max_chars: int):
        self.max_chars, self.chunks, self.length = max_chars, [], 0

    @property
    def full(self) -> bool:
        return self.length >= self.max_chars

    def add(self, text: str) -> None:
        if not self.full:
            piece = text[:self.max_chars - self.length]
            self.chunks.append(piece)
            self.length += len(piece)

    def text(self) -> str:
        return "".join(self.chunks)


def _add_ids(parts: _Parts, ids: list[Any]) -> None:
    for token in ids:
        if parts.full:
            return
        parts.add(f"{token},")


def _add_message(parts: _Parts, message: Any) -> None:
    if not isinstance(message, dict):
        parts.add(_stable(message))
        return
    parts.add(f"\x1e{message.get('role', message.get('type', ''))}\x1f")
    content = message.get("content")
    if isinstance(content, str):
        parts.add(content)
    elif isinstance(content, list):
        for part in content:
            if parts.full:
                return
            text = part.get("text") if isinstance(part, dict) else None
            parts.add(text if isinstance(text, str) else _stable(part))
    elif content is not None:
        parts.add(_stable(content))
    for name in ("tool_calls", "tool_call_id", "name", "arguments", "output"):
        if name in message and not parts.full:
            parts.add(_stable(message[name]))


def _stable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
