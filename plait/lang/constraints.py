"""Checks of constrained-decoding specs written in a program, so a mistake fails where it is written.

``gen(regex=..., json_schema=..., ebnf=..., stop_regex=...)`` and run-level defaults (``prog.run(regex=...)``)
are checked here before any backend sees them; every mistake found is an ``InvalidConstraintError``:

- regex: Python's parser must accept it, and it must not use what no constrained decoder serves
  (llguidance and outlines-core, plait's, refuse these, and so do xgrammar and outlines, SGLang's):
  look-ahead/look-behind, backreferences, conditionals ``(?(1)a|b)``, atomic groups ``(?>...)``,
  word boundaries ``\\b``/``\\B``, and ``\\A``/``\\Z``.
- json_schema: JSON text (or a dict) that is an object or ``true``; every ``type`` one of JSON's seven;
  ``properties`` / ``$defs`` / ``definitions`` objects of schemas; ``items``, ``additionalProperties``,
  ``not`` schemas; ``anyOf`` / ``oneOf`` / ``allOf`` / ``prefixItems`` non-empty lists of schemas;
  ``required`` a list of strings; ``enum`` a non-empty list; length and count bounds ints >= 0;
  ``pattern`` a regex as above; every ``$ref`` local (``#...``) and pointing at something that exists.
- ebnf: a non-empty grammar (its syntax is the server's grammar compiler's to check).
- stop_regex: Python's parser must accept it (stop patterns are matched with Python's ``re``).

A constraint only a backend's compiler refuses (they differ in what they support) is reported by the
backend as the same ``InvalidConstraintError`` (``constraint_refusal`` maps an HTTP refusal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from plait.lang.errors import InvalidConstraintError
from plait.sampling import SamplingParams

try:  # Python's own regex parser (``sre_parse`` before 3.11)
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["check_fields", "check_json_schema", "check_params", "check_regex", "constraint_refusal"]

JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else",
                  "additionalItems", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def _unsupported_regex_feature(pattern: str) -> str | None:
    """What ``pattern`` uses that constrained decoding cannot serve, or None."""
    at_codes = {_sre.AT_BOUNDARY: r"a word boundary \b", _sre.AT_NON_BOUNDARY: r"a non-boundary \B",
                _sre.AT_BEGINNING_STRING: r"\A", _sre.AT_END_STRING: r"\Z"}
    named = {_sre.ASSERT: "a look-ahead/look-behind", _sre.ASSERT_NOT: "a negative look-ahead/look-behind",
             _sre.GROUPREF: "a backreference", _sre.GROUPREF_EXISTS: "a conditional (?(group)...)"}
    atomic = getattr(_sre, "ATOMIC_GROUP", None)
    stack: list[Any] = [_sre_parse.parse(pattern)]
    while stack:
        item = stack.pop()
        if isinstance(item, _sre_parse.SubPattern):
            stack.extend(item.data)
            continue
        if isinstance(item, (list, tuple)):
            if len(item) == 2 and item[0] in named:
                return named[item[0]]
            if len(item) == 2 and atomic is not None and item[0] is atomic:
                return "an atomic group (?>...)"
            if len(item) == 2 and item[0] is _sre.AT and item[1] in at_codes:
                return at_codes[item[1]]
            stack.extend(x for x in item if isinstance(x, (list, tuple, _sre_parse.SubPattern)))
    return None


def check_regex(pattern: Any, field: str = "regex") -> str:
    """``pattern`` if constrained decoding can serve it; else ``InvalidConstraintError`` saying why."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidConstraintError(f"{field} must be a non-empty str, got {pattern!r}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidConstraintError(f"{field} {_short(pattern)} is not a valid regex: {exc}") from None
    if field == "regex":
        try:
            feature = _unsupported_regex_feature(pattern)
        except RecursionError:
            raise InvalidConstraintError(f"{field} {_short(pattern)} nests too deeply") from None
        if feature is not None:
            raise InvalidConstraintError(
                f"{field} {_short(pattern)} uses {feature}, which constrained decoding does not support (the "
                "output is matched by a finite automaton); rewrite it without it, or check the text after "
                "generating it"
            )
    return pattern


def check_json_schema(schema: Any) -> str:
    """The schema as JSON text, checked (see the module docstring); ``InvalidConstraintError`` if not."""
    text = schema
    if isinstance(schema, Mapping) or isinstance(schema, bool):
        try:
            text = json.dumps(schema if isinstance(schema, bool) else dict(schema))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidConstraintError(f"json_schema is not JSON-serializable: {exc}") from None
    if not isinstance(text, str):
        raise InvalidConstraintError(
            f"json_schema must be a dict, a JSON string or a pydantic model class, got {type(schema).__name__}")
    try:
        root = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidConstraintError(f"json_schema is not valid JSON ({exc}); pass a dict, a JSON string or a "
                                     "pydantic model") from None
    if root is True:
        return text
    if not isinstance(root, dict):
        raise InvalidConstraintError(
            f"json_schema must be a JSON object (or true), got {json.dumps(root)[:80]}"
            + ("; false matches no document" if root is False else ""))
    for path, node in _subschemas(root):
        _check_schema_node(root, path, node)
    return text


