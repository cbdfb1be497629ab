"""llguidance's JSON formatting and compilation: json.dumps documents are never refused token by token
(MaskBench regressions), whitespace stays bounded, separators and keys are still forced, and a grammar
is compiled once."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from plait.runtime.constrained import ConstraintKind, ConstraintSpec, GrammarCompiler, GrammarState
from plait.runtime.constrained.backends.base import UnsupportedConstraint
from tests.runtime.constrained.conftest import walk

pytestmark = pytest.mark.model  # the bundled model's tokenizer

EOS = 2  # SmolLM2's <|im_end|>


def _obj(props: dict, required: bool = False) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required else [],
            "additionalProperties": False}


# A valid json.dumps document that the fixed-separator options refused at a token spanning the end of a
# forced stretch and the free bytes after it (MaskBench schemas plait failed and llguidance passed).
REGRESSIONS = [
    # `": "` + `"#!` are forced; the document's tokens are ` "#` + `!"`, so ` "#` crosses the stretch's end
    ({"properties": {"p": {"type": "string", "pattern": "^#!"}}}, {"p": "#!"}),
    # the const's closing quote and the braces are forced; the document's `"}` token spans quote + brace
    (_obj({"a": _obj({"b": _obj({"c": {"const": "x"}})}), "z": {"type": "integer"}}), {"a": {"b": {"c": "x"}}, "z": 1}),
    (_obj({"a": _obj({"b": _obj({"c": {"const": "hello world"}})}), "name": {"type": "integer"}}),
     {"a": {"b": {"c": "hello world"}}, "name": 7}),
]


def _state(compilers, info, schema) -> GrammarState:
    grammar = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(schema)))
    return GrammarState(grammar, info, frozenset({EOS}), jump_forward=False)


@pytest.mark.parametrize("schema, doc", REGRESSIONS)
def test_json_dumps_documents_are_accepted_token_by_token(compilers, tokenizer_info, schema, doc):
    state = _state(compilers, tokenizer_info, schema)
    assert walk(state, tokenizer_info, json.dumps(doc, ensure_ascii=False)) == (True, True)


@pytest.mark.parametrize("text, ok", [
    ('{"p": "a", "q": [1, 2]}', True),       # json.dumps
    ('{ "p": "a", "q": [ 1, 2 ] }', True),   # one more space at a boundary
    ('{"p":  "a"}', True),
    ('{"p":   "a"}', False),                 # but never two more
    ('{"p": "a",  "q": []}', True),
    ('{"p": "a",   "q": []}', False),
    ('{"p":\n"a"}', False),                  # no newlines
    ('{"p":"a"}', False),                    # the separators are json.dumps'
])
def test_whitespace_is_bounded(compilers, tokenizer_info, text, ok):
    schema = {"type": "object", "properties": {"p": {"type": "string"}, "q": {"type": "array", "items": {"type": "integer"}}}}
    state = _state(compilers, tokenizer_info, schema)
    accepted, complete = walk(state, tokenizer_info, text)
    assert (accepted and complete) == ok


def test_separators_and_keys_are_still_forced(compilers, tokenizer_info):
    """Forced stretches end where a space may follow; what a JSON token has begun is forced."""
    schema = _obj({"name": {"type": "string"}, "age": {"type": "integer"}}, required=True)
    for prefix, forced in [("", b"{"), ('{"', b'name"'), ('{"name":', b" "), ('{"name": "Bob"', b""),
                           ('{"name": "Bob",', b" "), ('{"name": "Bob", "', b'age"')]:
        state = _state(compilers, tokenizer_info, schema)
        assert walk(state, tokenizer_info, prefix)[0]
        assert state.matcher.forced_bytes() == forced, prefix


def _count_compiles(backend, monkeypatch) -> list[str]:
    """Replace the backend's llguidance module by one that records each grammar compilation (a matcher
    built, or a grammar validated) and otherwise behaves the same."""
    real = backend._llg
    calls: list[str] = []

    def matcher(*args, **kwargs):
        calls.append("LLMatcher")
        return real.LLMatcher(*args, **kwargs)

    def validate(*args, **kwargs):
        calls.append("validate")
        return real.LLMatcher.validate_grammar_with_warnings(*args, **kwargs)

    for name in ("grammar_from_json_schema", "grammar_from_regex", "grammar_from_lark"):
        setattr(matcher, name, getattr(real.LLMatcher, name))
    matcher.validate_grammar_with_warnings = validate
    matcher.validate_grammar = validate
    monkeypatch.setattr(backend, "_llg", SimpleNamespace(LLMatcher=matcher, LLTokenizer=real.LLTokenizer,
                                                         TokenizerWrapper=real.TokenizerWrapper))
    return calls


@pytest.mark.parametrize("kind, source", [
    (ConstraintKind.JSON_SCHEMA, '{"type":"object","properties":{"a":{"type":"integer"}}}'),
    (ConstraintKind.REGEX, r"[a-z]{3}\d"),
    (ConstraintKind.GRAMMAR, 'start: "x" NUM\nNUM: /[0-9]+/'),
])
def test_a_grammar_is_compiled_once(tokenizer_info, monkeypatch, kind, source):
    compiler = GrammarCompiler(tokenizer_info, backend="llguidance")
    try:
        backend = compiler.backend_named("llguidance")
        backend.tokenizer_for(tokenizer_info)
        calls = _count_compiles(backend, monkeypatch)
        grammar = compiler.compile(ConstraintSpec(kind, source))
        assert calls == ["LLMatcher"]  # in this process: the validating matcher is the grammar's prototype
        state = GrammarState(grammar, tokenizer_info, frozenset({EOS}))
        assert state.matcher.forced_bytes() is not None
        calls.clear()
        spec = ConstraintSpec(kind, source + " ")  # a compile worker's half, then the engine's
        payload = backend.prepare(spec, tokenizer_info)
        assert calls == ["LLMatcher"]
        backend.load(spec, payload, tokenizer_info)
        assert calls == ["LLMatcher", "LLMatcher"]
    finally:
        compiler.shutdown()


def _rows_both_ways(state: GrammarState, info, text: str) -> list[tuple[list[int], list[int]]]:
    """At each token of ``text`` (and at its end): the mask as ``fill_bitmask`` writes it, and with the
    stop and special bits fixed by GrammarState itself (the path taken when the backend's end bits are
    not the request's)."""
    fast = torch.zeros(info.bitmask_words, dtype=torch.int32)
    slow = torch.zeros(info.bitmask_words, dtype=torch.int32)
    rows = []
    for token in [*info.encode(text), None]:
        state.fill_bitmask(fast)
        state._exact = False
        state.fill_bitmask(slow)
        state._exact = True
        rows.append((fast.tolist(), slow.tolist()))
        if token is not None:
            assert state.accept_token(token) is None or state.complete
    return rows


def test_llguidance_end_bits_are_exact_for_json_regex_and_choices(tokenizer_info, compilers):
    """llguidance's masks allow the tokenizer's end ids exactly where the grammar can end and no other
    special token: for a request whose stop tokens are those, fill_bitmask leaves its mask as written --
    the same rows, bit for bit, as fixing the bits in Python."""
    backend = compilers["llguidance"].backend_named("llguidance")
    assert backend.end_ids(tokenizer_info) == tokenizer_info.stop_ids == frozenset({EOS})
    cases = [
        (ConstraintKind.JSON_SCHEMA, '{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"array",'
                                     '"items":{"type":"string"}}},"required":["a"]}', '{"a": 12, "b": ["x", "yz"]}'),
        (ConstraintKind.REGEX, r"[a-z]+( [0-9]{1,3})?", "abc 12"),
        (ConstraintKind.CHOICES, '["yes", "yes please", "no"]', "yes please"),
    ]
    for kind, source, text in cases:
        grammar = compilers["llguidance"].compile(ConstraintSpec(kind, source))
        assert grammar.mask_end_ids == frozenset({EOS})
        state = GrammarState(grammar, tokenizer_info, frozenset({EOS}), jump_forward=False)
        assert state._exact
        rows = _rows_both_ways(state, tokenizer_info, text)
        assert all(fast == slow for fast, slow in rows)
        assert (rows[-1][0][EOS >> 5] >> (EOS & 31)) & 1 and not (rows[0][0][EOS >> 5] >> (EOS & 31)) & 1
    lark = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.GRAMMAR, 'start: "x" NUM\nNUM: /[0-9]+/'))
    assert lark.mask_end_ids is None  # a Lark grammar may name special tokens: GrammarState fixes the bits


