"""Small ASGI helpers shared by ``plait serve`` and ``plait router``, light enough to import without
the server's API modules (those pull in the grammar backends: seconds of imports the router skips)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.requests import Request


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
