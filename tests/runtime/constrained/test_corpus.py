"""The schema corpus walked token by token through the matchers: valid documents are accepted and end
complete (EOS allowed), invalid ones are refused at some token or never complete.

Every schema goes through the engine's default choice ("auto"); schemas that outlines-core can
translate exactly also go through outlines alone, and the rest must be refused by it naming a keyword.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from plait.runtime.constrained import (
    ConstraintError,
    ConstraintKind,
    ConstraintSpec,
    GrammarState,
)
from tests.runtime.constrained.conftest import stop_allowed, walk
from tests.runtime.constrained.schema_corpus import CASES, UNSUPPORTED

EOS = 2  # SmolLM2's <|im_end|>
# jsonschema has no checker for these formats without extra packages: their invalid documents are
# checked by the walks only.
UNCHECKED_FORMATS = {"fmt_time", "fmt_datetime", "fmt_uri"}
# outlines-core is narrower than the schema here, so some valid documents are refused (stricter output
# is still valid; invalid documents must still fail): its time format takes "Z" only, no offsets; it
# forbids undeclared properties when additionalProperties is absent; and (0.2.x) its index refuses a
# lone "." token after digits, so "-2.5" must be written with a ".5"-style token.
OUTLINES_NARROWER = {"fmt_time", "addprops_absent", "num_plain_number"}

pytestmark = pytest.mark.model  # uses the bundled model's tokenizer


def _spec(schema) -> ConstraintSpec:
    return ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(schema))


def test_corpus_is_large_and_covers_every_feature():
    assert len(CASES) >= 100
    text = json.dumps([c.schema for c in CASES])
    for keyword in ("format", "enum", "minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "pattern",
                    "minimum", "maximum", "additionalProperties", "required", "const"):
        assert f'"{keyword}"' in text, keyword
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_corpus_documents_agree_with_jsonschema(case):
    """The corpus itself is right: valid documents validate, invalid ones do not (formats checked)."""
    validator = jsonschema.Draft202012Validator(case.schema, format_checker=jsonschema.FormatChecker(("date", "email", "ipv4", "uuid")))
    for doc in case.valid:
        validator.validate(doc)
    for doc in case.invalid:
        if case.name not in UNCHECKED_FORMATS:
            assert not validator.is_valid(doc), f"{doc!r} is valid for {case.name}"


def _text(doc) -> str:
    return json.dumps(doc, ensure_ascii=False)  # grammars emit characters, not \u escapes


def _check_walks(compiler, info, case, check_valid: bool = True) -> None:
    grammar = compiler.compile(_spec(case.schema))
    for doc in case.valid if check_valid else []:
        state = GrammarState(grammar, info, frozenset({EOS}))
        accepted, complete = walk(state, info, _text(doc))
        assert accepted and complete, f"{grammar.backend_name} refused valid {json.dumps(doc)} for {case.name}"
        assert stop_allowed(state, info, EOS)
    for doc in case.invalid:
        state = GrammarState(grammar, info, frozenset({EOS}))
        accepted, complete = walk(state, info, _text(doc))
        assert not (accepted and complete), f"{grammar.backend_name} accepted invalid {json.dumps(doc)} for {case.name}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_default_backend_walks(case, compilers, tokenizer_info):
    _check_walks(compilers["auto"], tokenizer_info, case)


def test_outlines_walks_or_names_what_it_lacks(compilers, tokenizer_info):
    refused = []
    for case in CASES:
        try:
            compilers["outlines"].compile(_spec(case.schema))
        except ConstraintError as exc:
            assert "outlines" in str(exc).lower()
            refused.append(case.name)
            continue
        _check_walks(compilers["outlines"], tokenizer_info, case, check_valid=case.name not in OUTLINES_NARROWER)
    assert len(refused) < len(CASES) // 2, refused  # it serves most of the corpus exactly


@pytest.mark.parametrize("name,schema,keyword", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_keyword_compiles_relaxed_naming_it(name, schema, keyword, compilers):
    grammar = compilers["auto"].compile(_spec(schema))  # no backend compiles it exactly: relaxed (relax.py)
    assert grammar.relaxation is not None and keyword in grammar.relaxation.keywords
    assert grammar.relaxation.schema == schema
