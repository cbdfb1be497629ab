"""Building Responses API objects and their stream events (the typed events of the ``openai`` package).

A stream is ``response.created``, ``response.in_progress``, then per output item ``response.output_item.added``,
its deltas (``response.reasoning_text.delta``, ``response.output_text.delta`` inside a content part, or
``response.function_call_arguments.delta``), its ``...done`` events and ``response.output_item.done``, and
finally ``response.completed`` (or ``response.incomplete`` after ``max_output_tokens``) with the whole
response. Every event carries a ``sequence_number``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from plait.runtime.server.openai_output import ChatOutput, chat_logprobs, finish_reason
from plait.runtime.server.protocol import LogprobText


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseAssembler:
    """Output items and events of one Responses request (``responses.ResponsesRequest``)."""

    def __init__(self, parsed: Any, texts: LogprobText):
        self.parsed, self.texts = parsed, texts
        chat = parsed.chat
        self.output = ChatOutput(chat.reasoning_parser, chat.prompt_text, chat.tools)
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.sequence = 0
        self.content = ""
        self.pending_space = ""  # leading whitespace of a message, held until text follows
        self.logprobs: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ response objects
    def _tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "name": t["name"], "description": t.get("description"),
                 "parameters": t.get("parameters"), "strict": t.get("strict", True)}
                for t in self.parsed.body.get("tools") or []]

    def body(self, status: str, meta: dict[str, Any] | None) -> dict[str, Any]:
        """The response object (``meta``: the final engine meta_info, for usage)."""
        request = self.parsed.body
        tools = self.parsed.chat.tools
        incomplete = status == "incomplete"
        usage = None
        if meta is not None:
            prompt, completion = meta.get("prompt_tokens", 0), meta.get("completion_tokens", 0)
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": meta.get("cached_tokens", 0),
                                                                      "cache_write_tokens": 0},
                     "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + completion}
        reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else {}
        return {
            "id": self.parsed.id, "object": "response", "created_at": int(self.parsed.created_at),
            "status": status, "completed_at": int(time.time()) if meta is not None else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
            "model": self.parsed.chat.model, "output": list(self.items),
            "parallel_tool_calls": tools.parallel if tools is not None else True,
            "previous_response_id": request.get("previous_response_id"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": None},
            "store": self.parsed.store, "temperature": request.get("temperature", 1.0),
            "text": request.get("text") or {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice") or "auto", "tools": self._tools(),
            "top_p": request.get("top_p", 1.0), "truncation": "disabled", "usage": usage,
            "metadata": request.get("metadata") or {}, "background": False,
        }

    def message(self) -> dict[str, Any]:
        """The assistant turn as a chat message (what a follow-up's ``previous_response_id`` continues)."""
        calls = self.output.calls
        message: dict[str, Any] = {"role": "assistant", "content": self.content if self.content.strip() or not calls
                                   else None}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                                   "arguments": c.arguments}}
                                     for c in calls]
        return message

    def finish(self, event: Any) -> dict[str, Any]:
        """The whole response for a finished (non-streamed) output."""
        status = self._status(event.meta_info)
        item_status = "incomplete" if status == "incomplete" else "completed"
        whole = self.output.message(event.text, legacy=False)
        self.content = whole["content"] or ""
        if self.parsed.chat.logprobs is not None:
            self.logprobs = chat_logprobs(self.texts.decorate(event.meta_info, True))
        if whole.get("reasoning_content"):
            self.items.append(self._reasoning_item(whole["reasoning_content"], item_status))
        if self.content.strip() or not self.output.calls:
            self.items.append(self._message_item(self.content, item_status))
        for call in self.output.calls:  # a call cut by max_output_tokens is the only incomplete one
            self.items.append(self._call_item(new_id("fc"), call, "completed" if call.complete else "incomplete"))
        return self.body(status, event.meta_info)

    @staticmethod
    def _status(meta: dict[str, Any]) -> str:
        return "incomplete" if finish_reason(meta) == "length" else "completed"

    def _reasoning_item(self, text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
        return {"id": item_id or new_id("rs"), "type": "reasoning", "summary": [],
                "content": [{"type": "reasoning_text", "text": text}], "status": status}

    def _message_item(self, text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs}
        return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant", "status": status,
                "content": [part] if text or status != "in_progress" else []}

    @staticmethod
    def _call_item(item_id: str, call: Any, status: str) -> dict[str, Any]:
        return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
                "arguments": call.arguments, "status": status}

    # ------------------------------------------------------------------ streaming
    def error_event(self, code: str, message: str) -> str:
        """The API's ``error`` event: the stream ends here (the engine died, the shutdown deadline passed)."""
        return self._event("error", code=code, message=message, param=None)

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def _open(self, kind: str, item: dict[str, Any], call: Any = None) -> list[str]:
        out = self._close("completed")
        self.open = {"kind": kind, "item": item, "index": len(self.items), "text": "", "call": call}
        out.append(self._event("response.output_item.added", output_index=len(self.items), item=item))
        if kind in ("message", "reasoning"):
            part = ({"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "message"
                    else {"type": "reasoning_text", "text": ""})
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=len(self.items),
                                   content_index=0, part=part))
        return out

    def _close(self, status: str) -> list[str]:
        if self.open is None:
            return []
        kind, item, index, text = self.open["kind"], self.open["item"], self.open["index"], self.open["text"]
        ids = {"item_id": item["id"], "output_index": index}
        out = []
        if kind == "message":
            done = self._message_item(text, status, item["id"])
            out.append(self._event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", **ids, content_index=0, part=done["content"][0]))
        elif kind == "reasoning":
            done = self._reasoning_item(text, status, item["id"])
            out.append(self._event("response.reasoning_text.done", **ids, content_index=0, text=text))
            out.append(self._event("response.content_part.done", **ids, content_index=0, part=done["content"][0]))
        else:
            call = self.open["call"]
            done = self._call_item(item["id"], call, "completed" if call.complete else "incomplete")
            out.append(self._event("response.function_call_arguments.done", **ids, arguments=done["arguments"],
                                   name=done["name"]))
        out.append(self._event("response.output_item.done", output_index=index, item=done))
        self.items.append(done)
        self.open = None
        return out

    def _feed(self, text: str, final: bool, logprobs: list[dict[str, Any]]) -> list[str]:
        delta = self.output.feed(text, final=final)
        out: list[str] = []
        if delta.reasoning:
            if self.open is None or self.open["kind"] != "reasoning":
                out += self._open("reasoning", self._reasoning_item("", "in_progress"))
            self.open["text"] += delta.reasoning
            out.append(self._event("response.reasoning_text.delta", item_id=self.open["item"]["id"],
                                   output_index=self.open["index"], content_index=0, delta=delta.reasoning))
        if delta.content:
            out += self._content(delta.content, logprobs)
        for piece in delta.pieces:
            if piece.name is not None:
                call = self.output.calls[piece.index]
                out += self._open("function_call", self._call_item(new_id("fc"), call, "in_progress") | {"arguments": ""},
                                  call)
            else:
                out.append(self._event("response.function_call_arguments.delta", item_id=self.open["item"]["id"],
                                       output_index=self.open["index"], delta=piece.arguments))
        return out

    def _content(self, text: str, logprobs: list[dict[str, Any]]) -> list[str]:
        out: list[str] = []
        if self.open is None or self.open["kind"] != "message":
            if not (self.pending_space + text).strip():
                self.pending_space += text  # whitespace before a tool call opens no message
                return out
            text, self.pending_space = self.pending_space + text, ""
            out += self._open("message", self._message_item("", "in_progress"))
        self.open["text"] += text
        self.content += text
        out.append(self._event("response.output_text.delta", item_id=self.open["item"]["id"],
                               output_index=self.open["index"], content_index=0, delta=text, logprobs=logprobs))
        return out

    async def stream(self, streams: list[Any], state: Any,
                     remember: Callable[[dict[str, Any]], None]) -> AsyncIterator[str]:
        """The SSE events of a streamed response; ``remember`` stores the final response object."""
        from plait.runtime.server.streams import merged

        yield self._event("response.created", response=self.body("in_progress", None))
        yield self._event("response.in_progress", response=self.body("in_progress", None))
        async for _, event in merged(streams):
            logprobs = []
            if self.parsed.chat.logprobs is not None:
                logprobs = chat_logprobs(self.texts.decorate(event.meta_info, True))
                self.logprobs += logprobs
            for text in self._feed(event.text_delta, event.finished, logprobs):
                yield text
            if not event.finished:
                continue
            state.metrics.output_finished(event.meta_info)
            status = self._status(event.meta_info)
            if not self.items and self.open is None:
                for text in self._open("message", self._message_item("", "in_progress")):
                    yield text
            for text in self._close("incomplete" if status == "incomplete" else "completed"):
                yield text
            body = self.body(status, event.meta_info)
            remember(body)
            kind = "response.incomplete" if status == "incomplete" else "response.completed"
            yield self._event(kind, response=body)
