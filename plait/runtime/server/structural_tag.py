"""SGLang's ``structural_tag`` sampling parameter, served as a Lark grammar for llguidance.

A structural tag lets the model write free text, and constrains what follows a trigger: after
``begin`` comes a JSON document matching ``schema``, then ``end`` (tool calls inside running text).
SGLang takes it as a JSON string (xgrammar's format)::

    {"type": "structural_tag",
     "structures": [{"begin": "<function=get_weather>", "schema": {...}, "end": "</function>"}],
     "triggers": ["<function="]}

It becomes llguidance's structural-tag grammar (``llguidance.StructTag``: lazy trigger lexemes), which
the engine serves as an ``ebnf`` (Lark) constraint. Only this form is read; xgrammar's newer
``"format"`` form is refused with a clear error rather than half-honoured.
"""

from __future__ import annotations

import json
from typing import Any

MAX_STRUCTURES = 64
MAX_TAG_CHARS = 256  # begin / end / trigger strings


class StructuralTagError(ValueError):
    """A structural tag this server cannot serve (the message says what to change)."""


def _text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > MAX_TAG_CHARS:
        raise StructuralTagError(f"structural_tag: {what} must be a {'' if allow_empty else 'non-empty '}"
                                 f"string of at most {MAX_TAG_CHARS} characters")
    return value


def _load(spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise StructuralTagError(f"structural_tag is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise StructuralTagError("structural_tag must be a JSON object (or its JSON text)")
    if "format" in spec:
        raise StructuralTagError("structural_tag: only the 'structures' + 'triggers' form is supported, "
                                 "not the 'format' form")
    return spec


def structural_tag_to_lark(spec: Any) -> str:
    """The Lark grammar (llguidance dialect) of a structural tag given as JSON text or a dict."""
    spec = _load(spec)
    structures, triggers = spec.get("structures"), spec.get("triggers")
    if not isinstance(structures, list) or not structures or len(structures) > MAX_STRUCTURES:
        raise StructuralTagError(f"structural_tag.structures must be a list of 1 to {MAX_STRUCTURES} objects")
    if not isinstance(triggers, list) or not triggers:
        raise StructuralTagError("structural_tag.triggers must be a non-empty list of strings")
    triggers = [_text(t, "each trigger") for t in triggers]
    try:
        from llguidance import StructTag
    except ImportError:
        raise StructuralTagError("structural_tag needs the llguidance package on the server") from None
    tags = []
    for i, item in enumerate(structures):
        if not isinstance(item, dict) or not isinstance(item.get("schema"), (dict, bool)):
            raise StructuralTagError(f"structural_tag.structures[{i}] needs 'begin', 'schema' (a JSON schema) "
                                     "and 'end'")
        begin = _text(item.get("begin"), f"structures[{i}].begin")
        end = _text(item.get("end", ""), f"structures[{i}].end", allow_empty=True)
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise StructuralTagError(f"structural_tag.structures[{i}].begin {begin!r} starts with none of the triggers")
        schema = item["schema"] if isinstance(item["schema"], dict) else {}
        tags.append(StructTag(trigger=trigger, begin=begin, grammar=schema, end=end))
    # Triggers are matched as text: a trigger that is one special token in some tokenizer would not be.
    return StructTag.to_grammar(tags, assume_special=False)
