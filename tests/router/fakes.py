"""Fake ``plait serve`` replicas for the router's tests: tiny ASGI apps that record what they got.

``FakeReplica`` runs in a thread of the test process (fast to start); ``python -m
tests.router.fakes PORT NAME`` runs one in a process of its own, for tests that kill it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_app(name: str) -> FastAPI:
    """A replica called ``name``: ``/generate`` and the OpenAI routes answer with their body and name;
    ``stream: true`` sends ``stream_events`` SSE events ``stream_delay`` s apart, then ``[DONE]``."""
    app = FastAPI()
    app.state.received = []  # (path, parsed body or None)
    app.state.healthy = True
    app.state.hold = None  # a threading.Event non-streaming answers wait for (load tests)

    async def record(request: Request) -> Any:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        app.state.received.append((request.url.path, body, dict(request.headers)))
        return body

    def events(body: dict) -> Any:
        async def gen():
            for i in range(int(body.get("stream_events", 3))):
                yield f"data: {json.dumps({'text': f'{name}-{i}', 'index': i})}\n\n".encode()
                await asyncio.sleep(float(body.get("stream_delay", 0)))
            yield b"data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    async def generation(request: Request) -> Response:
        body = await record(request)
        if isinstance(body, dict) and body.get("stream"):
            return events(body)
        if app.state.hold is not None and not (isinstance(body, dict) and body.get("no_hold")):
            while not app.state.hold.is_set():  # a threading.Event the test sets
                await asyncio.sleep(0.005)
        if isinstance(body, dict) and body.get("fail_status"):
            return JSONResponse({"error": {"message": "refused"}}, status_code=int(body["fail_status"]))
        return JSONResponse({"replica": name, "path": request.url.path},
                            headers={"X-Plait-Ignored-Fields": "junk"})

    async def health(request: Request) -> Response:
        return Response(status_code=200 if app.state.healthy else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse('# HELP plait:requests_total Requests.\n# TYPE plait:requests_total counter\n'
                                 f'plait:requests_total{{route="/generate"}} {len(app.state.received)}\n'
                                 '# HELP plait:engine_up Up.\n# TYPE plait:engine_up gauge\nplait:engine_up 1\n')

    async def simple(request: Request) -> Response:
        body = await record(request)
        return JSONResponse({"replica": name, "path": request.url.path, "body": body})

    async def flush(request: Request) -> Response:
        await record(request)
        return PlainTextResponse("Cache flushed.\n")

    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses"):
        app.add_api_route(path, generation, methods=["POST"])
    for path in ("/begin_program", "/end_program", "/abort_request", "/tokenize"):
        app.add_api_route(path, simple, methods=["POST"])
    app.add_api_route("/v1/models", simple, methods=["GET"])
    app.add_api_route("/flush_cache", flush, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app: Any):
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server thread did not start"
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


class FakeReplica(ServerThread):
    def __init__(self, name: str):
        super().__init__(fake_app(name))
        self.name = name

    @property
    def received(self) -> list[tuple[str, Any, dict]]:
        return self.app.state.received

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.received]


if __name__ == "__main__":
    uvicorn.run(fake_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