def test_an_error_state_allows_nothing(tokenizer_info, compilers):
    """After a refused token llguidance's mask allows its end tokens; the request's row allows nothing."""
    grammar = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.REGEX, "ab"))
    state = GrammarState(grammar, tokenizer_info, frozenset({EOS}), jump_forward=False)
    assert state.accept_token(tokenizer_info.encode("zz")[0])["type"] == "abort"
    row = torch.full((tokenizer_info.bitmask_words,), -1, dtype=torch.int32)
    state.fill_bitmask(row)
    assert not bool(row.any())


@pytest.mark.parametrize("kind, source", [(ConstraintKind.GRAMMAR, 'start: a\na: a "x"'),
                                          (ConstraintKind.REGEX, "[^\\x00-\\x{10FFFF}]")])
def test_a_grammar_that_allows_nothing_is_refused_at_compile(compilers, kind, source):
    """The check on the first mask (no token allowed, not accepting) refuses it; the empty output alone
    is fine."""
    backend = compilers["llguidance"].backend_named("llguidance")
    with pytest.raises(UnsupportedConstraint, match="matches no output at all"):
        backend.compile(ConstraintSpec(kind, source), compilers["llguidance"].info)
    assert backend.compile(ConstraintSpec(ConstraintKind.REGEX, ""), compilers["llguidance"].info)


