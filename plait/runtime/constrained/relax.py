"""Relaxed JSON schemas: generate under the tightest grammar a backend can express, then validate.

Some JSON schema keywords cannot be compiled into a grammar by any backend (llguidance refuses ``not``,
``oneOf``, ``dependencies``, ``uniqueItems``, ``if``/``then``/``else``, ``propertyNames``, ``contains``,
formats it does not know, ``minProperties``/``maxProperties`` with optional keys, ...). Rather than
refusing such a schema, the compiler (``compile_worker.prepare_relaxing``) compiles a *relaxed* schema
that accepts every document the original accepts (a superset), and the engine validates each finished
document against the original schema with ``jsonschema`` (``SchemaValidator``), resampling a bounded
number of times when it does not validate (see docs/constrained.md, "Relaxed schemas").

- ``relax_schema(schema, level)``: the relaxed schema and the names of the keywords relaxed. Level 0 is the
  tightest (``oneOf`` as ``anyOf``; ``if``/``then``/``else`` as ``anyOf`` of ``then`` and ``else`` when
  both are given; ``minProperties``/``maxProperties`` dropped only where some listed property is
  optional; a ``pattern`` with a look-around, ``\\b`` or a backreference dropped); level 1 drops the
  conditionals and min/maxProperties everywhere.
- ``is_relaxable(message)``: whether a compile error is a refusal of a relaxable feature (never a syntax
  error, a limit, an unsatisfiable schema, ...).
- ``Relaxation``: what a grammar compiled from a relaxed schema carries: the original schema, the relaxed
  keywords and the validator.

Pure Python, no backend import: it runs in compile workers and in the engine process alike.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from typing import Any

__all__ = [
    "LLGUIDANCE_FORMATS",
    "RELAXED_LEVELS",
    "Relaxation",
    "SchemaValidator",
    "is_relaxable",
    "relax_schema",
]

# Formats llguidance enforces (tests/runtime/constrained/test_relax.py checks this list against it); other
# formats are dropped by relaxation (the original schema's validation still checks those jsonschema knows).
LLGUIDANCE_FORMATS = frozenset({
    "date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid", "unknown",
})
# Keywords no backend compiles; relaxation drops them (if/then/else: see _relax_conditional).
DROPPED_KEYWORDS = (
    "not", "dependencies", "dependentRequired", "dependentSchemas", "uniqueItems", "propertyNames",
    "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems",
)
RELAXED_LEVELS = 2  # 0: tightest; 1: also drops min/maxProperties and if/then/else everywhere

# Compile errors that name a relaxable feature (llguidance's and outlines-core's wording).
_RELAXABLE = re.compile(
    r"Unimplemented keys|oneOf constraints are not supported|Unknown format|min/maxProperties only supported"
    r"|look-?arounds?.*not supported|backreferences are not supported"
    r"|does not support the JSON schema keyword '(?:"
    + "|".join(re.escape(k) for k in (*DROPPED_KEYWORDS, "oneOf", "if", "then", "else", "format",
                                      "minProperties", "maxProperties"))
    + r")'"
)
# regex constructs llguidance cannot compile (look-around, word boundaries, backreferences): a "pattern"
# using them is dropped
_LOOKAROUND = re.compile(r"\(\?<?[=!]|\\[bB1-9]")
_SCHEMA_KEYS = ("additionalProperties", "items", "additionalItems", "not", "if", "then", "else", "contains",
                "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                    "dependencies")
_DATA_KEYS = frozenset({"const", "enum", "default", "examples", "example", "required", "title",
                        "description", "$comment", "type", "$ref", "$schema", "$id", "format", "pattern"})
# keys that mark a dict as a schema (inside containers relaxation does not know, e.g. "components")
_SCHEMA_MARKERS = frozenset({"type", "properties", "$ref", "allOf", "anyOf", "oneOf", "items", "enum",
                             "const", "not", "format", "additionalProperties", "required"})


def is_relaxable(message: str) -> bool:
    """Whether a compile error names a feature that ``relax_schema`` relaxes."""
    return bool(_RELAXABLE.search(message))


def relax_schema(schema: Any, level: int = 0) -> tuple[Any, list[str]]:
    """(relaxed schema, sorted names of the keywords relaxed) for a JSON schema (a dict or bool).

    The relaxed schema accepts every document ``schema`` accepts. Nothing is relaxed (``[]``) when
    ``schema`` uses none of the relaxable keywords. The input is not modified. Recurses through every
    subschema (properties, items, combinators, ``$defs`` / ``definitions``, and dicts under unknown keys
    that look like schemas, since a ``$ref`` may point there); ``const``, ``enum``, ``default`` and
    ``examples`` are data and left alone. The result is never larger than the input but for the
    ``allOf`` / ``anyOf`` wrappers of level 0.
    """
    if not 0 <= level < RELAXED_LEVELS:
        raise ValueError(f"relaxation level must be in [0, {RELAXED_LEVELS}), got {level}")
    relaxed: set[str] = set()
    out = _relax(copy.deepcopy(schema), level, relaxed)
    if "oneOf" in relaxed:
        _rewrite_refs(out)
    return out, sorted(relaxed)


def _rewrite_refs(node: Any) -> None:
    """``$ref`` pointers through a ``oneOf`` renamed ``anyOf`` follow the rename."""
    if isinstance(node, list):
        for item in node:
            _rewrite_refs(item)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "/oneOf/" in ref:
            node["$ref"] = ref.replace("/oneOf/", "/anyOf/")
        for key, value in node.items():
            if key not in ("const", "enum", "default", "examples"):
                _rewrite_refs(value)


def _relax(node: Any, level: int, relaxed: set[str]) -> Any:
    """Relax one schema in place (its subschemas first); returns it."""
    if not isinstance(node, dict):
        return node
    for key, value in list(node.items()):
        if key in _SCHEMA_KEYS and isinstance(value, dict):
            _relax(value, level, relaxed)
        if key in _SCHEMA_LIST_KEYS and isinstance(value, list):
            for item in value:
                _relax(item, level, relaxed)
        elif key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
            for item in value.values():
                _relax(item, level, relaxed)
        elif key not in _DATA_KEYS and key not in _SCHEMA_KEYS and isinstance(value, dict):
            _relax_container(value, level, relaxed)
    for key in DROPPED_KEYWORDS:
        if key in node:
            del node[key]
            relaxed.add(key)
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in LLGUIDANCE_FORMATS or "format" in node and not isinstance(fmt, str):
        del node["format"]
        relaxed.add("format")
    pattern = node.get("pattern")
    if isinstance(pattern, str) and _LOOKAROUND.search(pattern):
        del node["pattern"]
        relaxed.add("pattern")
    if "oneOf" in node:
        one_of = node.pop("oneOf")
        relaxed.add("oneOf")
        if "anyOf" in node:  # both: the oneOf alternatives become one more conjunct
            node["allOf"] = [*node.get("allOf", []), {"anyOf": one_of}]
        else:  # renamed in place ($refs into it are rewritten: _rewrite_refs)
            node["anyOf"] = one_of
    _relax_conditional(node, level, relaxed)
    if "minProperties" in node or "maxProperties" in node:
        listed = node.get("properties", {})
        required = node.get("required", [])
        optional = isinstance(listed, dict) and any(k not in required for k in listed)
        if level >= 1 or optional:
            for key in ("minProperties", "maxProperties"):
                if node.pop(key, None) is not None:
                    relaxed.add(key)
    return node


def _relax_container(node: dict, level: int, relaxed: set[str]) -> None:
    """A dict under a key relaxation does not know: relax what looks like a schema, search the rest."""
    if _SCHEMA_MARKERS & node.keys():
        _relax(node, level, relaxed)
        return
    for value in node.values():
        if isinstance(value, dict):
            _relax_container(value, level, relaxed)


def _relax_conditional(node: dict, level: int, relaxed: set[str]) -> None:
    """``if``/``then``/``else``: (if and then) or (not if and else) is within ``anyOf [then, else]`` when
    both branches are given (level 0); otherwise the condition is dropped."""
    if not {"if", "then", "else"} & node.keys():
        return
    cond = node.pop("if", None)
    then, other = node.pop("then", None), node.pop("else", None)
    relaxed.update(k for k, v in (("if", cond), ("then", then), ("else", other)) if v is not None)
    if level == 0 and cond is not None and then is not None and other is not None:
        node["allOf"] = [*node.get("allOf", []), {"anyOf": [then, other]}]


class SchemaValidator:
    """Validates documents against one JSON schema with ``jsonschema`` (imported on first use).

    The draft is the schema's ``$schema`` when it names one; otherwise draft 2020-12 that also reads the
    older forms backends accept (``dependencies``, ``items`` as a list with ``additionalItems``). Formats
    are checked where ``jsonschema`` knows them, and the standard formats whose checks need packages
    ``jsonschema`` does not require (``uri``, ``iri``, their ``-reference`` forms, ``uri-template``,
    ``date-time``, ``time``, ``duration``, ``hostname``, ``json-pointer``, ``relative-json-pointer``) with
    the syntax checks of ``FALLBACK_FORMATS``; other formats are annotations, not checked. Documents larger than
    ``max_bytes`` are not validated (reported invalid, with the reason).
    """

    def __init__(self, schema: Any, max_bytes: int = 1 << 20):
        self.schema = schema
        self.max_bytes = max_bytes
        self._validator: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._validator is None:
                cls = _validator_class(self.schema)
                self._validator = cls(self.schema, format_checker=_format_checker(cls))
            return self._validator

    def error(self, text: str) -> str | None:
        """None when ``text`` is a JSON document valid under the schema; else why not."""
        if len(text) > self.max_bytes:
            return f"the document has {len(text)} characters; documents over {self.max_bytes} are not validated"
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            return f"not a JSON document: {exc}"
        try:
            from jsonschema.exceptions import best_match

            err = best_match(self._get().iter_errors(doc))
        except Exception as exc:  # noqa: BLE001 -- a schema jsonschema cannot apply (bad regex, $ref) is no pass
            return f"the schema could not be applied: {exc!r}"[:500]
        if err is None:
            return None
        where = "/".join(str(p) for p in err.absolute_path)
        return f"at /{where}: {err.message}"[:500]


_URI_CHARS = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#\[\]]|%[0-9A-Fa-f]{2})"
_IRI_CHARS = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#\[\]\u00a0-\ud7ff\ue000-\ufffd\U00010000-\U0010fffd]|%[0-9A-Fa-f]{2})"
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*:"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OFFSET = r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?" + _OFFSET
_POINTER = r"(?:/(?:[^/~]|~[01])*)*"


def _reference(chars: str):
    """A URI / IRI reference check (RFC 3986 / 3987 syntax): absolute, or relative without a colon in
    its first segment."""
    absolute, any_chars = re.compile(f"{_SCHEME}{chars}*"), re.compile(f"{chars}*")

    def check(value: str) -> bool:
        if absolute.fullmatch(value):
            return True
        return bool(any_chars.fullmatch(value)) and ":" not in re.split(r"[/?#]", value, maxsplit=1)[0]

    return check


def _regex_check(pattern: str):
    compiled = re.compile(pattern)
    return lambda value: bool(compiled.fullmatch(value))


# Syntax checks for the standard formats whose jsonschema checks need optional packages (rfc3987,
# rfc3339-validator, fqdn, uri-template, isoduration, jsonpointer); used only where jsonschema has none.
FALLBACK_FORMATS = {
    "uri": _regex_check(f"{_SCHEME}{_URI_CHARS}*"),
    "uri-reference": _reference(_URI_CHARS),
    "iri": _regex_check(f"{_SCHEME}{_IRI_CHARS}*"),
    "iri-reference": _reference(_IRI_CHARS),
    "uri-template": _regex_check(r"(?:[^\x00-\x20\"'%<>\\^`{|}]|%[0-9A-Fa-f]{2}|\{[^{}\s]+\})*"),
    "date-time": _regex_check(r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt ]" + _TIME),
    "time": _regex_check(_TIME),
    "duration": _regex_check(r"P(?:[0-9]+W|(?=[0-9]|T[0-9])(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?"
                             r"(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+(?:\.[0-9]+)?S)?)?)"),
    "hostname": _regex_check(rf"(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?"),
    "json-pointer": _regex_check(_POINTER),
    "relative-json-pointer": _regex_check(rf"(?:0|[1-9][0-9]*)(?:#|{_POINTER})"),
}


def _format_checker(cls: Any) -> Any:
    """``cls``'s format checker plus ``FALLBACK_FORMATS`` where it has no check of its own."""
    from jsonschema import FormatChecker

    checker = FormatChecker(())
    checker.checkers = dict(cls.FORMAT_CHECKER.checkers)
    for name, check in FALLBACK_FORMATS.items():
        if name not in checker.checkers:
            checker.checks(name)(lambda value, check=check: not isinstance(value, str) or check(value))
    return checker


