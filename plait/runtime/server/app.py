"""The HTTP side of ``plait serve``: SGLang's native routes, the OpenAI-compatible API, operations.

The app parses and checks requests, tokenizes prompts and streams results; the engine runs in its own
process behind an ``EngineClient`` (``process.py``). Bad input answers 400 with a message that names
the problem (OpenAI's error shape); a wrong API key answers 401; no engine answers 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from plait import __version__
from plait.runtime.server import openai_api
from plait.runtime.server.asgi import ApiKeyMiddleware, SignalDrainingServer
from plait.runtime.server.limits import OffLoop, parsed_request, prompt_char_bound
from plait.runtime.server.metrics import ServerMetrics
from plait.runtime.server.process import (
    EngineClient,
    EngineEvent,
    EngineRequestError,
    EngineUnavailableError,
    preload_tokenizer_modules,
    use_server_switch_interval,
)
from plait.runtime.server.native import align_shared_input_logprobs, parse_generate
from plait.runtime.server.streams import (  # noqa: F401 - SSE_HEADERS, merged, ...: also imported from here
    SSE_HEADERS,
    ClientGone,
    collect,
    guarded,
    merged,
    sse,
    stream_error,
    submit_all,
    until_disconnect,
)
from plait.runtime.server.protocol import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_PROMPT_LOGPROBS,
    GenerateJob,
    LogprobText,
    RequestError,
    expect_bool,
    ignored_fields_headers,
)

logger = logging.getLogger(__name__)
DETOKENIZERS = ("process", "engine")  # ServerConfig.detokenizer


@dataclass(frozen=True)
class ServerConfig:
    """Settings of ``plait serve`` (the engine's own settings travel in ``engine_settings``)."""

    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None
    log_level: str = "warning"
    shutdown_timeout: float = 60.0  # seconds SIGTERM waits for in-flight requests
    # seconds an idle keep-alive connection stays open: longer than clients keep idle pooled connections
    # (httpx and so openai: 5 s; aiohttp: 15 s), so a client never reuses a connection the server is closing
    keep_alive_timeout: float = 75.0
    strict_fields: bool = False  # unknown request fields: False ignores them (reported in a header), True: 400
    reasoning_parser: str | None = None  # qwen3 / deepseek-r1 / gpt-oss: reasoning_content apart
    # limits on one request (docs/server.md, Limits): past them the request gets a 4xx naming the limit
    max_body_bytes: int = 16 * 2**20  # request body size (413)
    max_json_depth: int = 64  # nesting of arrays/objects in a request body
    max_n: int = DEFAULT_MAX_N  # samples per prompt
    max_prompt_logprobs: int = DEFAULT_MAX_PROMPT_LOGPROBS  # prompt positions x top logprobs per request
    parse_threads: int = 4  # worker threads parsing and tokenizing large request bodies
    # where streamed text is made (docs/server.md): "process", a detokenizer process of its own (off the
    # engine thread and the event loop), or "engine", the engine process's thread (one process fewer)
    detokenizer: str = "process"
    engine_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "max_n", "max_prompt_logprobs", "parse_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.detokenizer not in DETOKENIZERS:
            raise ValueError(f"detokenizer must be one of {', '.join(DETOKENIZERS)}, got {self.detokenizer!r}")


class ServerState:
    """What every route needs: the engine client, the tokenizer, limits and metrics."""

    def __init__(self, config: ServerConfig, client: EngineClient, tokenizer: Any):
        self.config, self.client, self.tokenizer = config, client, tokenizer
        self.info = client.info
        name = config.served_model_name or config.model
        self.model_names = [name] + ([config.model] if config.model != name else [])
        # LoRA adapters: name -> path (kept here for /v1/models and OpenAI's ``model``; updated by the
        # load / unload routes; the engine checks every request's adapter again)
        self.lora_names: dict[str, str] = dict((self.info.config or {}).get("lora_paths") or ())
        self.metrics = ServerMetrics()
        self.off_loop = OffLoop(config.parse_threads, idle=lambda: client.in_flight == 0)
        self.max_prompt_chars = prompt_char_bound(tokenizer, self.info.max_prompt_tokens)
        decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)) if tokenizer is not None else None
        self.logprob_text = LogprobText(decode)

    def encode(self, text: str, add_special_tokens: bool = True, prompt: bool = True) -> list[int]:
        """Token ids of ``text``. A ``prompt`` too long to fit the context whatever its tokens is refused
        before tokenizing (``limits.prompt_char_bound``): a huge prompt costs no tokenizer time."""
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send token ids instead of text")
        if prompt and self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise RequestError(f"the prompt has {len(text)} characters: more than the {self.info.max_prompt_tokens} "
                               "tokens this server accepts", code="context_length_exceeded")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise RequestError("this model has no chat template; use /v1/completions or /generate")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - the model's Jinja template refused these messages (raise_exception)
            raise RequestError(f"the model's chat template cannot render these messages: {exc}",
                               param="messages") from None


