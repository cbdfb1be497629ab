"""LoRA adapters at run time, as SGLang and vLLM name the routes.

- ``POST /load_lora_adapter`` ``{"lora_name": str, "lora_path": str}``: read the PEFT adapter in that
  directory (on the server's machine) and serve it under that name; 400 when it cannot be served (the
  message says why: not a directory, bad files, another base model, rank or count past the engine's
  LoRA settings, a name already loaded, an engine started without LoRA).
- ``POST /unload_lora_adapter`` ``{"lora_name": str}``: 400 while a queued or running request uses it,
  or for a name not loaded.

Requests name an adapter with ``lora_path`` (``/generate``) or ``model`` (OpenAI routes); ``/v1/models``
lists the base model and every adapter.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from plait.runtime.server.app import read_json
from plait.runtime.server.protocol import RequestError, short_repr

MAX_LORA_NAME_CHARS = 256
MAX_LORA_PATH_CHARS = 4096


def _field(body: Any, name: str, limit: int) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise RequestError(f"field {name!r} must be a non-empty string of at most {limit} characters, got "
                           f"{short_repr(value)}", param=name)
    return value


async def _call(request: Request, name: str, arg: Any) -> None:
    state = request.app.state.server
    try:
        await state.client.call(name, arg)
    except RuntimeError as exc:  # the engine refused: the adapter cannot be (un)loaded
        raise RequestError(str(exc).split(": ", 1)[-1]) from None


async def load_lora_adapter(request: Request) -> Response:
    state = request.app.state.server
    body = await read_json(request)
    name = _field(body, "lora_name", MAX_LORA_NAME_CHARS)
    path = _field(body, "lora_path", MAX_LORA_PATH_CHARS)
    if name in state.model_names:
        raise RequestError(f"{name!r} is the base model's name; choose another adapter name", param="lora_name")
    await _call(request, "load_lora_adapter", (name, path))
    state.lora_names[name] = path
    return JSONResponse({"success": True, "message": f"LoRA adapter {name!r} loaded",
                         "loaded_adapters": sorted(state.lora_names)})


async def unload_lora_adapter(request: Request) -> Response:
    state = request.app.state.server
    body = await read_json(request)
    name = _field(body, "lora_name", MAX_LORA_NAME_CHARS)
    await _call(request, "unload_lora_adapter", name)
    state.lora_names.pop(name, None)
    return JSONResponse({"success": True, "message": f"LoRA adapter {name!r} unloaded",
                         "loaded_adapters": sorted(state.lora_names)})


def routes() -> list[tuple[str, Any, list[str]]]:
    return [("/load_lora_adapter", load_lora_adapter, ["POST"]),
            ("/unload_lora_adapter", unload_lora_adapter, ["POST"]),
            ("/v1/load_lora_adapter", load_lora_adapter, ["POST"]),
            ("/v1/unload_lora_adapter", unload_lora_adapter, ["POST"])]
