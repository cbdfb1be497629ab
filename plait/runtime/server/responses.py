"""The Responses API (``POST /v1/responses``, the OpenAI Agents SDK's default) and the embeddings answer.

A Responses request becomes a chat request (``openai_api.chat_request``): ``instructions`` is the system
message, ``input`` (text, or message / ``function_call`` / ``function_call_output`` items) the turns,
``tools`` flat function tools. ``previous_response_id`` continues a stored conversation: responses are
kept in memory (``ResponseStore``, least recently used first out, bounded in count and bytes) unless
``store`` is false. Output items: ``reasoning`` (with ``--reasoning-parser``), ``message``,
``function_call``; streamed as the typed events of the ``openai`` package (``responses_stream.py``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from plait.runtime.server.app import ServerState
from plait.runtime.server.streams import SSE_HEADERS, collect, guarded, submit_all, until_disconnect
from plait.runtime.server.limits import parsed_request
from plait.runtime.server.chat_prompt import normalize_messages
from plait.runtime.server.openai_api import SAMPLING_NAMES, OpenAIRequest, chat_request, check_common
from plait.runtime.server.protocol import RequestError, expect_bool, expect_int, ignored_fields_headers, short_repr
from plait.runtime.server.responses_stream import ResponseAssembler, new_id
from plait.runtime.server.tools import function_tool, make_choice

IGNORED = frozenset({"user", "safety_identifier", "service_tier", "metadata", "prompt_cache_retention",
                     "prompt_cache_options", "include", "store", "stream_options"})
FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
    "temperature", "top_p", "stream", "previous_response_id", "text", "reasoning", "top_logprobs",
    "truncation", "max_tool_calls", "background", "conversation", "prompt", "context_management", "moderation",
    "prompt_cache_key", "cache_salt", "logit_bias", *IGNORED, *SAMPLING_NAMES,
})
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "background": (None, False), "conversation": (None,), "prompt": (None,), "context_management": (None, []),
    "moderation": (None,), "truncation": (None, "disabled"), "max_tool_calls": (None,),
}
MAX_STORED_RESPONSES = 1024
MAX_STORED_BYTES = 64 * 2**20


@dataclass
class StoredResponse:
    """A finished response: the object returned, and the conversation a follow-up continues."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]
    size: int = 0


