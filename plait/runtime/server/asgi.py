"""Small ASGI helpers shared by ``plait serve`` and ``plait router``, light enough to import without
the server's API modules (those pull in the grammar backends: seconds of imports the router skips)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from plait.runtime.server.protocol import RequestError

# routes served without an API key: health probes and metrics scrapers
OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics", "/ready", "/ping"})


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <api key>`` on every route but ``OPEN_PATHS`` and CORS preflights;
    a missing or wrong key gets a 401 in OpenAI's error shape. Compared in constant time."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
                error = RequestError("invalid or missing API key (send 'Authorization: Bearer <key>')", status=401,
                                     code="invalid_api_key")
                response = Response(json.dumps(error.body()), status_code=401, media_type="application/json")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (which lets it abort what it started)
    and raise ``ClientGone``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it abort its requests
    if task.cancelled():
        raise ClientGone()
    return task.result()


class SignalDrainingServer(uvicorn.Server):
    """uvicorn's server, except that SIGINT/SIGTERM end ``run()`` normally once in-flight requests are
    drained (uvicorn re-raises the signal after its graceful shutdown), so the caller decides how the
    process exits. Off the main thread (tests) signals are left alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
