"""Streaming plumbing shared by the server's routes: engine requests merged into one event stream, SSE
framing, disconnect handling, and the error event that ends a stream which cannot finish.

A stream that fails after it started (the engine process died, the shutdown deadline passed) ends with
``data: {"error": ...}`` and ``data: [DONE]`` (``guarded``), so a client always sees how it ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any


from plait.runtime.server.asgi import ClientGone, until_disconnect  # noqa: F401 - also imported from here
from plait.runtime.server.process import EngineEvent, EngineRequestError, EngineUnavailableError, RequestStream
from plait.runtime.server.protocol import GenerateJob, RequestError

logger = logging.getLogger("plait.runtime.server.app")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def stream_error(exc: BaseException) -> RequestError:
    """What a stream that cannot go on tells its client (the engine died, the shutdown deadline passed)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, EngineUnavailableError):
        return RequestError(f"the engine is not available: {exc}", status=503)
    if isinstance(exc, EngineRequestError):
        return RequestError(str(exc))
    return RequestError(f"internal error: {type(exc).__name__}", status=500)


async def guarded(events: AsyncIterator[str], state: Any, path: str,
                  on_error: Any = None) -> AsyncIterator[str]:
    """``events`` until they end; if they fail, an error event (``on_error(RequestError)`` or
    ``data: {"error": ...}``) and ``data: [DONE]``, so that the client sees the stream end, and why."""
    try:
        async for text in events:
            yield text
    except Exception as exc:  # noqa: BLE001 - every failure of a stream is reported in the stream itself
        error = stream_error(exc)
        if error.status >= 500:
            (logger.warning if error.status == 503 else logger.exception)("stream on %s ended early: %s",
                                                                          path, error.message)
        state.metrics.request(path, f"stream_error_{error.status}")
        yield on_error(error) if on_error is not None else sse(error.body())
        if on_error is None:
            yield "data: [DONE]\n\n"


async def submit_all(state: Any, jobs: list[GenerateJob]) -> list[RequestStream]:
    """Submit every job; if one is refused, abort those already accepted and re-raise."""
    streams: list[RequestStream] = []
    try:
        for job in jobs:
            streams.append(await state.client.submit(job.rid, job.spec(), job.n))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, EngineEvent]]:
    """Events of several requests as they come, tagged with the request's position."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(position: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((position, event))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((position, exc))
        queue.put_nowait((position, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            position, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


async def collect(streams: list[RequestStream], state: Any) -> list[tuple[int, EngineEvent]]:
    finals = []
    async for position, event in merged(streams):
        if event.finished:
            state.metrics.output_finished(event.meta_info)
            finals.append((position, event))
    return finals
