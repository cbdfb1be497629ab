"""Relaxed JSON schemas (constrained/relax.py): each keyword's relaxation, which compile errors relax,
the validator, and the compile path (a relaxed grammar carries the original schema; a schema refused for
anything else stays a clear error)."""

from __future__ import annotations

import json

import pytest

from plait.runtime.constrained import ConstraintError, ConstraintKind, ConstraintSpec
from plait.runtime.constrained.compile_worker import prepare_relaxing
from plait.runtime.constrained.relax import (
    LLGUIDANCE_FORMATS,
    SchemaValidator,
    is_relaxable,
    relax_schema,
)

S = {"type": "string"}
I = {"type": "integer"}


def _spec(schema) -> ConstraintSpec:
    return ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(schema, separators=(",", ":")))


@pytest.mark.parametrize("keyword,value", [
    ("not", {"const": 1}), ("dependencies", {"a": ["b"]}), ("dependentRequired", {"a": ["b"]}),
    ("dependentSchemas", {"a": {"required": ["b"]}}), ("uniqueItems", True), ("propertyNames", {"maxLength": 3}),
    ("contains", I), ("unevaluatedProperties", False),
])
def test_unsupported_keywords_are_dropped(keyword, value):
    schema = {"type": "object", "properties": {"a": I}, keyword: value}
    relaxed, keywords = relax_schema(schema)
    assert keywords == [keyword]
    assert relaxed == {"type": "object", "properties": {"a": I}}
    assert keyword in schema  # the input is not modified


def test_one_of_becomes_any_of_and_refs_follow():
    relaxed, keywords = relax_schema({"oneOf": [S, I], "$defs": {"x": {"$ref": "#/oneOf/1"}}})
    assert keywords == ["oneOf"]
    assert relaxed == {"anyOf": [S, I], "$defs": {"x": {"$ref": "#/anyOf/1"}}}
    both, _ = relax_schema({"anyOf": [S, I], "oneOf": [{"minLength": 1}, I]})
    assert both == {"anyOf": [S, I], "allOf": [{"anyOf": [{"minLength": 1}, I]}]}


def test_unknown_formats_are_dropped_known_ones_kept():
    relaxed, keywords = relax_schema({"type": "object", "properties": {
        "u": {"type": "string", "format": "url"}, "d": {"type": "string", "format": "date-time"}}})
    assert keywords == ["format"]
    assert relaxed["properties"] == {"u": S, "d": {"type": "string", "format": "date-time"}}
    assert relax_schema({"type": "string", "format": "email"}) == ({"type": "string", "format": "email"}, [])


def test_if_then_else_is_any_of_the_branches_at_level_0_and_dropped_at_level_1():
    schema = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}, "else": {"required": ["c"]}}
    relaxed, keywords = relax_schema(schema)
    assert keywords == ["else", "if", "then"]
    assert relaxed == {"type": "object", "allOf": [{"anyOf": [{"required": ["b"]}, {"required": ["c"]}]}]}
    assert relax_schema(schema, level=1)[0] == {"type": "object"}
    only_then = {"if": {"required": ["a"]}, "then": {"required": ["b"]}}  # "not if" cannot be expressed
    assert relax_schema(only_then) == ({}, ["if", "then"])


def test_min_max_properties_dropped_only_with_optional_keys_at_level_0():
    optional = {"type": "object", "properties": {"a": I, "b": I}, "required": ["a"], "minProperties": 2}
    assert relax_schema(optional) == ({"type": "object", "properties": {"a": I, "b": I}, "required": ["a"]},
                                      ["minProperties"])
    all_required = {"type": "object", "properties": {"a": I}, "required": ["a"], "maxProperties": 1}
    assert relax_schema(all_required) == (all_required, [])
    assert relax_schema(all_required, level=1)[1] == ["maxProperties"]


def test_patterns_llguidance_cannot_compile_are_dropped():
    for pattern in ("^(?!a).*$", "(?<=x)y", r"\bword\b", r"^(a)\1$"):
        assert relax_schema({"type": "string", "pattern": pattern}) == (S, ["pattern"])
    assert relax_schema({"type": "string", "pattern": "^[a-z]+$"})[1] == []


def test_recursion_reaches_every_subschema_but_not_data():
    deep = {"not": I}
    schema = {
        "properties": {"p": {"items": [deep], "additionalItems": deep}},
        "patternProperties": {"^x": {"anyOf": [deep]}}, "additionalProperties": deep,
        "$defs": {"d": deep}, "definitions": {"e": {"allOf": [deep]}}, "items": deep, "prefixItems": [deep],
        "components": {"schemas": {"C": {"type": "object", "not": I}}},  # where a $ref may point
        "properties_data": None, "const": {"not": 1}, "enum": [{"not": 1}], "default": {"not": 1},
        "examples": [{"not": 1}],
    }
    relaxed, keywords = relax_schema(schema)
    assert keywords == ["not"]
    text = json.dumps(relaxed)
    assert text.count('"not"') == 4  # only in const, enum, default, examples
    assert relaxed["components"]["schemas"]["C"] == {"type": "object"}
    assert relax_schema({"properties": {"not": I, "oneOf": S}}) == ({"properties": {"not": I, "oneOf": S}}, [])


def test_relaxation_does_not_grow_the_schema():
    schema = {"$defs": {f"d{i}": {"oneOf": [S, I], "not": {"const": i}, "format": "x"} for i in range(200)}}
    relaxed, _ = relax_schema(schema)
    assert len(json.dumps(relaxed)) < len(json.dumps(schema))
    with pytest.raises(ValueError, match="level"):
        relax_schema(schema, level=2)