class ResponseStore:
    """Responses by id, in memory: at most ``max_count`` and about ``max_bytes``; the least recently
    used goes first. Thread-safe."""

    def __init__(self, max_count: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.items: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        stored.size = len(json.dumps(stored.body)) + len(json.dumps(stored.messages))
        with self.lock:
            if response_id in self.items:
                self.bytes -= self.items.pop(response_id).size
            self.items[response_id] = stored
            self.bytes += stored.size
            while self.items and (len(self.items) > self.max_count or self.bytes > self.max_bytes):
                self.bytes -= self.items.popitem(last=False)[1].size

    def get(self, response_id: str) -> StoredResponse | None:
        with self.lock:
            stored = self.items.get(response_id)
            if stored is not None:
                self.items.move_to_end(response_id)
            return stored


# ------------------------------------------------------------------------------------------ input
def _content(content: Any, where: str) -> Any:
    if isinstance(content, str) or not isinstance(content, list):
        return content
    return [{"type": "text", "text": p.get("text")} if isinstance(p, dict) and p.get("type") in
            ("input_text", "output_text", "text") else p for p in content]


def _attach_call(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise RequestError(f"{where}: a function_call item needs string '{key}'", param="input")
    call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
    if messages and messages[-1]["role"] == "assistant" and "tool_call_id" not in messages[-1]:
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def input_messages(value: Any) -> list[dict[str, Any]]:
    """``input`` as OpenAI chat messages (checked by ``normalize_messages`` afterwards)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError("input must be a string or a list of items", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{where}.role must be user, system, developer or assistant", param="input")
            messages.append({"role": item["role"], "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            _attach_call(messages, item, where)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise RequestError(f"{where}: a function_call_output item needs 'call_id' and 'output'", param="input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _content(output, where)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again (as chat templates drop it)
        else:
            raise RequestError(f"{where}: input items of type {short_repr(kind)} are not supported (message, "
                               "function_call, function_call_output, reasoning)", param="input")
    return messages


def _tools(body: dict[str, Any]) -> Any:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", param="tools")
    declared = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise RequestError(f"tools[{i}]: only function tools are supported, got type {short_repr(kind)} (hosted "
                               "tools such as web_search need OpenAI's servers)", param="tools")
        declared.append(function_tool(tool, f"tools[{i}]"))
    choice = body.get("tool_choice")
    if not declared and choice in (None, "auto", "none"):
        return None
    return make_choice(declared, choice, body.get("parallel_tool_calls"))


def _chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions fields a Responses body stands for."""
    chat = {k: body[k] for k in (*SAMPLING_NAMES, "model", "prompt_cache_key", "cache_salt", "logit_bias") if k in body}
    if body.get("max_output_tokens") is not None:
        chat["max_output_tokens"] = body["max_output_tokens"]
    text_format = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": text_format.get("schema")}}
    elif text_format is not None:
        chat["response_format"] = text_format
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("top_logprobs"):
        chat["logprobs"], chat["top_logprobs"] = True, expect_int("top_logprobs", body["top_logprobs"], 0, 20)
    return chat


@dataclass
class ResponsesRequest:
    """A checked Responses request: the chat request it runs, and what the answer echoes."""

    chat: OpenAIRequest
    body: dict[str, Any]
    history: list[dict[str, Any]]  # the conversation without instructions (stored for follow-ups)
    store: bool
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: float = field(default_factory=time.time)


def parse_responses(body: Any, state: ServerState, store: ResponseStore) -> ResponsesRequest:
    stream, ignored = check_common(body, FIELDS, DEFAULT_ONLY, "/v1/responses", state)
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        stored = store.get(previous) if isinstance(previous, str) else None
        if stored is None:
            raise RequestError(f"previous response {short_repr(previous)} is not stored here (responses are kept "
                               "in memory, least recently used first out, and not with store=false)",
                               status=404, param="previous_response_id")
        history = list(stored.messages)
    history += input_messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("instructions must be a string", param="instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + history
    normalized = normalize_messages(messages)
    chat = chat_request(_chat_body(body), state, normalized, _tools(body), stream, ignored, ("max_output_tokens",))
    keep = True if body.get("store") is None else expect_bool("store", body["store"])
    return ResponsesRequest(chat, body, normalize_messages(history) if history else [], keep)


# ------------------------------------------------------------------------------------------ routes
async def create_response(request: Request) -> Response:
    """``POST /v1/responses``."""
    state: ServerState = request.app.state.server
    store: ResponseStore = request.app.state.responses
    parsed = await parsed_request(request, lambda body: parse_responses(body, state, store))
    assembler = ResponseAssembler(parsed, state.logprob_text)
    streams = await submit_all(state, parsed.chat.jobs)
    state.metrics.request("/v1/responses", "accepted")
    headers = ignored_fields_headers(parsed.chat.ignored)

    def remember(body: dict[str, Any]) -> None:
        if parsed.store:
            store.put(parsed.id, StoredResponse(body, parsed.history + [assembler.message()]))

    if parsed.chat.stream:
        def error_event(error: RequestError) -> str:  # the Responses API's own error event ends the stream
            return assembler.error_event(str(error.code if error.code is not None else error.status), error.message)

        events = guarded(assembler.stream(streams, state, remember), state, "/v1/responses", error_event)
        return StreamingResponse(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    finals = await until_disconnect(request, collect(streams, state))
    body = assembler.finish(finals[0][1])
    remember(body)
    return JSONResponse(body, headers=headers)


async def get_response(request: Request) -> Response:
    """``GET /v1/responses/{response_id}``: a stored response."""
    stored = request.app.state.responses.get(request.path_params["response_id"])
    if stored is None:
        raise RequestError("no stored response with this id", status=404, param="response_id")
    return JSONResponse(stored.body)


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``: the served model is generative; say so."""
    state: ServerState = request.app.state.server
    raise RequestError(f"the served model {state.model_names[0]!r} is a generative model: this server has no "
                       "embeddings endpoint (serve an embedding model elsewhere)", status=404, code="model_not_embedding")


def routes(app: Any) -> list[tuple[str, Any, list[str]]]:
    """The routes of this module for ``create_app``; sets up the response store."""
    app.state.responses = ResponseStore()
    return [("/v1/responses", create_response, ["POST"]), ("/v1/responses/{response_id}", get_response, ["GET"]),
            ("/v1/embeddings", embeddings, ["POST"])]