# ------------------------------------------------------------------------------------------ helpers
async def read_json(request: Request) -> Any:
    """The request's JSON body, within the server's limits (``limits.parsed_request``)."""
    return await parsed_request(request)


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def native_output(state: ServerState, job: GenerateJob, event: EngineEvent, index: int | None) -> dict[str, Any]:
    meta = event.meta_info
    if job.return_logprob:
        meta = state.logprob_text.decorate(meta, job.return_text_in_logprobs)
    out = {"text": event.text, "output_ids": event.output_ids, "meta_info": meta}
    if job.return_prompt_token_ids:
        out["prompt_token_ids"] = job.input_ids
    if index is not None:
        out["index"] = index
    return out


# ------------------------------------------------------------------------------------------ routes
async def generate(request: Request) -> Response:
    """SGLang's ``/generate``: one prompt answers an object, a list (or ``n > 1``) answers a list."""
    state: ServerState = request.app.state.server
    encode = state.encode if state.tokenizer is not None else None
    parsed = await parsed_request(request, lambda body: parse_generate(
        body, encode, state.info, state.info.supports_program_id, state.config.strict_fields, state.config))
    jobs, is_batch, stream = parsed.jobs, parsed.is_batch, parsed.stream
    headers = ignored_fields_headers(parsed.ignored)
    streams = await submit_all(state, jobs)
    first_index = [0]
    for job in jobs:
        first_index.append(first_index[-1] + job.n)
    state.metrics.request("/generate", "accepted")
    if stream:
        async def events() -> AsyncIterator[str]:
            async for position, event in merged(streams):
                if event.finished:
                    state.metrics.output_finished(event.meta_info)
                index = first_index[position] + event.index if is_batch else None
                yield sse(native_output(state, jobs[position], event, index))
            yield "data: [DONE]\n\n"
        return StreamingResponse(guarded(events(), state, "/generate"), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **headers})
    finals = await until_disconnect(request, collect(streams, state))
    outputs = sorted(((first_index[p] + e.index, p, native_output(state, jobs[p], e, None)) for p, e in finals),
                     key=lambda item: item[0])
    if is_batch:
        align_shared_input_logprobs([(jobs[p].input_ids, out["meta_info"]) for _, p, out in outputs])
    body = [out for _, _, out in outputs]
    return JSONResponse(body if is_batch else body[0], headers=headers)


async def openai_completion(request: Request) -> Response:
    """``/v1/completions`` and ``/v1/chat/completions``."""
    state: ServerState = request.app.state.server
    chat = request.url.path.endswith("/chat/completions")
    parse = openai_api.parse_chat if chat else openai_api.parse_completion
    parsed = await parsed_request(request, lambda body: parse(body, state))
    builder = openai_api.ResponseBuilder(parsed, state.logprob_text)
    streams = await submit_all(state, parsed.jobs)
    state.metrics.request(request.url.path, "accepted")
    if parsed.stream:
        async def chunks() -> AsyncIterator[str]:
            async for position, event in merged(streams):
                if event.finished:
                    state.metrics.output_finished(event.meta_info)
                for chunk in builder.chunks(position, event):
                    yield sse(chunk)
            if parsed.include_usage:
                yield sse(builder.usage_chunk())
            yield "data: [DONE]\n\n"
        return StreamingResponse(guarded(chunks(), state, request.url.path), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **ignored_fields_headers(parsed.ignored)})
    finals = await until_disconnect(request, collect(streams, state))
    return JSONResponse(builder.response(finals), headers=ignored_fields_headers(parsed.ignored))


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    base = state.model_names[0]
    return JSONResponse({"object": "list", "data": [
        {"id": base, "object": "model", "created": 0, "owned_by": "plait", "root": state.config.model,
         "max_model_len": state.info.context_length},
        *({"id": name, "object": "model", "created": 0, "owned_by": "plait", "root": path, "parent": base,
           "max_model_len": state.info.context_length} for name, path in sorted(state.lora_names.items()))]})