def _subschemas(root: dict) -> list[tuple[str, Any]]:
    """Every (JSON-pointer path, subschema) of ``root``, found iteratively (no recursion limit)."""
    out, stack = [], [("#", root)]
    while stack:
        path, node = stack.pop()
        out.append((path, node))
        if not isinstance(node, dict):
            continue
        for key in _SCHEMA_MAPS:
            value = node.get(key)
            if isinstance(value, dict):
                stack.extend((f"{path}/{key}/{_escape(k)}", v) for k, v in value.items())
        for key in _SCHEMA_VALUES:
            value = node.get(key)
            if isinstance(value, list) and key == "items":  # draft-04 tuple form
                stack.extend((f"{path}/{key}/{i}", v) for i, v in enumerate(value))
            elif key in node:
                stack.append((f"{path}/{key}", value))
        for key in _SCHEMA_LISTS:
            value = node.get(key)
            if isinstance(value, list):
                stack.extend((f"{path}/{key}/{i}", v) for i, v in enumerate(value))
    return out


def _check_schema_node(root: dict, path: str, node: Any) -> None:
    def bad(message: str) -> InvalidConstraintError:
        return InvalidConstraintError(f"json_schema at {path}: {message}")

    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise bad(f"a schema must be an object or a bool, got {json.dumps(node)[:60]}")
    types = node.get("type")
    if types is not None:
        listed = types if isinstance(types, list) else [types]
        unknown = [t for t in listed if t not in JSON_TYPES]
        if unknown or not listed:
            raise bad(f"unknown type {unknown[0] if unknown else types!r}; use one of {', '.join(sorted(JSON_TYPES))}")
    for key in _SCHEMA_MAPS:
        if key in node and not isinstance(node[key], dict):
            raise bad(f"{key!r} must be an object mapping names to schemas")
    for key in _SCHEMA_LISTS:
        if key in node and (not isinstance(node[key], list) or not node[key]):
            raise bad(f"{key!r} must be a non-empty list of schemas")
    required = node.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise bad("'required' must be a list of property names")
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise bad("'enum' must be a non-empty list")
    for key in _COUNTS:
        value = node.get(key)
        if key in node and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad(f"{key!r} must be an int >= 0, got {value!r}")
    if "pattern" in node:
        try:
            check_regex(node["pattern"])
        except InvalidConstraintError as exc:
            raise bad(str(exc)) from None
    if "$ref" in node:
        _check_ref(root, node["$ref"], bad)


def _check_ref(root: dict, ref: Any, bad: Any) -> None:
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise bad(f"$ref {ref!r} is not local; constrained decoding resolves only '#...' references within "
                  "the schema (put the referenced schema under $defs)")
    target: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise bad(f"$ref {ref!r} points at nothing in the schema")


def check_fields(fields: Mapping[str, Any]) -> None:
    """Check the ``regex`` / ``json_schema`` / ``ebnf`` / ``stop_regex`` entries of sampling fields (as given
    to ``gen`` or ``run``, before ``SamplingParams`` is built); ``InvalidConstraintError`` for a bad one."""
    if fields.get("regex") is not None:
        check_regex(fields["regex"])
    if fields.get("json_schema") is not None:
        schema = fields["json_schema"]
        if isinstance(schema, type) and callable(getattr(schema, "model_json_schema", None)):
            schema = schema.model_json_schema()  # a pydantic model class
        check_json_schema(schema)
    ebnf = fields.get("ebnf")
    if ebnf is not None and (not isinstance(ebnf, str) or not ebnf.strip()):
        raise InvalidConstraintError(f"ebnf must be a non-empty grammar, got {ebnf!r}")
    stops = fields.get("stop_regex")
    for pattern in [stops] if isinstance(stops, str) else list(stops or ()):
        check_regex(pattern, "stop_regex")


def check_params(params: SamplingParams) -> SamplingParams:
    """``params`` if its constraint and stop patterns pass the checks above; else ``InvalidConstraintError``."""
    check_fields({"regex": params.regex, "json_schema": params.json_schema, "ebnf": params.ebnf,
                  "stop_regex": params.stop_regex})
    return params


_CONSTRAINT_WORDS = ("regex", "json_schema", "json schema", "response_format", "ebnf", "grammar", "constraint")


def constraint_refusal(message: str, params: SamplingParams, backend_name: str) -> InvalidConstraintError | None:
    """The ``InvalidConstraintError`` for a request the backend refused (an HTTP 400 with ``message``) when
    the request carried a constraint or stop patterns and the refusal is about them; else None."""
    if params.constraint is None and not params.stop_regex:
        return None
    lowered = message.lower()
    if not any(word in lowered for word in _CONSTRAINT_WORDS):
        return None
    kind = params.constraint[0] if params.constraint is not None else "stop_regex"
    return InvalidConstraintError(f"{backend_name} refused the {kind} constraint: {message}")


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _short(value: str, limit: int = 60) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
