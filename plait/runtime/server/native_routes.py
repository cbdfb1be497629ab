"""SGLang's (and vLLM's) smaller native routes: tokenize / detokenize, model and readiness probes, and a
clear answer on routes a generative model cannot serve.

- ``/tokenize`` and ``/v1/tokenize``: ``{"prompt": str | [str]}`` or ``{"messages": [...]}`` (rendered
  with the chat template, as a chat completion would be) -> ``{"tokens", "count", "max_model_len"}``
  (``"token_strs"`` too with ``return_token_strs``, as vLLM).
- ``/detokenize`` and ``/v1/detokenize``: ``{"tokens": [int] | [[int]]}`` -> ``{"text"}``.
- ``/model_info`` (SGLang's current name of ``/get_model_info``), ``/v1/models/{id}``, ``/ready``, ``/ping``.
- ``/separate_reasoning``: ``{"text", "reasoning_parser"}`` -> ``{"reasoning_text", "text"}`` (SGLang's
  shape; the parsers of ``reasoning.py``).
- ``/encode`` and ``/classify``: 404, the served model is generative.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from plait.runtime.server.protocol import (
    RequestError,
    expect_bool,
    ignored_fields_headers,
    short_repr,
    split_unknown,
)

TOKENIZE_FIELDS = frozenset({
    "model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "continue_final_message",
    "chat_template_kwargs", "tools", "tool_choice", "reasoning_effort", "return_token_strs",
})
DETOKENIZE_FIELDS = frozenset({"model", "tokens", "skip_special_tokens"})
SEPARATE_REASONING_FIELDS = frozenset({"text", "reasoning_parser", "return_blocks"})
MAX_SEPARATE_CHARS = 1 << 20
MAX_TOKENIZE_PROMPTS = 1024


def _body(state: Any, body: Any, known: frozenset[str], where: str) -> tuple[dict[str, Any], list[str]]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if state.tokenizer is None:
        raise RequestError("this model has no tokenizer", status=404)
    model = body.get("model")
    if model is not None and model not in state.model_names and model not in state.lora_names:
        raise RequestError(f"the model {short_repr(model)} does not exist; this server serves "
                           f"{state.model_names[0]!r}", status=404, param="model", code="model_not_found")
    return body, split_unknown(body, known, where, state.config.strict_fields)


def _chat_text(state: Any, body: dict[str, Any]) -> str:
    from plait.runtime.server.chat_prompt import normalize_messages, render_chat, render_options
    from plait.runtime.server.tools import parse_chat_tools

    return render_chat(state.tokenizer, normalize_messages(body["messages"]), parse_chat_tools(body),
                       render_options(body))


async def tokenize(request: Request) -> Response:
    from plait.runtime.server.limits import parsed_request

    state = request.app.state.server
    out, ignored = await parsed_request(request, lambda body: _tokenize(state, body, request.url.path))
    return JSONResponse(out, headers=ignored_fields_headers(ignored))


def _tokenize(state: Any, body: Any, path: str) -> tuple[dict[str, Any], list[str]]:
    body, ignored = _body(state, body, TOKENIZE_FIELDS, path)
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise RequestError("send exactly one of 'prompt' or 'messages'", param="prompt")
    with_strs = expect_bool("return_token_strs", body.get("return_token_strs") or False)
    if messages is not None:
        add_special = expect_bool("add_special_tokens", body.get("add_special_tokens") or False)
        texts, batch = [_chat_text(state, body)], False
    else:
        add_special = expect_bool("add_special_tokens", body.get("add_special_tokens", True))
        batch = isinstance(prompt, list)
        texts = prompt if batch else [prompt]
        if not texts or len(texts) > MAX_TOKENIZE_PROMPTS or not all(isinstance(t, str) for t in texts):
            raise RequestError(f"field 'prompt' must be a string or a list of 1 to {MAX_TOKENIZE_PROMPTS} strings",
                               param="prompt")
    tokens = [state.encode(t, add_special_tokens=add_special, prompt=False) for t in texts]
    out: dict[str, Any] = {"tokens": tokens if batch else tokens[0],
                           "count": [len(t) for t in tokens] if batch else len(tokens[0]),
                           "max_model_len": state.info.context_length}
    if with_strs:
        strs = [state.tokenizer.convert_ids_to_tokens(t) for t in tokens]
        out["token_strs"] = strs if batch else strs[0]
    return out, ignored


async def detokenize(request: Request) -> Response:
    from plait.runtime.server.limits import parsed_request

    state = request.app.state.server
    texts, batch, ignored = await parsed_request(request, lambda body: _detokenize(state, body, request.url.path))
    return JSONResponse({"text": texts if batch else texts[0]}, headers=ignored_fields_headers(ignored))


def _detokenize(state: Any, body: Any, path: str) -> tuple[list[str], bool, list[str]]:
    body, ignored = _body(state, body, DETOKENIZE_FIELDS, path)
    tokens = body.get("tokens")

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    batch = isinstance(tokens, list) and bool(tokens) and all(isinstance(t, list) for t in tokens)
    lists = tokens if batch else [tokens]
    if not all(is_ids(t) for t in lists) or len(lists) > MAX_TOKENIZE_PROMPTS:
        raise RequestError("field 'tokens' must be a list of token ids or a list of such lists", param="tokens")
    vocab = state.info.vocab_size
    bad = [t for ids in lists for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
    skip = expect_bool("skip_special_tokens", body.get("skip_special_tokens", True))
    return [state.tokenizer.decode(ids, skip_special_tokens=skip) for ids in lists], batch, ignored


async def separate_reasoning(request: Request) -> Response:
    """SGLang's ``/separate_reasoning``: split a finished output into its reasoning and its answer."""
    from plait.runtime.server.app import read_json
    from plait.runtime.server.reasoning import PARSERS, make_reasoning_parser

    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    ignored = split_unknown(body, SEPARATE_REASONING_FIELDS, "/separate_reasoning",
                            request.app.state.server.config.strict_fields)
    text, name = body.get("text"), body.get("reasoning_parser")
    if not isinstance(text, str) or len(text) > MAX_SEPARATE_CHARS:
        raise RequestError(f"field 'text' must be a string of at most {MAX_SEPARATE_CHARS} characters", param="text")
    if name not in PARSERS:
        raise RequestError(f"field 'reasoning_parser' must be one of {', '.join(PARSERS)}, got {short_repr(name)}",
                           param="reasoning_parser")
    parser = make_reasoning_parser(name)
    split = parser.feed(text)
    split.add(parser.finish())
    out: dict[str, Any] = {"reasoning_text": split.reasoning, "text": split.content}
    if expect_bool("return_blocks", body.get("return_blocks") or False):
        blocks = ([{"type": "reasoning", "text": split.reasoning}] if split.reasoning else [])
        blocks.append({"type": "text", "text": split.content})
        out.update(reasoning_blocks=[split.reasoning] if split.reasoning else [], text_blocks=[split.content],
                   blocks=blocks)
    return JSONResponse(out, headers=ignored_fields_headers(ignored))


