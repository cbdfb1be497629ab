"""Separating a reasoning model's reasoning from its answer, streamed or whole.

Shared by the server (``--reasoning-parser NAME`` on ``plait serve``) and the language
(``pl.separate_reasoning(expr, model_type=NAME)``); no dependency beyond the standard library. ``NAME`` is
one of ``PARSERS``:

- ``qwen3``: ``<think>...</think>`` then the answer. Output that opens no ``<think>`` is all answer,
  unless the prompt already opened one (templates that end the generation prompt with ``<think>``).
- ``deepseek-r1``: like ``qwen3``, but the output starts inside the reasoning (DeepSeek-R1's template
  opens ``<think>`` in the prompt); a leading ``<think>`` in the output is dropped.
- ``gpt-oss``: the harmony channels: ``<|channel|>analysis<|message|>...<|end|>`` is reasoning,
  ``<|start|>assistant<|channel|>final<|message|>...`` the answer. It reads special tokens, so requests
  are decoded with ``skip_special_tokens=False``.

A parser is fed text deltas in order and returns ``(reasoning, content)`` deltas. It holds back a
tail that could be the start of a marker, so a marker split across deltas is never shown as text;
``finish()`` releases what is held back. Feeding the whole text at once gives the same split as
feeding it piece by piece.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PARSERS", "ReasoningParser", "ReasoningSplit", "make_reasoning_parser"]


@dataclass
class ReasoningSplit:
    """Text split into reasoning and answer (either may be empty)."""

    reasoning: str = ""
    content: str = ""

    def add(self, other: ReasoningSplit) -> None:
        self.reasoning += other.reasoning
        self.content += other.content


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


class ReasoningParser:
    """Splits ``<think>``-style output: reasoning between ``start`` and ``end``, the rest is the answer.

    ``in_reasoning``: the output starts inside the reasoning (the prompt opened it).
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", in_reasoning: bool = False):
        self.start, self.end = start, end
        self.in_reasoning = in_reasoning
        self.at_start = True  # nothing but whitespace seen yet (where a start marker may open reasoning)
        self.done = False  # the reasoning ended: everything after is the answer
        self.strip_newlines = False  # drop the newlines between the end marker and the answer
        self.pending = ""

    def feed(self, delta: str) -> ReasoningSplit:
        """The reasoning and answer text that ``delta`` makes safe to show."""
        self.pending += delta
        out = ReasoningSplit()
        while self.pending:
            if not self._step(out):
                break
        return out

    def finish(self) -> ReasoningSplit:
        """Whatever is still held back (the output ended)."""
        out = ReasoningSplit()
        text, self.pending = self.pending, ""
        if self.in_reasoning and not self.done:
            out.reasoning += text
        elif not self.strip_newlines:
            out.content += text
        return out

    def _step(self, out: ReasoningSplit) -> bool:
        """Consume part of ``pending``; False when the rest must wait for more text."""
        if self.done:
            if self.strip_newlines:
                self.pending = self.pending.lstrip("\n")
                self.strip_newlines = not self.pending
            out.content += self.pending
            self.pending = ""
            return False
        if self.in_reasoning:
            return self._in_reasoning(out)
        if self.at_start:
            stripped = self.pending.lstrip()
            if stripped.startswith(self.start):
                self.pending = stripped[len(self.start):]
                self.in_reasoning, self.at_start = True, False
                return True
            if not stripped or self.start.startswith(stripped):
                return False  # could still become the start marker
            self.at_start = False
        self.done = True  # no reasoning block: all answer
        return True

    def _in_reasoning(self, out: ReasoningSplit) -> bool:
        if self.at_start:  # a start marker repeated in the output after the prompt opened it
            stripped = self.pending.lstrip()
            if stripped.startswith(self.start):
                self.pending = stripped[len(self.start):]
            elif not stripped or self.start.startswith(stripped):
                return False
            self.at_start = False
        index = self.pending.find(self.end)
        if index >= 0:
            out.reasoning += self.pending[:index]
            self.pending = self.pending[index + len(self.end):]
            self.in_reasoning, self.done, self.strip_newlines = False, True, True
            return bool(self.pending)
        keep = _partial_marker_len(self.pending, (self.end,))
        out.reasoning += self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return False


_HARMONY_HEADER = re.compile(r"<\|channel\|>(.*?)<\|message\|>", re.DOTALL)
_HARMONY_MARKERS = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>", "<|call|>")


class HarmonyReasoningParser(ReasoningParser):
    """GPT-OSS's harmony format: the ``analysis`` channel is reasoning, other channels the answer.

    Headers (``<|start|>assistant<|channel|>NAME<|message|>``) and ends (``<|end|>``, ``<|return|>``,
    ``<|call|>``) are removed. Text before any channel header counts as answer.
    """

    def __init__(self) -> None:
        super().__init__("<|channel|>", "<|end|>")
        self.channel: str | None = None

    def feed(self, delta: str) -> ReasoningSplit:
        self.pending += delta
        out = ReasoningSplit()
        while self.pending:
            start = self.pending.find("<|")
            if start < 0:
                keep = 1 if self.pending.endswith("<") else 0
                self._emit(out, self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            self._emit(out, self.pending[:start])
            self.pending = self.pending[start:]
            outcome = self._marker()
            if outcome == "incomplete":
                break
            if outcome == "text":  # "<|" that starts no marker is plain text
                self._emit(out, self.pending[:2])
                self.pending = self.pending[2:]
        return out

    def finish(self) -> ReasoningSplit:
        out = ReasoningSplit()
        self._emit(out, self.pending)
        self.pending = ""
        return out

    def _emit(self, out: ReasoningSplit, text: str) -> None:
        if self.channel == "analysis":
            out.reasoning += text
        else:
            out.content += text

    def _marker(self) -> str:
        """Consume the marker at the start of ``pending``: "marker", "incomplete" or "text"."""
        header = _HARMONY_HEADER.match(self.pending)
        if header:
            words = header.group(1).split()
            self.channel = words[0] if words else ""
            self.pending = self.pending[header.end():]
            return "marker"
        if self.pending.startswith("<|channel|>"):
            return "incomplete"  # a header still arriving
        for marker in _HARMONY_MARKERS:
            if not self.pending.startswith(marker):
                continue
            rest = self.pending[len(marker):]
            if marker == "<|start|>":  # the role name that follows ("assistant") is not text
                role_end = rest.find("<|")
                if role_end < 0:
                    return "incomplete"
                rest = rest[role_end:]
            elif marker == "<|end|>":
                self.channel = None
            self.pending = rest
            return "marker"
        if _partial_marker_len(self.pending, _HARMONY_MARKERS) == len(self.pending):
            return "incomplete"
        return "text"


PARSERS = ("qwen3", "deepseek-r1", "gpt-oss")


def make_reasoning_parser(name: str, prompt: str = "") -> ReasoningParser:
    """A fresh parser for one output. ``prompt``: the rendered prompt (it may have opened ``<think>``)."""
    if name == "gpt-oss":
        return HarmonyReasoningParser()
    if name == "qwen3":
        opened = prompt.rfind("<think>") > prompt.rfind("</think>")
        return ReasoningParser(in_reasoning=opened)
    if name == "deepseek-r1":
        return ReasoningParser(in_reasoning=True)
    raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(PARSERS)}")
