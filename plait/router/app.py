"""``plait router``: one HTTP endpoint in front of several ``plait serve`` replicas.

Each generation request (``/generate``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/responses``) goes to one replica, chosen by the routing policy (``policy.py``: cache-aware prefix
affinity by default) unless its ``program_id`` / ``session_id`` is already bound to a replica, in which
case it goes there for the program's life (``/begin_program`` and ``/end_program`` too). Answers pass
through unchanged, streams included (``proxy.py``). ``/flush_cache`` and ``/abort_request`` go to every
replica; ``/metrics`` is the router's counters plus every replica's metrics labelled ``replica``; any
other route goes to one healthy replica. Replicas are checked every ``health_check_interval`` seconds
(``GET /health``): one that fails is taken out until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from plait.router.keys import affinity_key, routing_text
from plait.router.metrics import RouterMetrics, merge_replica_metrics
from plait.router.policy import POLICIES, Choice, make_policy
from plait.router.proxy import Forward, ReplicaUnreachable, error_json
from plait.runtime.server.asgi import ApiKeyMiddleware, SignalDrainingServer
from plait.runtime.server.limits import parse_json, read_body
from plait.runtime.server.protocol import RequestError

logger = logging.getLogger(__name__)
ROUTED_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses")
INLINE_PARSE_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread, off the event loop


@dataclass(frozen=True)
class RouterConfig:
    """Settings of ``plait router`` (docs/server.md, "Data parallelism and the router")."""

    replicas: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "cache_aware"
    cache_threshold: float = 0.5  # share of the text a replica's tree must match for a cache hit
    balance_abs_threshold: int = 32  # imbalanced once the busiest has this many more in flight ...
    balance_rel_threshold: float = 1.0001  # ... and more than this times the idlest's load
    max_tree_size: int = 2**22  # characters kept per replica's tree (LRU past it)
    max_match_chars: int = 8192  # characters of each request's text matched and recorded
    health_check_interval: float = 5.0  # seconds between health checks
    health_check_timeout: float = 5.0
    api_key: str | None = None  # required from clients
    replica_api_key: str | None = None  # sent to replicas
    max_body_bytes: int = 16 * 2**20
    max_json_depth: int = 64
    connect_timeout: float = 5.0
    request_timeout: float | None = None  # seconds a replica may take to answer (None: no limit)
    max_programs: int = 100_000  # program_id / session_id bindings kept (least recently used dropped)
    log_level: str = "warning"
    shutdown_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("give at least one replica URL (--replica URL)")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        for name in ("max_tree_size", "max_match_chars", "max_body_bytes", "max_json_depth", "max_programs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be within [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 0:
            raise ValueError("balance thresholds must be >= 0")
        if self.health_check_interval <= 0:
            raise ValueError(f"health_check_interval must be > 0, got {self.health_check_interval}")


class NoReplica(Exception):
    """No healthy replica is left to take the request."""


class RouterState:
    """The replicas (health, in-flight counts), the policy, the program bindings and the metrics."""

    def __init__(self, config: RouterConfig, client: httpx.AsyncClient):
        self.config, self.client = config, client
        self.replicas = [url.rstrip("/") for url in config.replicas]
        self.healthy = {url: True for url in self.replicas}
        self.in_flight = {url: 0 for url in self.replicas}
        self.policy = make_policy(config.policy, config.cache_threshold, config.balance_abs_threshold,
                                  config.balance_rel_threshold, config.max_tree_size)
        self.programs: OrderedDict[str, str] = OrderedDict()  # program_id -> replica
        self.response_ids: OrderedDict[str, str] = OrderedDict()  # Responses API id -> replica
        self.metrics = RouterMetrics()

    def loads(self, exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, int]:
        return {url: self.in_flight[url] for url in self.replicas if self.healthy[url] and url not in exclude}

    def pick(self, text: str, program: str | None, exclude: set[str]) -> Choice:
        """The replica for a request (program binding first, else the policy); raises ``NoReplica``."""
        loads = self.loads(exclude)
        if not loads:
            raise NoReplica()
        if program is not None:
            bound = self.programs.get(program)
            if bound in loads:
                self.programs.move_to_end(program)
                return Choice(bound, "program")
        choice = self.policy.choose(text, loads)
        if program is not None:
            _remember(self.programs, program, choice.replica, self.config.max_programs)
        return choice

    def set_health(self, url: str, healthy: bool, why: str = "") -> None:
        if self.healthy[url] != healthy:
            (logger.info if healthy else logger.warning)("replica %s is %s%s", url,
                                                         "back" if healthy else "out", f": {why}" if why else "")
            if not healthy:
                self.policy.forget(url)  # its cache is presumed lost
        self.healthy[url] = healthy

    def forward(self, choice: Choice, path: str) -> Forward:
        """Count the request as in flight at ``choice.replica`` until the returned ``Forward`` is done."""
        url = choice.replica
        self.in_flight[url] += 1
        self.metrics.requests[(url, path)] += 1
        self.metrics.decisions[choice.reason] += 1

        def done() -> None:
            self.in_flight[url] -= 1

        def failed(kind: str, exc: Exception) -> None:
            self.metrics.errors[(url, kind)] += 1
            self.set_health(url, False, f"{type(exc).__name__} {kind}")

        on_id = (lambda rid: _remember(self.response_ids, rid, url, self.config.max_programs)) \
            if path == "/v1/responses" else None
        return Forward(self.client, url, done, failed, on_id)

    async def check_health(self) -> None:
        """``GET /health`` on every replica at once; each one's health is set by its answer."""
        async def check(url: str) -> None:
            try:
                answer = await self.client.get(url + "/health", headers=self._auth(),
                                               timeout=self.config.health_check_timeout)
                self.set_health(url, answer.status_code == 200, f"/health answered {answer.status_code}")
            except httpx.HTTPError as exc:
                self.set_health(url, False, f"/health failed: {type(exc).__name__}")

        await asyncio.gather(*(check(url) for url in self.replicas))

    def _auth(self) -> dict[str, str]:
        key = self.config.replica_api_key
        return {"authorization": f"Bearer {key}"} if key else {}


