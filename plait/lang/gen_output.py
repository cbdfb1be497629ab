"""What a finished ``gen`` stores: its text converted to the requested ``dtype``; or, with a
``json_schema``, the JSON text, with the parsed value (validated into the pydantic model given as the
schema) in ``meta_info["parsed"]`` (``state.parsed(name)``).

Output that is incomplete (cut by ``max_tokens``, or reported incomplete by a constrained backend), that
does not parse, or that the runtime reports as not valid under its schema (``meta_info["schema_valid"]``
False: a relaxed schema whose every attempt failed validation, see docs/constrained.md) raises
``GenerationError``, or with ``gen(..., on_incomplete="keep")`` is stored as the raw text with
``meta_info["incomplete"] = True`` (``schema_valid`` stays False). Nothing wrong is returned silently.
"""

from __future__ import annotations

import json
from typing import Any

from plait.lang.backends.base import GenerateResult
from plait.lang.errors import GenerationError
from plait.lang.ir import Gen
from plait.lang.primitives import parse_dtype
from plait.sampling import SamplingParams

__all__ = ["convert_gen_output"]


def _parse_json(node: Gen, text: str) -> Any:
    """The JSON value of ``text`` (a validated model instance with a pydantic schema); ValueError if not."""
    if node.schema_model is not None:
        return node.schema_model.model_validate_json(text)  # pydantic's ValidationError is a ValueError
    return json.loads(text)


def convert_gen_output(node: Gen, params: SamplingParams, result: GenerateResult, backend_name: str) -> tuple[Any, dict[str, Any]]:
    """The variable value of ``node`` from ``result``, and the meta entries to add (``incomplete``, ``parsed``).

    Raises ``GenerationError`` for incomplete or unparsable dtype/JSON output unless ``on_incomplete="keep"``.
    """
    finish = result.finish_reason or {}
    if node.dtype is None and params.json_schema is None:
        return result.text, {}
    cut = finish.get("type") == "length"
    # a number cut by max_tokens may lack digits even though it parses ("19691" of "1969")
    number_cut = cut and node.dtype in (int, float)
    flagged = bool(result.meta.get("incomplete"))
    problem: str | None = None
    value: Any = result.text
    try:
        value = parse_dtype(result.text, node.dtype) if node.dtype is not None else _parse_json(node, result.text)
    except ValueError as exc:
        problem = f"which is not a {node.dtype.__name__}" if node.dtype is not None else f"which is not valid JSON for the schema ({_first_line(exc)})"
    if problem is None and (number_cut or flagged):
        problem = "which is incomplete"
    if problem is None and result.meta.get("schema_valid") is False:
        problem = f"which does not validate against its schema ({result.meta.get('schema_error') or 'no reason given'})"
    if problem is None:
        if node.dtype is not None:
            return value, {"incomplete": False}
        return result.text, {"incomplete": False, "parsed": value}  # the variable stays the JSON text
    if node.on_incomplete == "keep":
        return result.text, {"incomplete": True}
    raise GenerationError(
        f"gen {node.name!r} produced {result.text!r}, {problem} (finish reason {finish.get('type')!r}, backend "
        f"{backend_name!r}); raise max_tokens, use a backend that supports constrained decoding, or pass "
        "on_incomplete='keep' to get the raw text flagged in meta_info['incomplete']"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
