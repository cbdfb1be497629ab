"""Bounds on what one HTTP request may make the server do, checked before the work starts.

- ``read_body``: the body, refused with 413 past ``ServerConfig.max_body_bytes`` (by its
  ``Content-Length`` up front, or while it streams in).
- ``parse_json``: strict UTF-8 JSON; nesting deeper than ``max_json_depth`` and lone UTF-16 surrogates
  (``"\\ud800"``, which no UTF-8 text can carry) are 400s, never a RecursionError or a
  UnicodeEncodeError later on.
- ``OffLoop``: CPU work of large requests (JSON parsing, chat-template rendering, tokenization) runs on
  a small bounded thread pool, so that one huge prompt cannot freeze every stream and ``/health``;
  small bodies stay on the event loop, where a thread hop would cost more than the work, and so do
  mid-sized ones while the server has nothing else in flight (no stream to hold up; the hop there and
  back cost 0.3 ms of a first token's time on a development VM).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request

from plait.runtime.server.protocol import RequestError

T = TypeVar("T")
INLINE_BODY_BYTES = 512  # bodies up to this size are parsed on the event loop: tokenizing more costs more than a thread hop
IDLE_INLINE_BODY_BYTES = 16 * 1024  # ... and up to this size (a few ms of tokenizing) when nothing else is in flight
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape may follow


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body; 413 if it is (or announces itself as) larger than ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(f"{int(declared)} bytes", max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise body_too_large(f"more than {max_bytes} bytes", max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def body_too_large(size: str, max_bytes: int) -> RequestError:
    return RequestError(f"the request body has {size}; this server accepts at most {max_bytes} bytes "
                        "(plait serve --max-body-bytes)", status=413, code="request_too_large")


def parse_json(body: bytes, max_depth: int) -> Any:
    """Parse a request body as JSON (UTF-8) with the nesting and Unicode checks above."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not valid UTF-8: {exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep(max_depth) from None
    check_structure(value, max_depth, _MAYBE_SURROGATE.search(text) is not None)
    return value


def too_deep(max_depth: int) -> RequestError:
    return RequestError(f"the request body nests arrays/objects more than {max_depth} levels deep "
                        "(plait serve --max-json-depth)")


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the request contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
                           "strings must be valid Unicode") from None


def check_structure(value: Any, max_depth: int, strings: bool) -> None:
    """Refuse nesting deeper than ``max_depth`` and, with ``strings``, lone surrogates in keys and strings.

    Iterative (a stack, no recursion); only containers are visited one by one.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise too_deep(max_depth)
        if isinstance(item, dict):
            children = item.values()
            if strings:
                for key in item:
                    _check_text(key)
        elif isinstance(item, list):
            children = item
        else:
            if strings and isinstance(item, str):
                _check_text(item)
            continue
        for child in children:
            if isinstance(child, (dict, list)) or strings and isinstance(child, str):
                stack.append((child, depth + 1))


def prompt_char_bound(tokenizer: Any, max_tokens: int) -> int | None:
    """Characters above which a text must tokenize to more than ``max_tokens`` tokens, or None if unknown.

    A token covers at most as many characters as its longest vocabulary string has (byte-level and
    SentencePiece vocabularies spell one byte or one character per symbol), so a text longer than
    ``max_tokens`` x that is refused without tokenizing it. Only for tokenizers without a normalizer
    (one that removes or merges characters, such as accent stripping, would break the bound).
    """
    hf = getattr(tokenizer, "hf", None)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    longest = max((len(piece) for piece in hf.get_vocab()), default=0)
    return max_tokens * longest if longest else None


class OffLoop:
    """A bounded pool of worker threads for request parsing (``threads`` at a time; more wait their turn).

    ``idle()`` says whether the server has no request in flight (then mid-sized bodies stay inline)."""

    def __init__(self, threads: int, idle: Callable[[], bool] | None = None):
        self.limiter = anyio.CapacityLimiter(threads)
        self.idle = idle if idle is not None else (lambda: False)
        self.working = 0  # calls running on (or waiting for) the worker threads

    def inline(self, body_bytes: int) -> bool:
        """Whether a body of ``body_bytes`` is parsed on the event loop (see the module's docstring)."""
        return body_bytes <= INLINE_BODY_BYTES or (
            body_bytes <= IDLE_INLINE_BODY_BYTES and self.working == 0 and self.idle())

    async def run(self, inline: bool, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on the event loop if ``inline``, else on a worker thread."""
        if inline:
            return fn(*args)
        self.working += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self.working -= 1


async def parsed_request(request: Request, parse: Callable[[Any], T] | None = None) -> T:
    """Read, parse and check a JSON body, then ``parse(body)`` (the route's own checks and tokenization).

    Small bodies are handled on the event loop, larger ones on the ``OffLoop`` pool (``OffLoop.inline``).
    """
    state = request.app.state.server
    config = state.config
    body = await read_body(request, config.max_body_bytes)

    def work() -> Any:
        value = parse_json(body, config.max_json_depth)
        return parse(value) if parse is not None else value

    return await state.off_loop.run(state.off_loop.inline(len(body)), work)