def test_which_errors_relax():
    assert is_relaxable('llguidance: Unimplemented keys: ["not"]')
    assert is_relaxable("oneOf constraints are not supported. Enable 'coerce_one_of' ...")
    assert is_relaxable("llguidance: Unknown format: url")
    assert is_relaxable("outlines-core does not support the JSON schema keyword 'uniqueItems' (at /)")
    assert is_relaxable("regex parse error:\n  (?=a)\nerror: look-around, including look-ahead, is not supported")
    for message in ("Unsatisfiable schema: incompatible types", "regex parse error: unclosed group",
                    "patternProperty regexes /a/ and /b/ are not disjoint", "schema too large",
                    "outlines-core does not support the JSON schema keyword 'minimum' (at /)"):
        assert not is_relaxable(message), message


def test_llguidance_formats_list_matches_llguidance():
    llguidance = pytest.importorskip("llguidance")
    for fmt in sorted(LLGUIDANCE_FORMATS) + ["url", "uri-reference", "byte", "regex", "int32"]:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps({"type": "string", "format": fmt}))
        error = llguidance.LLMatcher.validate_grammar(grammar)
        assert (not error) == (fmt in LLGUIDANCE_FORMATS), (fmt, error)


def test_validator_drafts_formats_and_bounds():
    v = SchemaValidator({"type": "object", "dependencies": {"a": ["b"]}, "properties": {
        "t": {"type": "array", "items": [I], "additionalItems": False}, "e": {"type": "string", "format": "email"}}})
    assert v.error('{"t": [1]}') is None
    assert "b" in v.error('{"a": 1}')  # draft 7's dependencies read without a $schema
    assert "additional" in v.error('{"t": [1, 2]}').lower()  # items as a list, with additionalItems
    assert v.error('{"e": "nobody"}') is not None  # formats jsonschema knows are checked
    assert SchemaValidator({"type": "string", "format": "url"}).error('"not a url"') is None  # unknown: annotation
    assert "not a JSON document" in v.error('{"t": ')
    assert "not validated" in SchemaValidator({}, max_bytes=10).error('"' + "x" * 20 + '"')
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "maximum": 3,
              "exclusiveMaximum": True}
    assert SchemaValidator(draft4).error("3") is not None
    assert "could not be applied" in SchemaValidator({"type": "string", "pattern": "("}).error('"a"')


@pytest.mark.parametrize("fmt,good,bad", [
    ("uri", ["http://a.b/c?d#e", "urn:isbn:1"], ["Invalid URI", "http://example.com/{", "/relative"]),
    ("uri-reference", ["/a/b", "../x?y", "http://x"], ["://", "a b"]),
    ("iri", ["http://\u00fc.de"], ["not-an-iri"]),
    ("uri-template", ["http://x/{id}"], ["http://x/{"]),
    ("date-time", ["2024-01-01T10:00:00.5+01:00"], ["2024-13-01T10:00:00Z", "2024-01-01"]),
    ("time", ["10:00:00Z"], ["10:00"]),
    ("duration", ["P1D", "PT1H30M", "P1W"], ["invalid-duration", "P", "PT"]),
    ("hostname", ["a.b.com", "localhost"], ["-x.com", "a..b"]),
    ("json-pointer", ["", "/a/~0b"], ["a"]),
    ("relative-json-pointer", ["0#", "1/a"], ["x"]),
])
def test_validator_checks_standard_formats_without_optional_packages(fmt, good, bad):
    for schema in ({"type": "string", "format": fmt},
                   {"$schema": "http://json-schema.org/draft-07/schema#", "type": "string", "format": fmt}):
        v = SchemaValidator(schema)
        for value in good:
            assert v.error(json.dumps(value)) is None, (fmt, value)
        for value in bad:
            assert v.error(json.dumps(value)) is not None, (fmt, value)
    assert SchemaValidator({"format": fmt}).error("3") is None  # formats apply to strings only


def test_compile_path_relaxes_only_relaxable_refusals(compilers):
    schema = {"type": "object", "properties": {"n": {"oneOf": [I, S]}, "s": {"type": "string", "not": {"const": "x"}}}}
    grammar = compilers["llguidance"].compile(_spec(schema))
    assert grammar.relaxation.keywords == ("not", "oneOf")
    assert grammar.relaxation.schema == schema
    assert json.loads(grammar.spec.source) == relax_schema(schema)[0]  # the grammar enforces the relaxed one
    assert compilers["llguidance"].compile(_spec({"type": "string"})).relaxation is None  # exact: unchanged
    for bad, message in [
        ({"allOf": [S, I], "not": I}, "Unsatisfiable"),  # relaxed and still refused: the reason of both
        ({"type": "object", "patternProperties": {"a": {}, "b": {}}, "additionalProperties": False}, "disjoint"),
    ]:
        with pytest.raises(ConstraintError, match=message):
            compilers["llguidance"].compile(_spec(bad))


def test_prepare_relaxing_tries_level_1_when_level_0_is_refused():
    seen = []

    def attempt(spec, name):
        seen.append(json.loads(spec.source))
        from plait.runtime.constrained.backends.base import UnsupportedConstraint

        if "allOf" in spec.source or "oneOf" in spec.source:  # refuse the original and level 0
            raise UnsupportedConstraint("llguidance: oneOf constraints are not supported")
        return "ok"

    schema = {"oneOf": [S], "if": I, "then": S, "else": I}
    name, result, relaxed = prepare_relaxing(_spec(schema), ("llguidance",), attempt)
    assert (name, result) == ("llguidance", "ok")
    assert json.loads(relaxed[0]) == {"anyOf": [S]} and relaxed[1] == ["else", "if", "oneOf", "then"]
    assert len(seen) == 3  # exact, level 0, level 1
