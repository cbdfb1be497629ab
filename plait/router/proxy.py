"""Forwarding one HTTP request to one replica, and relaying its answer unchanged.

Status, body and the headers that matter (content type, ``X-Plait-Ignored-Fields``, cache control)
pass through. An SSE answer is relayed event by event (bytes unchanged; an event is passed on once it
is complete, so a replica that dies mid-event never leaves half an event at the client). Failures:

- the replica refuses the connection: ``ReplicaUnreachable`` (nothing was sent; the caller may try
  another replica);
- it fails before or while answering a non-streaming request: 502 with a JSON error naming it;
- it fails mid-stream: the stream ends with plait serve's error event (``data: {"error": ...}`` and
  ``data: [DONE]``; on ``/v1/responses`` the Responses API's ``error`` event), then ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from plait.runtime.server.asgi import ClientGone, until_disconnect
from plait.runtime.server.protocol import RequestError

# request headers not forwarded (hop-by-hop, or set by the upstream client); response headers not relayed
DROPPED_REQUEST_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                                     "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"})
DROPPED_RESPONSE_HEADERS = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding",
                                      "date", "server"})
_RESPONSE_ID = re.compile(rb'"id":\s*"(resp_[^"]{1,200})"')


class ReplicaUnreachable(Exception):
    """The replica did not accept the connection (nothing was sent to it)."""


def error_json(message: str, status: int, code: str | None = None) -> Response:
    """A JSON error in plait serve's (OpenAI's) shape."""
    error = RequestError(message, status=status, code=code)
    return Response(json.dumps(error.body()), status_code=status, media_type="application/json")


def upstream_headers(request: Request, api_key: str | None) -> list[tuple[str, str]]:
    """The client's headers to send upstream, with ``Authorization`` replaced when ``api_key`` is set."""
    headers = [(k, v) for k, v in request.headers.items() if k not in DROPPED_REQUEST_HEADERS
               and not (api_key is not None and k == "authorization")]
    if api_key is not None:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers


def relayed_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k not in DROPPED_RESPONSE_HEADERS}


def stream_error_event(path: str, message: str, events_sent: int) -> bytes:
    """The event that ends a stream which cannot finish, as plait serve writes it (``streams.guarded``)."""
    error = RequestError(message, status=502, code="replica_failed")
    if path == "/v1/responses":
        payload = {"type": "error", "sequence_number": events_sent, "code": "replica_failed",
                   "message": error.message, "param": None}
        return f"event: error\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
    return f"data: {json.dumps(error.body(), separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()


class RelayedStream(StreamingResponse):
    """A relayed SSE answer whose upstream is closed however the response ends, even if the client
    left before the first event was asked for (then the relay generator never ran)."""

    def __init__(self, content: AsyncIterator[bytes], finish: Callable[[], Any], **kwargs: Any):
        super().__init__(content, media_type=None, **kwargs)
        self.finish = finish

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.finish()


class Forward:
    """One request's trip to one replica. ``done()`` is called exactly once when it is over (however it
    ended); ``failed(kind, exc)`` when the replica failed (``kind``: ``mid_request`` or ``mid_stream``);
    ``on_response_id(id)`` with a Responses API id seen in the answer."""

    def __init__(self, client: httpx.AsyncClient, replica: str, done: Callable[[], None],
                 failed: Callable[[str, Exception], None], on_response_id: Callable[[str], None] | None = None):
        self.client, self.replica, self.done = client, replica, done
        self.failed, self.on_response_id = failed, on_response_id

    async def send(self, request: Request, path: str, body: bytes, api_key: str | None) -> Response:
        """Send and relay; raises ``ReplicaUnreachable`` (after ``done()``) if the connection failed."""
        url = self.replica + path + (f"?{request.url.query}" if request.url.query else "")
        outgoing = self.client.build_request(request.method, url, content=body,
                                             headers=upstream_headers(request, api_key))
        try:
            upstream = await until_disconnect(request, self.client.send(outgoing, stream=True))
        except ClientGone:
            self.done()
            return Response(status_code=499)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.done()
            raise ReplicaUnreachable(f"{type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException:
            self.done()
            return error_json(f"replica {self.replica} did not answer in time", 504, "replica_timeout")
        except httpx.HTTPError as exc:
            self.done()
            self.failed("mid_request", exc)
            return error_json(f"replica {self.replica} failed before answering: {_describe(exc)}", 502,
                              "replica_failed")
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            finish = self._finisher(upstream)
            return RelayedStream(self._relay(upstream, path, finish), finish, status_code=upstream.status_code,
                                 headers=relayed_headers(upstream))
        try:
            content = await until_disconnect(request, upstream.aread())
        except ClientGone:
            return Response(status_code=499)
        except httpx.HTTPError as exc:
            self.failed("mid_request", exc)
            return error_json(f"replica {self.replica} failed while answering: {_describe(exc)}", 502,
                              "replica_failed")
        finally:
            await upstream.aclose()
            self.done()
        if self.on_response_id is not None and upstream.status_code == 200:
            self._record_response_id(content[:4096])
        return Response(content, status_code=upstream.status_code, headers=relayed_headers(upstream))

    async def _relay(self, upstream: httpx.Response, path: str, finish: Callable[[], Any]) -> AsyncIterator[bytes]:
        pending, events = b"", 0
        try:
            async for chunk in upstream.aiter_raw():
                pending += chunk
                end = _events_end(pending)
                if end:
                    complete, pending = pending[:end], pending[end:]
                    if events == 0 and self.on_response_id is not None:
                        self._record_response_id(complete[:4096])
                    events += complete.count(b"\n\n")
                    yield complete
            if pending:
                yield pending
        except httpx.HTTPError as exc:
            self.failed("mid_stream", exc)
            yield stream_error_event(path, f"replica {self.replica} failed mid-stream: {_describe(exc)}", events)
        finally:
            await finish()

    def _finisher(self, upstream: httpx.Response) -> Callable[[], Any]:
        """Closes ``upstream`` and calls ``done()``, once however often it is called."""
        finished = False

        async def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                try:
                    await upstream.aclose()
                finally:
                    self.done()

        return finish

    def _record_response_id(self, head: bytes) -> None:
        found = _RESPONSE_ID.search(head)
        if found is not None:
            self.on_response_id(found.group(1).decode())


def _events_end(data: bytes) -> int:
    """Where the last complete SSE event in ``data`` ends (0: none complete yet)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf != -1 else 0, crlf + 4 if crlf != -1 else 0)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