def _remember(table: OrderedDict[str, str], key: str, value: str, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


# ------------------------------------------------------------------------------------------ routes
async def _parsed(state: RouterState, body: bytes) -> tuple[Any, str]:
    """The body as JSON (400 if it is not) and its routing text; large bodies off the event loop."""
    def work() -> tuple[Any, str]:
        value = parse_json(body, state.config.max_json_depth)
        return value, routing_text(value, state.config.max_match_chars)

    return work() if len(body) <= INLINE_PARSE_BYTES else await anyio.to_thread.run_sync(work)


async def _send(request: Request, state: RouterState, path: str, body: bytes, text: str = "",
                program: str | None = None, pinned: str | None = None) -> Response:
    """Forward to the chosen replica; a replica that refuses the connection is taken out and the next
    one is tried (nothing reached it). No replica left: 503."""
    tried: set[str] = set()
    while True:
        if pinned is not None and state.healthy.get(pinned) and pinned not in tried:
            choice = Choice(pinned, "program")
        else:
            try:
                choice = state.pick(text, program, tried)
            except NoReplica:
                state.metrics.errors[("", "no_replica")] += 1
                names = ", ".join(state.replicas)
                return error_json(f"no healthy replica to take the request (replicas: {names})", 503,
                                  "no_healthy_replica")
        try:
            return await state.forward(choice, path).send(request, path, body, state.config.replica_api_key)
        except ReplicaUnreachable as exc:
            state.metrics.errors[(choice.replica, "connect")] += 1
            state.set_health(choice.replica, False, str(exc))
            tried.add(choice.replica)


async def routed(request: Request) -> Response:
    """A generation request: parsed for its routing text and program, then forwarded."""
    state: RouterState = request.app.state.router
    body = await read_body(request, state.config.max_body_bytes)
    value, text = await _parsed(state, body)
    pinned = None
    previous = value.get("previous_response_id") if isinstance(value, dict) else None
    if isinstance(previous, str):
        pinned = state.response_ids.get(previous)  # a stored response lives on one replica
    return await _send(request, state, request.url.path, body, text, affinity_key(value), pinned)


async def program_call(request: Request) -> Response:
    """``/begin_program`` and ``/end_program``: to the program's replica (``begin`` binds one)."""
    state: RouterState = request.app.state.router
    body = await read_body(request, state.config.max_body_bytes)
    value, _ = await _parsed(state, body)
    program = value.get("program_id") if isinstance(value, dict) else None
    if not isinstance(program, str) or not program:
        raise RequestError("send {'program_id': <non-empty string>}", param="program_id")
    response = await _send(request, state, request.url.path, body, "", program)
    if request.url.path == "/end_program":
        state.programs.pop(program, None)
    return response


async def broadcast(request: Request) -> Response:
    """``/flush_cache`` and ``/abort_request``: to every healthy replica; 200 only if all said 200."""
    state: RouterState = request.app.state.router
    body = await read_body(request, state.config.max_body_bytes)
    if request.url.path == "/abort_request":
        await _parsed(state, body)  # bad JSON: a 400 here, as from one replica
    headers = {"authorization": f"Bearer {state.config.replica_api_key}"} if state.config.replica_api_key else {
        k: v for k, v in request.headers.items() if k in ("authorization", "content-type")}

    async def one(url: str) -> tuple[str, int, str]:
        try:
            answer = await state.client.request(request.method, url + request.url.path, content=body,
                                                headers=headers, timeout=60.0)
            return url, answer.status_code, answer.text
        except httpx.HTTPError as exc:
            return url, 502, f"{type(exc).__name__}: {exc}"

    answers = await asyncio.gather(*(one(url) for url in state.loads()))
    if not answers:
        return error_json("no healthy replica", 503, "no_healthy_replica")
    status = max(status for _, status, _ in answers)
    if request.url.path == "/abort_request":
        return JSONResponse({"success": status == 200, "replicas": {u: s for u, s, _ in answers}},
                            status_code=status)
    text = "".join(f"{url}: {answer.strip()}\n" for url, _, answer in answers)
    return PlainTextResponse(text, status_code=status)


async def health(request: Request) -> Response:
    state: RouterState = request.app.state.router
    if any(state.healthy.values()):
        return Response(status_code=200)
    return error_json("no healthy replica", 503, "no_healthy_replica")


async def list_workers(request: Request) -> Response:
    """The replicas, their health and in-flight requests (SGLang's router answers ``/list_workers``)."""
    state: RouterState = request.app.state.router
    return JSONResponse({"urls": state.replicas, "healthy": state.healthy, "in_flight": state.in_flight,
                         "policy": state.config.policy})


async def metrics(request: Request) -> Response:
    state: RouterState = request.app.state.router

    async def scrape(url: str) -> tuple[str, str]:
        try:
            answer = await state.client.get(url + "/metrics", headers=state._auth(), timeout=5.0)
            return url, answer.text if answer.status_code == 200 else ""
        except httpx.HTTPError:
            return url, ""

    texts = dict(await asyncio.gather(*(scrape(url) for url in state.loads())))
    own = state.metrics.render(state.in_flight, state.healthy, state.policy.sizes())
    return PlainTextResponse(own + merge_replica_metrics(texts), media_type="text/plain; version=0.0.4")


async def other(request: Request) -> Response:
    """Any other route: to one healthy replica (a stored Responses API id: to the replica holding it)."""
    state: RouterState = request.app.state.router
    body = await read_body(request, state.config.max_body_bytes)
    path = request.url.path
    pinned = state.response_ids.get(path.rsplit("/", 1)[-1]) if path.startswith("/v1/responses/") else None
    return await _send(request, state, path, body, pinned=pinned)


# ------------------------------------------------------------------------------------------ the app
class StatusCounter:
    """Counts the router's answers by route and status (``plait_router:responses_total``)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                state = getattr(scope["app"].state, "router", None)
                if state is not None:
                    state.metrics.responses[(_route_label(scope["path"]), message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counted)


def create_app(config: RouterConfig) -> FastAPI:
    """The router's app; its lifespan runs the health checks and closes the upstream client."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.request_timeout, connect=config.connect_timeout)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            state = app.state.router = RouterState(config, client)

            async def check_forever() -> None:
                while True:
                    await state.check_health()
                    await asyncio.sleep(config.health_check_interval)

            checker = asyncio.ensure_future(check_forever())
            try:
                yield
            finally:
                checker.cancel()

    app = FastAPI(title="plait router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    for path in ROUTED_PATHS:
        app.add_api_route(path, routed, methods=["POST"])
    app.add_api_route("/begin_program", program_call, methods=["POST"])
    app.add_api_route("/end_program", program_call, methods=["POST"])
    app.add_api_route("/flush_cache", broadcast, methods=["POST", "GET"])
    app.add_api_route("/abort_request", broadcast, methods=["POST"])
    for path in ("/health", "/ready", "/ping"):
        app.add_api_route(path, health, methods=["GET", "HEAD"])
    app.add_api_route("/list_workers", list_workers, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET", "HEAD"])
    app.add_api_route("/{path:path}", other, methods=["GET", "POST", "PUT", "DELETE", "HEAD"])

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_middleware(StatusCounter)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    return app


def _route_label(path: str) -> str:
    return "/v1/responses/{id}" if path.startswith("/v1/responses/") else path[:64]


def run_router(config: RouterConfig) -> None:
    """Serve the router until SIGINT/SIGTERM (which drain in-flight requests first)."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s plait-router %(levelname)s %(message)s")
    print(f"plait router: {config.policy} over {len(config.replicas)} replicas on "
          f"http://{config.host}:{config.port}", flush=True)
    server = SignalDrainingServer(uvicorn.Config(create_app(config), host=config.host, port=config.port,
                                         log_level=config.log_level, access_log=False,
                                         timeout_graceful_shutdown=config.shutdown_timeout, timeout_keep_alive=75))
    server.run()
