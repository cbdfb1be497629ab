"""OpenAI responses and stream chunks for ``/v1/completions`` and ``/v1/chat/completions``.

A chat answer's text goes through a ``ChatOutput`` per choice: the reasoning parser (``--reasoning-parser``)
splits off ``reasoning_content``, then the tool-call parser splits off ``tool_calls``. Streamed, a tool
call comes as OpenAI streams it: a chunk with ``index``, ``id``, ``type`` and ``function.name`` (empty
``arguments``), then chunks of ``function.arguments`` pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plait.runtime.server.protocol import LogprobText
from plait.runtime.server.reasoning import ReasoningParser, make_reasoning_parser
from plait.runtime.server.tools import ToolCallParser, ToolCallPiece, ToolChoice

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


_SCHEMA_KEYS = ("schema_relaxed", "schema_attempts", "schema_valid", "schema_error")


def schema_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """A relaxed JSON schema's report (docs/constrained.md, "Relaxed schemas"), added to a finished choice
    next to ``matched_stop``; empty for every other request."""
    return {k: meta[k] for k in _SCHEMA_KEYS if k in meta}


def finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else _FINISH.get(reason.get("type"), reason.get("type"))


@dataclass
class ChatDelta:
    """What one piece of output text added: answer text, reasoning text and tool-call pieces."""

    content: str = ""
    reasoning: str = ""
    pieces: list[ToolCallPiece] = field(default_factory=list)


class ChatOutput:
    """One chat choice's output, read incrementally: reasoning, then answer text and tool calls."""

    def __init__(self, reasoning_parser: str | None, prompt: str, tools: ToolChoice | None):
        self.reasoning: ReasoningParser | None = (
            make_reasoning_parser(reasoning_parser, prompt) if reasoning_parser else None)
        self.tools = ToolCallParser() if tools is not None and tools.mode != "none" else None
        self.reasoning_text = ""

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        """Feed the next text; ``final``: the output ended, release everything held back."""
        out = ChatDelta()
        if self.reasoning is not None:
            split = self.reasoning.feed(text)
            if final:
                split.add(self.reasoning.finish())
            out.reasoning, answer = split.reasoning, split.content
        else:
            answer = text
        self.reasoning_text += out.reasoning
        if self.tools is None:
            out.content = answer
            return out
        out.content, out.pieces = self.tools.feed(answer)
        if final:
            out.content += self.tools.finish()[0]
        return out

    @property
    def calls(self) -> list[Any]:
        return self.tools.calls if self.tools is not None else []

    def message(self, text: str, legacy: bool) -> dict[str, Any]:
        """The whole assistant message for ``text`` (non-streamed)."""
        delta = self.feed(text, final=True)
        message: dict[str, Any] = {"role": "assistant", "content": delta.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning_text or None
        calls = self.calls
        if calls:
            if not delta.content.strip():
                message["content"] = None
            if legacy:
                message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
            else:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return message


def chat_logprobs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    tops = meta.get("output_top_logprobs") or []
    content = []
    for i, (lp, _tid, text) in enumerate(meta.get("output_token_logprobs", [])):
        top = tops[i] if i < len(tops) and tops[i] is not None else []
        content.append({
            "token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for v, _, t in top],
        })
    return content


class CompletionLogprobs:
    """Builds the legacy completions ``logprobs`` object, keeping text offsets across stream chunks."""

    def __init__(self) -> None:
        self.offset = 0

    def build(self, entries: list, tops: list) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, (lp, _tid, text) in enumerate(entries):
            top = tops[i] if i < len(tops) else None
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {t: v for v, _, t in top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def _tool_call_delta(piece: ToolCallPiece, legacy: bool) -> dict[str, Any]:
    if legacy:
        return {"function_call": {"name": piece.name, "arguments": ""} if piece.name is not None
                else {"arguments": piece.arguments}}
    if piece.name is not None:
        entry = {"index": piece.index, "id": piece.id, "type": "function",
                 "function": {"name": piece.name, "arguments": ""}}
    else:
        entry = {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"tool_calls": [entry]}


class ResponseBuilder:
    """Turns engine events of one ``OpenAIRequest`` into OpenAI responses and stream chunks."""

    def __init__(self, request: Any, texts: LogprobText):
        self.req, self.texts = request, texts
        self.kind = "chat.completion" if request.chat else "text_completion"
        self.started: set[int] = set()
        self.offsets: dict[int, CompletionLogprobs] = {}
        self.outputs: dict[int, ChatOutput] = {}
        self.usage_parts: dict[int, dict[str, Any]] = {}

    def choice_index(self, job_index: int, sample: int) -> int:
        return job_index * self.req.n + sample

    def _header(self, chunk: bool) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.req.chat else "cmpl-"
        obj = self.kind + (".chunk" if chunk and self.req.chat else "")
        return {"id": prefix + self.req.id, "object": obj, "created": self.req.created, "model": self.req.model}

    def _output(self, index: int) -> ChatOutput:
        if index not in self.outputs:
            self.outputs[index] = ChatOutput(self.req.reasoning_parser, self.req.prompt_text, self.req.tools)
        return self.outputs[index]

    def _logprobs(self, index: int, job_index: int, meta: dict[str, Any], first: bool) -> Any:
        if self.req.logprobs is None:
            return None
        meta = self.texts.decorate(meta, True)
        if self.req.chat:
            return {"content": chat_logprobs(meta)}
        builder = self.offsets.setdefault(index, CompletionLogprobs())
        entries, tops = meta.get("output_token_logprobs", []), meta.get("output_top_logprobs") or []
        if first and self.req.echo_texts is not None:
            entries = meta.get("input_token_logprobs", []) + entries
            tops = (meta.get("input_top_logprobs") or [None] * len(meta.get("input_token_logprobs", []))) + tops
        return builder.build(entries, tops)

    def record_usage(self, job_index: int, sample: int, meta: dict[str, Any]) -> None:
        self.usage_parts[self.choice_index(job_index, sample)] = meta

    def usage(self) -> dict[str, Any]:
        """Prompt and cached tokens count once per prompt (sample 0); completion tokens for every sample."""
        parts = self.usage_parts
        prompt = sum(m.get("prompt_tokens", 0) for i, m in parts.items() if i % self.req.n == 0)
        cached = sum(m.get("cached_tokens", 0) for i, m in parts.items() if i % self.req.n == 0)
        completion = sum(m.get("completion_tokens", 0) for m in parts.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _finish(self, index: int, meta: dict[str, Any]) -> str | None:
        reason = finish_reason(meta)
        if reason == "stop" and self.req.chat and index in self.outputs and self.outputs[index].calls:
            return "function_call" if self.req.tools.legacy else "tool_calls"
        return reason

    def choice(self, job_index: int, event: Any) -> dict[str, Any]:
        """One choice of the non-streamed response: a whole finished output."""
        index = self.choice_index(job_index, event.index)
        first = index not in self.started
        self.started.add(index)
        choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(index, job_index, event.meta_info, first)}
        if self.req.chat:
            legacy = self.req.tools is not None and self.req.tools.legacy
            choice["message"] = self._output(index).message(event.text, legacy)
        else:
            echo = self.req.echo_texts[job_index] if self.req.echo_texts is not None else ""
            choice["text"] = echo + event.text
        choice["finish_reason"] = self._finish(index, event.meta_info)
        choice["matched_stop"] = (event.meta_info.get("finish_reason") or {}).get("matched")
        choice.update(schema_fields(event.meta_info))
        self.record_usage(job_index, event.index, event.meta_info)
        return choice

    def chunks(self, job_index: int, event: Any) -> list[dict[str, Any]]:
        """The stream chunks for one engine event (none while text is held back)."""
        index = self.choice_index(job_index, event.index)
        first = index not in self.started
        self.started.add(index)
        logprobs = self._logprobs(index, job_index, event.meta_info, first)
        if not self.req.chat:
            text = event.text_delta
            if first and self.req.echo_texts is not None:
                text = self.req.echo_texts[job_index] + text
            deltas = [{"text": text}]
        else:
            deltas = self._chat_deltas(index, event, first, logprobs is not None)
        if event.finished:
            self.record_usage(job_index, event.index, event.meta_info)
        out = []
        for i, delta in enumerate(deltas):
            choice = {"index": index, **delta, "logprobs": logprobs if i == 0 else None, "finish_reason": None}
            out.append({**self._header(True), "choices": [choice]})
        if event.finished:
            last = out[-1]["choices"][0]
            last["finish_reason"] = self._finish(index, event.meta_info)
            last["matched_stop"] = (event.meta_info.get("finish_reason") or {}).get("matched")
            last.update(schema_fields(event.meta_info))
        if self.req.continuous_usage:
            for chunk in out:
                chunk["usage"] = self._running_usage(event.meta_info)
        return out

    def _chat_deltas(self, index: int, event: Any, first: bool, has_logprobs: bool) -> list[dict[str, Any]]:
        delta = self._output(index).feed(event.text_delta, final=event.finished)
        legacy = self.req.tools is not None and self.req.tools.legacy
        head: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if delta.reasoning:
            head["reasoning_content"] = delta.reasoning
        if delta.content:
            head["content"] = delta.content
        deltas = [{"delta": head}] if head or has_logprobs else []
        deltas += [{"delta": _tool_call_delta(p, legacy)} for p in delta.pieces]
        if event.finished and not deltas:
            deltas = [{"delta": {}}]
        return deltas

    @staticmethod
    def _running_usage(meta: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = meta.get("prompt_tokens", 0), meta.get("completion_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._header(True), "choices": [], "usage": self.usage()}

    def response(self, finals: list[tuple[int, Any]]) -> dict[str, Any]:
        """The non-streamed response from every finished ``(job_index, event)``."""
        choices = sorted((self.choice(j, e) for j, e in finals), key=lambda c: c["index"])
        return {**self._header(False), "choices": choices, "usage": self.usage()}