async def get_model_info(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({
        "model_path": state.config.model, "tokenizer_path": state.info.tokenizer_dir, "is_generation": True,
        "preferred_sampling_params": None, "weight_version": "default",
        "served_model_name": state.model_names[0], "context_length": state.info.context_length,
        "has_chat_template": state.tokenizer is not None and state.tokenizer.chat_template is not None,
    })


def extensions(state: ServerState) -> list[str]:
    """plait's additions to SGLang's protocol, so clients (``pl.Endpoint``) can feature-detect them."""
    names = ["apply_chat_template", "apply_chat_template_tools", "abort_request"]
    if state.info.supports_program_id:
        names += ["program_id", "begin_program", "end_program"]
    return names


async def get_server_info(request: Request) -> Response:
    state: ServerState = request.app.state.server
    stats = await state.client.call("stats")
    config = state.config
    return JSONResponse({
        "model_path": config.model, "served_model_name": state.model_names[0], "host": config.host,
        "port": config.port, "version": __version__, "engine": "plait",
        "context_length": state.info.context_length, "max_total_num_tokens": state.info.kv_slots_total,
        "engine_config": json.loads(json.dumps(state.info.config, default=str)),
        "internal_states": [stats], "plait_extensions": extensions(state),
    })


async def flush_cache(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if await state.client.call("flush_cache"):
        return PlainTextResponse("Cache flushed.\n")
    return PlainTextResponse("Cache not flushed: requests are in flight; retry when idle.\n", status_code=400)


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(status_code=200 if state.client.alive else 503)


async def health_generate(request: Request) -> Response:
    """Generate one token end to end; 200 if that works within 20 s, else 503."""
    state: ServerState = request.app.state.server
    job = GenerateJob(rid=f"health-{id(request)}", input_ids=[0], sampling_params={"max_new_tokens": 1})
    try:
        streams = await submit_all(state, [job])
        await asyncio.wait_for(collect(streams, state), 20.0)
    except (EngineUnavailableError, EngineRequestError, asyncio.TimeoutError):
        return Response(status_code=503)
    return Response(status_code=200)


async def abort_request(request: Request) -> Response:
    body = await read_json(request)
    rid = body.get("rid") if isinstance(body, dict) else None
    if not isinstance(rid, str) or not rid:
        raise RequestError("send {'rid': <request id>}", param="rid")
    request.app.state.server.client.abort(rid)
    return JSONResponse({"success": True})


async def program_call(request: Request) -> Response:
    """``/begin_program`` and ``/end_program``: program-aware caching (a plait extension)."""
    state: ServerState = request.app.state.server
    if not state.info.supports_program_id:
        raise RequestError("this server's engine has no program-aware caching", status=404)
    body = await read_json(request)
    program_id = body.get("program_id") if isinstance(body, dict) else None
    if not isinstance(program_id, str) or not program_id:
        raise RequestError("send {'program_id': <non-empty string>}", param="program_id")
    await state.client.call(request.url.path.lstrip("/"), program_id)
    return JSONResponse({"success": True})


async def get_chat_template(request: Request) -> Response:
    state: ServerState = request.app.state.server
    template = state.tokenizer.chat_template if state.tokenizer is not None else None
    return JSONResponse({"name": state.model_names[0], "template": template})


async def apply_chat_template(request: Request) -> Response:
    """Render ``messages`` with the model's chat template (a plait extension; ``pl.Endpoint`` uses it)."""
    state: ServerState = request.app.state.server

    def render(body: Any) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise RequestError("send {'messages': [{'role': ..., 'content': ...}, ...]}", param="messages")
        add = expect_bool("add_generation_prompt", body.get("add_generation_prompt", False))
        if "tools" in body or "chat_template_kwargs" in body or any(
                isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in body["messages"]):
            return _render_with_tools(state, body, add)
        messages = [openai_api.message_text(m, i) for i, m in enumerate(body["messages"])]
        return state.render_chat(messages, add_generation_prompt=add)

    return JSONResponse({"text": await parsed_request(request, render)})


def _render_with_tools(state: ServerState, body: dict[str, Any], add_generation_prompt: bool) -> str:
    """``/apply_chat_template`` with ``tools``, tool messages or ``chat_template_kwargs`` (the
    ``apply_chat_template_tools`` extension): rendered as chat completions render them."""
    from plait.runtime.server.chat_prompt import normalize_messages, render_chat, render_options
    from plait.runtime.server.tools import parse_chat_tools

    options = render_options({"add_generation_prompt": add_generation_prompt,
                              "chat_template_kwargs": body.get("chat_template_kwargs")})
    return render_chat(state.tokenizer, normalize_messages(body["messages"]),
                       parse_chat_tools({"tools": body.get("tools")}), options)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    try:
        stats = await asyncio.wait_for(state.client.call("stats"), 10.0)
    except (EngineUnavailableError, asyncio.TimeoutError, RuntimeError):
        stats = None
    return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")


# ------------------------------------------------------------------------------------------ the app

def create_app(config: ServerConfig, client: EngineClient, tokenizer: Any) -> FastAPI:
    """The FastAPI app around a started ``EngineClient``; shutting the app down stops the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.attach(asyncio.get_running_loop())
        yield
        await client.shutdown()

    app = FastAPI(title="plait", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = ServerState(config, client, tokenizer)
    routes = [
        ("/generate", generate, ["POST"]), ("/v1/completions", openai_completion, ["POST"]),
        ("/v1/chat/completions", openai_completion, ["POST"]), ("/v1/models", models, ["GET"]),
        ("/get_model_info", get_model_info, ["GET"]), ("/get_server_info", get_server_info, ["GET"]),
        ("/server_info", get_server_info, ["GET"]), ("/flush_cache", flush_cache, ["POST", "GET"]),
        ("/health", health, ["GET", "HEAD", "POST"]), ("/health_generate", health_generate, ["GET", "HEAD", "POST"]),
        ("/abort_request", abort_request, ["POST"]), ("/begin_program", program_call, ["POST"]),
        ("/end_program", program_call, ["POST"]), ("/get_chat_template", get_chat_template, ["GET"]),
        ("/apply_chat_template", apply_chat_template, ["POST"]), ("/metrics", metrics, ["GET"]),
    ]
    from plait.runtime.server import lora_routes, native_routes, responses  # these import this module's helpers

    routes += responses.routes(app)
    routes += lora_routes.routes()
    routes += native_routes.routes()
    for path, endpoint, methods in routes:
        app.add_api_route(path, endpoint, methods=methods)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        state: ServerState = request.app.state.server
        state.metrics.request(request.url.path, f"error_{exc.status}")
        return error_response(exc)

    @app.exception_handler(EngineRequestError)
    async def _engine_refused(request: Request, exc: EngineRequestError) -> Response:
        request.app.state.server.metrics.request(request.url.path, "error_400")
        return error_response(RequestError(str(exc)))

    @app.exception_handler(EngineUnavailableError)
    async def _engine_down(request: Request, exc: EngineUnavailableError) -> Response:
        request.app.state.server.metrics.request(request.url.path, "error_503")
        return error_response(stream_error(exc))

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> Response:
        request.app.state.server.metrics.request(request.url.path, "error_400")
        return error_response(RequestError("the request nests values too deeply to process"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:  # a bug: still an answer with a message
        logger.exception("internal error on %s", request.url.path)
        request.app.state.server.metrics.request(request.url.path, "error_500")
        return error_response(stream_error(exc))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        request.app.state.server.metrics.request(request.url.path, "client_disconnected")
        return Response(status_code=499)

    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    return app


def load_tokenizer(info: Any) -> Any:
    """The HTTP process's own tokenizer (prompts are tokenized here, not in the engine process)."""
    if info.tokenizer_dir is None:
        return None
    from plait.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(info.tokenizer_dir)


def serve(config: ServerConfig) -> None:
    """Start the engine process, then serve HTTP until SIGINT/SIGTERM (which drain in-flight requests)."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s plait %(levelname)s %(message)s")
    use_server_switch_interval()
    client = EngineClient(config.model, config.engine_settings, config.log_level,
                          detokenizer_process=config.detokenizer == "process")
    # the tokenizer's imports run while the engine process loads (this process only waits meanwhile)
    preload = threading.Thread(target=preload_tokenizer_modules, name="plait-preload", daemon=True)
    preload.start()
    info = client.start()
    preload.join()
    app = create_app(config, client, load_tokenizer(info))
    print(f"plait serve: {config.model} on http://{config.host}:{config.port} "
          f"(context {info.context_length}, {info.kv_slots_total} KV slots)", flush=True)
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                            timeout_graceful_shutdown=config.shutdown_timeout + SHUTDOWN_GRACE_S,
                                            timeout_keep_alive=config.keep_alive_timeout, access_log=False))
    server.drain_s = config.shutdown_timeout
    server.on_deadline = lambda: client.fail_pending(
        f"the server is shutting down and the request did not finish within {config.shutdown_timeout:g} s "
        "(--shutdown-timeout)")
    server.run()


SHUTDOWN_GRACE_S = 2.0  # after the drain deadline: time for cut-off requests to send their error and end


class DrainingServer(SignalDrainingServer):
    """uvicorn's server, except that SIGINT/SIGTERM end the process with status 0 once in-flight
    requests are drained (uvicorn re-raises the signal after its graceful shutdown). Requests still
    running ``drain_s`` seconds after the signal are ended by ``on_deadline``: a stream gets an error
    event and ``[DONE]``, a waiting caller a 503 with a message, instead of a cut connection."""

    drain_s: float | None = None
    on_deadline: Any = None

    async def _wait_tasks_to_complete(self) -> None:
        if self.drain_s is None or self.on_deadline is None:
            await super()._wait_tasks_to_complete()
            return
        waiter = asyncio.ensure_future(super()._wait_tasks_to_complete())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=self.drain_s)
            if not done:
                self.on_deadline()
            await waiter  # bounded by uvicorn's own timeout (drain_s + the grace)
        finally:
            waiter.cancel()
