"""Ending within the token budget (budget.py): the shortest-completion search on the bundled tokenizer
for JSON schema, regex and Lark on both backends, and BudgetSteering's decisions (when it searches,
when it closes, when it replaces a sampled token)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from plait.runtime.constrained import ConstraintKind, ConstraintSpec, GrammarState
from plait.runtime.constrained.budget import (
    FIRST_CHECK_BUDGET,
    BudgetSteering,
    SearchLimits,
    shortest_completion,
)

# generous bounds: these tests are about what the search finds, not about the machine's speed
ROOMY = SearchLimits(max_tokens=64, max_nodes=5000, max_seconds=5.0)
ORDER = {"type": "object", "properties": {
    "id": {"type": "integer"},
    "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                 "required": ["name", "email"]},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "qty": {"type": "integer"}},
        "required": ["sku", "qty"]}},
    "note": {"type": "string"}},
    "required": ["id", "customer", "items"]}
EMAIL = r"[a-z]{3,}@[a-z]+\.com"
LARK = 'start: "(" expr ")"\nexpr: WORD (" + " WORD)*\nWORD: /[a-z]{2,5}/'


def _state(compilers, backend: str, kind: ConstraintKind, source, tokenizer_info, prefix: str) -> GrammarState:
    text = json.dumps(source) if kind is ConstraintKind.JSON_SCHEMA else source
    grammar = compilers[backend].compile(ConstraintSpec(kind, text))
    state = GrammarState(grammar, tokenizer_info, frozenset(tokenizer_info.stop_ids))
    for token in tokenizer_info.encode(prefix):
        assert state.accept_token(token) is None, prefix
    return state


def _ending(state: GrammarState, info, limits: SearchLimits = ROOMY) -> tuple[list[int], str]:
    row = torch.empty(info.bitmask_words, dtype=torch.int32)
    state.fill_bitmask(row)
    before = row.clone()
    path = shortest_completion(state.matcher, info, limits)
    state.fill_bitmask(row)
    assert torch.equal(row, before), "the search must leave the matcher where it was"
    assert path is not None
    return path, info.bytes_of(path).decode()


@pytest.mark.parametrize("prefix, most", [
    ('{"id": 12, "customer": {"name": "Ada Lov', 24),                        # inside a string, keys left
    ('{"id": 1234', 28),                                                    # inside a number
    ('{"id": 1, "customer": {"name": "A", "email": "a@b.c"}, "items": [{"sku": "AB', 16),  # a pattern
    ('{"id": 1, "customer": {"name": "A", "email": "a@b.c"}, "items": [{"sku": "ABC-123", "qty": 4}, ', 22),
    ('{"id": 1, "customer": {"name": "A", "email": "a@b.c"}, "items": [], "note": "ok', 3),
])
def test_json_ending_parses_and_validates(compilers, tokenizer_info, prefix, most):
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
    path, text = _ending(state, tokenizer_info)
    jsonschema.validate(json.loads(prefix + text), ORDER)
    assert 0 < len(path) <= most, (prefix, text, len(path))
    for token in path:  # the grammar takes it, token by token, and may end after it
        assert state.accept_token(token) is None or state.complete
    assert state.complete


@pytest.mark.parametrize("backend", ["llguidance", "outlines"])
@pytest.mark.parametrize("prefix", ["a", "abcd@x", "abc@mail."])
def test_regex_ending_matches_on_both_backends(compilers, tokenizer_info, backend, prefix):
    state = _state(compilers, backend, ConstraintKind.REGEX, EMAIL, tokenizer_info, prefix)
    path, text = _ending(state, tokenizer_info)
    assert re.fullmatch(EMAIL, prefix + text), prefix + text
    assert len(path) <= 6


def test_lark_ending(compilers, tokenizer_info):
    state = _state(compilers, "llguidance", ConstraintKind.GRAMMAR, LARK, tokenizer_info, "(ab + c")
    path, text = _ending(state, tokenizer_info)
    assert re.fullmatch(r"\([a-z]{2,5}( \+ [a-z]{2,5})*\)", "(ab + c" + text), text
    assert len(path) <= 3


def test_complete_state_needs_nothing_and_tight_bounds_give_none(compilers, tokenizer_info):
    done = _state(compilers, "llguidance", ConstraintKind.REGEX, r"\d+", tokenizer_info, "42")
    assert shortest_completion(done.matcher, tokenizer_info) == []
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, "{")
    assert shortest_completion(state.matcher, tokenizer_info, SearchLimits(max_tokens=3)) is None
    assert shortest_completion(state.matcher, tokenizer_info, SearchLimits(max_nodes=1)) is None


def _steering(tokenizer_info, margin: int = 1) -> BudgetSteering:
    return BudgetSteering(tokenizer_info, min(tokenizer_info.stop_ids), margin=margin, limits=ROOMY)


def test_steering_searches_only_near_the_end_and_closes_with_a_stop_token(compilers, tokenizer_info):
    prefix = '{"id": 1, "customer": {"name": "Ada'
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
    steering = _steering(tokenizer_info)
    assert steering.closing_tokens(state.matcher, FIRST_CHECK_BUDGET + 1) == [] and steering.searches == 0
    path, _ = _ending(state, tokenizer_info)
    assert steering.closing_tokens(state.matcher, len(path) + 40) == [] and steering.searches == 1
    assert steering.closing_tokens(state.matcher, len(path) + 39) == [] and steering.searches == 1  # slack halves first
    ending = steering.closing_tokens(state.matcher, len(path) + 2)  # slack 1 with the stop token: close
    assert ending[-1] == min(tokenizer_info.stop_ids) and steering.closed
    jsonschema.validate(json.loads(prefix + tokenizer_info.bytes_of(ending[:-1]).decode()), ORDER)
    assert steering.closing_tokens(state.matcher, 1) == []  # closed: nothing more
    # with exactly the ending's length left there is no room for the stop token: the ending alone
    other = _steering(tokenizer_info)
    assert other.closing_tokens(state.matcher, len(path)) == path


def test_steering_replaces_a_token_after_which_no_ending_fits(compilers, tokenizer_info):
    prefix = '{"id": 1, "customer": {"name": "A", "email": "a@b.c"}, "items": ['
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
    path, _ = _ending(state, tokenizer_info)  # `]}`: a couple of tokens
    steering = _steering(tokenizer_info)
    budget = len(path) + 4
    assert steering.closing_tokens(state.matcher, budget) == []  # slack 3: vet the next token
    opener = tokenizer_info.encode('{"')[0]  # an item with two required keys: its ending is far longer
    replaced = steering.vet(state.matcher, opener, budget)
    assert replaced is not None and replaced[-1] == min(tokenizer_info.stop_ids) and steering.replaced == 1
    jsonschema.validate(json.loads(prefix + tokenizer_info.bytes_of(replaced[:-1]).decode()), ORDER)
    # a token that keeps an ending within the budget is let through, and its ending is reused (no search)
    calm = _steering(tokenizer_info)
    assert calm.closing_tokens(state.matcher, budget + 8) == []
    space = tokenizer_info.encode(" ")[0]
    assert calm.vet(state.matcher, space, budget + 8) is None
    searches = calm.searches
    state.accept_token(space)
    calm.consumed(space)
    assert calm.closing_tokens(state.matcher, budget + 7) == [] and calm.searches == searches


def test_already_complete_output_is_not_cut_short(compilers, tokenizer_info):
    state = _state(compilers, "llguidance", ConstraintKind.REGEX, r"[a-z]+", tokenizer_info, "abc")
    steering = _steering(tokenizer_info)
    assert steering.closing_tokens(state.matcher, 2) == [] and not steering.closed
    assert steering.vet(state.matcher, tokenizer_info.encode("d")[0], 2) is None


def test_search_never_feeds_the_matcher_a_refused_token(compilers, tokenizer_info):
    # the canonical re-tokenization of an ending can differ from what the grammar allows token by token;
    # a refused token would leave llguidance's matcher in an error state for good
    for prefix in ('{"id": 12, "customer": {"name": "Ada', '{"id": 1, "customer": {"name": "A", "email": "a'):
        state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
        shortest_completion(state.matcher, tokenizer_info, ROOMY)
        assert state.matcher.error() is None
    refused = _state(compilers, "llguidance", ConstraintKind.REGEX, r"\d+", tokenizer_info, "1")
    steering = _steering(tokenizer_info)
    assert steering.closing_tokens(refused.matcher, 3) == []  # complete, slack small: vetting
    assert steering.vet(refused.matcher, tokenizer_info.encode("a")[0], 3) is None
    assert refused.matcher.error() is None


def test_without_a_stop_token_the_ending_stands_alone(compilers, tokenizer_info):
    state = _state(compilers, "llguidance", ConstraintKind.REGEX, EMAIL, tokenizer_info, "abcd@x")
    path, _ = _ending(state, tokenizer_info)
    steering = BudgetSteering(tokenizer_info, None, margin=1, limits=ROOMY)  # ignore_eos: no stop token
    assert steering.closing_tokens(state.matcher, len(path) + 1) == path