@pytest.mark.parametrize("kind, source", [
    (ConstraintKind.JSON_SCHEMA, json.dumps(_obj({"name": {"type": "string"}, "n": {"type": "integer"}}, True))),
    (ConstraintKind.JSON_SCHEMA, '{"type":"array","items":{"enum":["a","b"]}}'),
    (ConstraintKind.REGEX, r"(yes|no)?"),
    (ConstraintKind.CHOICES, '["Paris", "Rome"]'),
    (ConstraintKind.GRAMMAR, 'start: "x" NUM\nNUM: /[0-9]+/'),
])
@pytest.mark.parametrize("stop", [frozenset({EOS}), frozenset({EOS, 7})])
def test_the_compile_time_mask_is_each_requests_first_mask(tokenizer_info, compilers, kind, source, stop):
    """The mask that checked the grammar at compile is the grammar's start mask: a request's first row
    is that copy, bit for bit the row its matcher computes (with the request's stop bits), and the
    matcher computes it no second time."""
    grammar = compilers["llguidance"].compile(ConstraintSpec(kind, source))
    assert grammar.start_mask is not None and len(grammar.start_mask) == 4 * tokenizer_info.bitmask_words
    reused, computed = (GrammarState(grammar, tokenizer_info, stop, jump_forward=False) for _ in range(2))
    computed._start_mask = None
    fills = []
    inner = reused._fill_ptr
    reused._fill_ptr = lambda address, nbytes: fills.append(nbytes) or inner(address, nbytes)
    rows = [torch.full((tokenizer_info.bitmask_words,), 77, dtype=torch.int32) for _ in range(2)]
    reused.fill_bitmask(rows[0])
    computed.fill_bitmask(rows[1])
    assert fills == [] and torch.equal(rows[0], rows[1])
    words = [w & 0xFFFFFFFF for w in rows[0].tolist()]
    token = next(i for i in range(tokenizer_info.vocab_size) if words[i >> 5] >> (i & 31) & 1 and i not in stop)
    for state, row in zip((reused, computed), rows):  # then each state's own masks, alike
        assert (state.accept_token(token) or {}).get("type") != "abort"
        state.fill_bitmask(row)
    assert len(fills) == 1 and torch.equal(rows[0], rows[1])