_DEFAULT_CLASS: Any = None


def _validator_class(schema: Any) -> Any:
    """The jsonschema validator class for ``schema`` (see ``SchemaValidator``)."""
    global _DEFAULT_CLASS
    from jsonschema import Draft7Validator, Draft202012Validator, validators

    if isinstance(schema, dict) and isinstance(schema.get("$schema"), str):
        cls = validators.validator_for(schema, default=None)
        if cls is not None:
            return cls
    if _DEFAULT_CLASS is None:
        new_items, old = Draft202012Validator.VALIDATORS["items"], Draft7Validator.VALIDATORS

        def items(validator: Any, value: Any, instance: Any, sub: Any) -> Any:
            fn = old["items"] if isinstance(value, list) else new_items
            yield from fn(validator, value, instance, sub)

        _DEFAULT_CLASS = validators.extend(Draft202012Validator, {
            "items": items, "additionalItems": old["additionalItems"], "dependencies": old["dependencies"],
        })
    return _DEFAULT_CLASS


class Relaxation:
    """What a grammar compiled from a relaxed schema carries (``CompiledGrammar.relaxation``).

    Attributes:
        schema: the original schema (documents are validated against it).
        keywords: the keywords relaxed, sorted (reported as ``meta_info["schema_relaxed"]``).
        relaxed_source: the relaxed schema's compact JSON text (what the grammar enforces).
        validator: a ``SchemaValidator`` of ``schema`` (built on first use, shared by requests).
    """

    def __init__(self, schema: Any, keywords: list[str] | tuple[str, ...], relaxed_source: str):
        self.schema = schema
        self.keywords = tuple(keywords)
        self.relaxed_source = relaxed_source
        self.validator = SchemaValidator(schema)

    def __repr__(self) -> str:
        return f"Relaxation(keywords={list(self.keywords)})"