async def model_info(request: Request) -> Response:
    """SGLang's ``/model_info``: ``/get_model_info``'s fields plus the model's type and architectures."""
    from plait.runtime.server.app import get_model_info

    info = json.loads((await get_model_info(request)).body)
    state = request.app.state.server
    config = state.info.config
    info.update({"load_format": config.get("load_format"), "has_image_understanding": False,
                 "has_audio_understanding": False, "reasoning_parser": getattr(state.config, "reasoning_parser", None)})
    return JSONResponse(info)


async def retrieve_model(request: Request) -> Response:
    state = request.app.state.server
    model = request.path_params["model"]
    if model not in state.model_names and model not in state.lora_names:
        raise RequestError(f"the model {short_repr(model)} does not exist", status=404, param="model",
                           code="model_not_found")
    adapter = model not in state.model_names  # a LoRA adapter: its path, over the base model
    return JSONResponse({"id": model, "object": "model", "created": 0, "owned_by": "plait",
                         "root": state.lora_names[model] if adapter else state.config.model,
                         **({"parent": state.model_names[0]} if adapter else {}),
                         "max_model_len": state.info.context_length})


async def ready(request: Request) -> Response:
    """200 while the engine accepts requests, else 503 (``/ready`` and SageMaker's ``/ping``)."""
    return Response(status_code=200 if request.app.state.server.client.alive else 503)


async def not_generative(request: Request) -> Response:
    raise RequestError(f"{request.url.path} needs an embedding or classification model; the served model is "
                       "generative (use /generate or /v1/completions)", status=404)


def routes() -> list[tuple[str, Callable, list[str]]]:
    """(path, endpoint, methods) for ``create_app``."""
    return [
        ("/tokenize", tokenize, ["POST"]), ("/v1/tokenize", tokenize, ["POST"]),
        ("/detokenize", detokenize, ["POST"]), ("/v1/detokenize", detokenize, ["POST"]),
        ("/model_info", model_info, ["GET"]), ("/v1/models/{model:path}", retrieve_model, ["GET"]),
        ("/ready", ready, ["GET", "HEAD"]), ("/ping", ready, ["GET", "HEAD"]), ("/separate_reasoning", separate_reasoning, ["POST"]),
        ("/encode", not_generative, ["POST", "PUT"]), ("/classify", not_generative, ["POST", "PUT"]),
    ]
