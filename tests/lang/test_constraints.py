"""An invalid regex / JSON schema fails where it is written: ``gen()`` (and run-level defaults) raise
``InvalidConstraintError`` before any backend sees it. (The same mistakes on every backend:
tests/lang/backends/test_endpoint_backend.py::test_the_same_constraint_mistake_raises_the_same_error.)"""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang import InvalidConstraintError, MockBackend, PlaitLangError
from plait.lang.backends.base import GenerateCall
from plait.lang.constraints import check_json_schema, check_regex, constraint_refusal
from plait.sampling import SamplingParams

BAD_REGEXES = {
    "(unclosed": "is not a valid regex",
    r"(?=a)b": "look-ahead",
    r"(?<!x)y": "look-ahead/look-behind",
    r"(a)\1": "backreference",
    r"(a)?(?(1)b|c)": "conditional",
    r"(?>ab)": "atomic group",
    r"\bword": "word boundary",
    r"\Aabc": r"\\A",
}
GOOD_REGEXES = [r"^ab$", r"a+?", r"(?P<x>a)[\b]", r"(?i)yes|no", r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}\d+"]
BAD_SCHEMAS = {
    '{"type": "object", "properties": {"a": {"type": "strng"}}}': "at #/properties/a: unknown type 'strng'",
    '{"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}': "points at nothing",
    '{"$ref": "https://example.com/s.json"}': "is not local",
    '{"type": "object", "required": "a"}': "'required' must be a list",
    '{"anyOf": []}': "'anyOf' must be a non-empty list",
    '{"enum": []}': "'enum' must be a non-empty list",
    '{"type": "string", "maxLength": -1}': "'maxLength' must be an int >= 0",
    '{"type": "string", "pattern": "(?=x)"}': "look-ahead",
    "[1, 2]": "must be a JSON object",
    "false": "matches no document",
    "{'type': 'object'}": "is not valid JSON",
}
GOOD_SCHEMAS = [
    {}, True, {"type": ["string", "null"]},
    {"$defs": {"P": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}},
     "type": "array", "items": {"$ref": "#/$defs/P"}, "minItems": 1},
]


@pytest.mark.parametrize("regex", sorted(BAD_REGEXES))
def test_a_bad_regex_fails_at_gen(regex):
    with pytest.raises(InvalidConstraintError, match=BAD_REGEXES[regex]) as info:
        pl.gen("x", regex=regex)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PlaitLangError)


@pytest.mark.parametrize("regex", GOOD_REGEXES)
def test_regexes_constrained_decoding_serves_pass(regex):
    assert pl.gen("x", regex=regex).overrides_dict()["regex"] == regex


@pytest.mark.parametrize("schema", sorted(BAD_SCHEMAS))
def test_a_bad_json_schema_fails_at_gen(schema):
    with pytest.raises(InvalidConstraintError, match=BAD_SCHEMAS[schema].replace("$", r"\$")):
        pl.gen("x", json_schema=schema)


@pytest.mark.parametrize("schema", GOOD_SCHEMAS, ids=str)
def test_good_schemas_pass(schema):
    assert check_json_schema(schema)


def test_pydantic_models_pass():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        friends: list["Person"] = []

    assert '"$ref"' in pl.gen("p", json_schema=Person).overrides_dict()["json_schema"]


def test_stop_regex_and_ebnf_are_checked_too():
    with pytest.raises(InvalidConstraintError, match="stop_regex '\\(x' is not a valid regex"):
        pl.gen("x", stop_regex=["ok", "(x"])
    assert pl.gen("x", stop_regex=r"(?=\.)").overrides_dict()["stop_regex"] == (r"(?=\.)",)  # Python's re matches it
    with pytest.raises(InvalidConstraintError, match="ebnf must be a non-empty grammar"):
        pl.gen("x", ebnf="   ")
    with pytest.raises(InvalidConstraintError, match="json_schema must be a dict"):
        pl.gen("x", json_schema=3)


def test_run_level_defaults_are_checked_like_gen(mock):
    prog = pl.function(lambda s: s.__iadd__(pl.gen("x", max_tokens=2)))
    with pytest.raises(InvalidConstraintError, match="look-ahead"):
        prog.run(backend=mock, regex=r"(?=a)a")
    with pytest.raises(InvalidConstraintError, match="unknown type"):
        prog.run_batch([{}], backend=mock, json_schema={"type": "text"})
    assert mock.calls_of("generate") == []


def test_the_mock_checks_what_reaches_it_directly():
    with pytest.raises(InvalidConstraintError, match="backreference"):
        MockBackend().generate(GenerateCall("x", SamplingParams(regex=r"(a)\1")))


def test_constraint_refusal_maps_only_refusals_of_a_constraint():
    constrained = SamplingParams(regex=r"\d+")
    error = constraint_refusal("sampling parameter 'regex': cannot serve", constrained, "endpoint x")
    assert isinstance(error, InvalidConstraintError) and "endpoint x refused the regex constraint" in str(error)
    assert constraint_refusal("the prompt is too long", constrained, "x") is None
    assert constraint_refusal("bad regex", SamplingParams(), "x") is None


def test_check_regex_on_its_own():
    assert check_regex(r"\d+") == r"\d+"
    with pytest.raises(InvalidConstraintError, match="non-empty str"):
        check_regex("")
