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
from plait.runtime.constrained import budget as budget_mod
from plait.runtime.constrained.budget import (
    FIRST_CHECK_BUDGET,
    MAX_ESCALATION,
    START_LIMITS,
    BudgetSteering,
    SearchLimits,
    candidates_for,
    shortest_completion,
    start_ending,
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


def test_a_spaced_candidate_is_left_out_where_its_unspaced_twin_is_allowed(tokenizer_info):
    cands = candidates_for(tokenizer_info)
    empty, spaced = tokenizer_info.encode('""'), tokenizer_info.encode(' ""')
    assert len(empty) == 1 and len(spaced) == 1
    row = torch.zeros(tokenizer_info.bitmask_words, dtype=torch.int32)
    for token in (empty[0], spaced[0]):
        row[token >> 5] |= 1 << (token & 31)
    assert cands.allowed(row, (3, 2, 2, 1, 1, 3)) == empty  # optional whitespace only costs a token
    row.zero_()
    row[spaced[0] >> 5] |= 1 << (spaced[0] & 31)
    assert cands.allowed(row, (3, 2, 2, 1, 1, 3)) == spaced  # alone, the spaced one stays


def test_allowed_candidates_are_the_first_of_each_group_in_rank_order(tokenizer_info):
    """``ClosingCandidates.allowed`` against a plain reading of its contract on random masks of every
    density: the allowed candidates of each rank group in rank order, at most ``per_group[g]`` of group
    ``g``, a spaced candidate left out where its unspaced twin is allowed."""
    import numpy as np

    cands = candidates_for(tokenizer_info)
    ids, groups = cands.ids.tolist(), np.searchsorted(cands.bounds, np.arange(len(cands.ids)), side="right") - 1
    rng = np.random.default_rng(0)
    for density in (0.0, 0.002, 0.02, 0.2, 0.6, 1.0):
        for per_group in ((3, 2, 2, 1, 1, 3), (0, 5, 0, 2, 0, 1), (100,) * 6):
            bits = rng.random(tokenizer_info.bitmask_words * 32) < density
            row = torch.from_numpy(np.packbits(bits, bitorder="little").view(np.int32).copy())
            allowed = [bool(bits[t]) for t in ids]
            expected, taken = [], [0] * len(per_group)
            for i, token in enumerate(ids):
                twin = cands.unspaced[i]
                if not allowed[i] or (twin >= 0 and allowed[twin]) or groups[i] >= len(per_group):
                    continue
                if taken[groups[i]] < per_group[groups[i]]:
                    taken[groups[i]] += 1
                    expected.append(token)
            assert cands.allowed(row, per_group) == expected, (density, per_group)
            # again (its candidates' bits seen before: the answer kept), as numpy, and unharmed by a
            # caller that changes the list it got
            again = cands.allowed(row.numpy(), per_group)
            assert again == expected
            again.append(-1)
            assert cands.allowed(row, per_group) == expected
            # another mask with the same candidates' bits (a non-candidate token flipped): the same answer
            other = bits.copy()
            other[np.setdiff1d(np.arange(2, 50), cands.ids)[0]] ^= True
            assert cands.allowed(np.packbits(other, bitorder="little").view(np.int32), per_group) == expected


def test_json_endings_write_no_optional_whitespace(compilers, tokenizer_info):
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, "")
    path = shortest_completion(state.matcher, tokenizer_info)  # the engine's per-step bounds
    text = tokenizer_info.bytes_of(path).decode()
    jsonschema.validate(json.loads(text), ORDER)
    # was 30 tokens: '{"id" : 0 , "customer" :  {"name" : "" , ...' (a space token before each `:`)
    assert " :" not in text and " ," not in text and len(path) <= 25, (len(path), text)


def test_start_ending_is_searched_once_per_grammar(compilers, tokenizer_info, monkeypatch):
    grammar = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.REGEX, EMAIL))
    calls = []
    search = budget_mod.shortest_completion
    monkeypatch.setattr(budget_mod, "shortest_completion", lambda *a: calls.append(1) or search(*a))
    first = start_ending(grammar, tokenizer_info, ROOMY)
    assert first and re.fullmatch(EMAIL, tokenizer_info.bytes_of(first).decode())
    assert start_ending(grammar, tokenizer_info, ROOMY) == first and len(calls) == 1
    start_ending(grammar, tokenizer_info, SearchLimits(max_nodes=1))  # other bounds: searched for them
    assert len(calls) == 2


def test_a_budget_tight_from_the_start_follows_the_planned_start_ending(compilers, tokenizer_info):
    # per-step searches that find nothing (one matcher state): only the plan made before token 0 can help
    grammar = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(ORDER)))
    plan = start_ending(grammar, tokenizer_info, START_LIMITS)
    stop = min(tokenizer_info.stop_ids)
    budget = len(plan) + 1

    def steering(planned: bool) -> tuple[GrammarState, BudgetSteering]:
        state = GrammarState(grammar, tokenizer_info, frozenset(tokenizer_info.stop_ids),
                             budget_limits=SearchLimits(max_nodes=1))
        if planned:
            state.steering.prepare(grammar, budget)
        return state, state.steering

    state, unplanned = steering(False)
    assert unplanned.closing_tokens(state.matcher, budget) == []  # nothing known, nothing found: cut later
    state, planned = steering(True)
    assert planned.closing_tokens(state.matcher, budget) == plan + [stop] and planned.searches == 0
    jsonschema.validate(json.loads(tokenizer_info.bytes_of(plan).decode()), ORDER)
    # a roomy budget needs no plan from the start (the first search runs when it is due)
    state, roomy = steering(False)
    roomy.prepare(grammar, FIRST_CHECK_BUDGET + 1)
    assert roomy._plan is None


def test_prepare_without_search_plans_only_from_cached_endings(compilers, tokenizer_info, monkeypatch):
    """A caller that must not block (a server's command loop) plans from cached start endings only."""
    grammar = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.REGEX, "[a-z]{3,9}@[a-z]{2,5}\\.org"))
    calls = []
    search = budget_mod.shortest_completion
    monkeypatch.setattr(budget_mod, "shortest_completion", lambda *a: calls.append(1) or search(*a))

    def planned(search_allowed: bool) -> list[int] | None:
        state = GrammarState(grammar, tokenizer_info, frozenset(tokenizer_info.stop_ids))
        state.steering.prepare(grammar, 12, search=search_allowed)
        return state.steering._plan

    assert not budget_mod.start_ending_known(grammar, SearchLimits())
    assert planned(False) is None and calls == []  # nothing cached: no plan, no search
    plan = planned(True)
    assert plan and calls and budget_mod.start_ending_known(grammar, SearchLimits())
    searched = len(calls)
    assert planned(False) == plan and len(calls) == searched  # cached now: the same plan, no search


def test_start_endings_of_other_grammars_do_not_wait_for_each_other(compilers, tokenizer_info, monkeypatch):
    """No lock is held while one grammar's start ending is searched: another grammar's search (or a
    cached lookup) goes on meanwhile; callers of the same grammar wait for its one search."""
    import threading

    slow = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.REGEX, "[0-9]{4}-[a-z]{3}"))
    fast = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.REGEX, "[0-9]{2}x"))
    entered, release = threading.Event(), threading.Event()
    search = budget_mod.shortest_completion

    def gated(matcher, info, limits, *rest):
        if matcher is gated.slow_matcher:
            entered.set()
            assert release.wait(10)
        return search(matcher, info, limits, *rest)

    new_matcher = slow.new_matcher
    monkeypatch.setattr(slow, "new_matcher", lambda: setattr(gated, "slow_matcher", new_matcher()) or gated.slow_matcher,
                        raising=False)
    monkeypatch.setattr(budget_mod, "shortest_completion", gated)
    results = {}
    slow_thread = threading.Thread(target=lambda: results.update(slow=start_ending(slow, tokenizer_info, ROOMY)))
    slow_thread.start()
    assert entered.wait(10)
    waiter = threading.Thread(target=lambda: results.update(again=start_ending(slow, tokenizer_info, ROOMY)))
    waiter.start()
    assert start_ending(fast, tokenizer_info, ROOMY)  # not blocked by the slow search in progress
    assert "again" not in results  # the second caller of the slow grammar waits for its one search
    release.set()
    slow_thread.join(10)
    waiter.join(10)
    assert results["slow"] and results["again"] == results["slow"]


def test_the_plan_moves_on_with_its_own_tokens_and_is_dropped_by_others(compilers, tokenizer_info):
    prefix = '{"id": 1, "customer": {"name": "A", "email": "a@b.c"}, "items": [], "note": "ok'
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
    steering = _steering(tokenizer_info)
    path, _ = _ending(state, tokenizer_info)
    budget = len(path) + 3
    assert steering.closing_tokens(state.matcher, budget) == [] and steering.searches == 1  # slack 2: vetting
    if len(path) == 1:  # make the plan two tokens long: the rest must stay planned
        path = tokenizer_info.encode('"}')
        steering._plan = list(path)
    assert steering.vet(state.matcher, path[0], budget) is None and steering.searches == 1  # no search
    state.accept_token(path[0])
    steering.consumed(path[0])
    assert steering._plan == path[1:]
    assert steering.closing_tokens(state.matcher, budget - 1) == [] and steering.searches == 1
    steering.consumed(tokenizer_info.encode("x")[0])  # another token: the plan no longer applies
    assert steering._plan is None


@pytest.mark.parametrize("prefix", ["", "Ab", "Ab cd"])
def test_a_space_the_grammar_requires_is_still_searched_first(compilers, tokenizer_info, prefix):
    # whitespace goes last only where it is layout (a structural token allowed, or right after a space):
    # between words of this regex it is the way to an ending and keeps its rank
    words = r"[A-Z][a-z]+( [a-z]+){2,}\."
    state = _state(compilers, "llguidance", ConstraintKind.REGEX, words, tokenizer_info, prefix)
    path = shortest_completion(state.matcher, tokenizer_info)  # the engine's per-step bounds
    assert path is not None and len(path) <= 6, path
    assert re.fullmatch(words, prefix + tokenizer_info.bytes_of(path).decode())


def test_a_check_that_finds_nothing_looks_again_at_the_next_step_with_twice_the_bounds(compilers, tokenizer_info):
    prefix = '{"id": 12, "customer": {"name": "Ada Lov'
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
    tight = SearchLimits(max_nodes=32, max_seconds=10.0)  # too few states here; twice as many are enough
    assert shortest_completion(state.matcher, tokenizer_info, tight) is None
    assert shortest_completion(state.matcher, tokenizer_info, SearchLimits(max_nodes=64, max_seconds=10.0))
    steering = BudgetSteering(tokenizer_info, min(tokenizer_info.stop_ids), limits=tight)
    assert steering.closing_tokens(state.matcher, 100) == [] and steering.searches == 1 and steering._plan is None
    assert steering.searches_without_ending == 1  # counted: the engine's /metrics show how often bounds are hit
    assert steering.closing_tokens(state.matcher, 99) == [] and steering.searches == 2  # at once, twice the bounds
    assert steering._plan is not None and steering._escalation == 1 and steering.searches_without_ending == 1
    # where no ending fits at all (this one needs 12 tokens), the bounds grow up to MAX_ESCALATION times
    # the engine's, then the next check waits a quarter of the budget (11, 10 (x2), 9 (x4), then 7)
    hopeless = BudgetSteering(tokenizer_info, min(tokenizer_info.stop_ids), limits=tight)
    for budget in range(11, 7, -1):
        assert hopeless.closing_tokens(state.matcher, budget) == []
    assert MAX_ESCALATION == 4 and hopeless.searches == 3 and hopeless._escalation == 1


def test_a_plan_that_no_longer_fits_is_never_appended(compilers, tokenizer_info):
    prefix = '{"id": 1, "customer": {"name": "A", "email": "a@b.c"}, "items": ['
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
    path, _ = _ending(state, tokenizer_info)
    steering = _steering(tokenizer_info)
    steering._plan = path * 3  # known, but longer than what is left
    opener = tokenizer_info.encode('{"')[0]
    assert steering.vet(state.matcher, opener, len(path) + 1) is None and steering.replaced == 0
    assert steering.searches == 0


def test_checks_reuse_the_last_ending_while_it_still_ends_the_grammar(compilers, tokenizer_info):
    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info,
                   '{"id": 1, "customer": {"name": "Ada')
    steering = _steering(tokenizer_info)
    path, _ = _ending(state, tokenizer_info)
    budget = len(path) + 8  # within the zone: a check at every token
    assert steering.closing_tokens(state.matcher, budget) == [] and steering.searches == 1

    def append(text: str) -> None:
        for token in tokenizer_info.encode(text):
            steering.consumed(token)
            assert state.accept_token(token) is None

    append(" Lovelace")  # more of the name: the same ending closes it, no search
    assert steering.closing_tokens(state.matcher, budget - 2) == [] and (steering.searches, steering.reused) == (1, 1)
    # a token vetted before it is appended: the ending still fits after it, no search either
    space = tokenizer_info.encode(" ")[0]
    assert steering.vet(state.matcher, space, budget - 2) is None and (steering.searches, steering.reused) == (1, 2)
    append('", "email": "a@b.c"}, "items": [')  # the name's ending no longer ends the grammar: a search
    assert steering.closing_tokens(state.matcher, budget - 3) == [] and steering.searches == 2
    ending = steering.closing_tokens(state.matcher, 3)
    jsonschema.validate(json.loads('{"id": 1, "customer": {"name": "Ada Lovelace", "email": "a@b.c"}, "items": ['
                                   + tokenizer_info.bytes_of(ending[:-1]).decode()), ORDER)


@pytest.mark.parametrize("prefix", ['{"id": 12, "customer": {"name": "Bob the build', '{"id": 3', '{"'])
def test_ending_checks_without_masks_agree_with_the_masked_ones(compilers, tokenizer_info, prefix):
    """llguidance's ``try_consume_tokens`` (no mask per token) answers ``_ends_with`` and vetting's
    consume as the masked checks do, on endings with tokens cut off or refused tokens put in, and
    never leaves the matcher in an error state or moved."""
    import random

    state = _state(compilers, "llguidance", ConstraintKind.JSON_SCHEMA, ORDER, tokenizer_info, prefix)
    matcher, row = state.matcher, torch.empty(tokenizer_info.bitmask_words, dtype=torch.int32)
    assert matcher.try_consume_tokens is not None
    path, _ = _ending(state, tokenizer_info)
    masked = type("Masked", (), {})()  # the same matcher without its fast path
    for name in ("consume", "rollback", "can_terminate", "is_terminated", "fill_bitmask"):
        setattr(masked, name, getattr(matcher, name))
    masked.try_consume_tokens = None
    before = row.clone()
    state.fill_bitmask(before)
    rng, verdicts = random.Random(0), set()
    for attempt in range(200):
        cut = rng.randrange(len(path) + 1)
        trial = path[:cut] + [rng.randrange(tokenizer_info.vocab_size)] + path[cut:] if rng.random() < 0.6 else path[:cut]
        trial = path if attempt == 0 else trial
        fast = budget_mod._ends_with(matcher, trial, row)
        assert fast == budget_mod._ends_with(masked, trial, row), trial
        verdicts.add(fast)
        token = trial[0] if trial else path[0]
        took = budget_mod._consume_one(matcher, row, token)
        if took:
            matcher.rollback(1)
        assert took == budget_mod._consume_one(masked, row, token)
        if took:
            matcher.rollback(1)
    assert verdicts == {True, False} and matcher.error() is None
    state.fill_bitmask(row)
    assert torch.equal(row, before), "the checks must leave the matcher where it was"


# an object of free properties, written as a model with dummy weights writes it: the same few states in turn
LOOPING = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
LOOPING_TEXT = '{"name": "Ada", "a": true, "b": true, "c": true, "d": true, "e": true'


def _vet_all(state: GrammarState, info, text: str, budget: int = 16) -> None:
    """Take ``text``'s tokens as the engine takes sampled ones near the end of the budget, each with
    ``budget`` tokens left (within the zone: vetted; an ending fits after each: never replaced), then
    accepted."""
    for token in info.encode(text):
        assert state.ending_instead_of(token, budget) is None
        assert state.accept_token(token) is None


def test_vetting_learns_endings_that_the_grammars_next_request_reuses(compilers, tokenizer_info):
    """Endings found by vetting searches are kept per grammar, by (token, the plan before it): a request
    that meets the same states again (this one, or the grammar's next) checks them instead of searching,
    and ends as it would have with searches."""
    grammar = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(LOOPING)))
    endings = []
    for _ in range(2):
        state = GrammarState(grammar, tokenizer_info, frozenset(tokenizer_info.stop_ids), budget_limits=ROOMY)
        state.steering.prepare(grammar, 16)  # the start state's ending: the plan the first token is vetted against
        _vet_all(state, tokenizer_info, LOOPING_TEXT)
        endings.append(state.steering._plan)
        if len(endings) == 1:
            first = state.steering
            assert first.searches >= 2 and first.learned_reused >= 1  # `"c": true` meets `"b": true`'s states
        else:
            assert state.steering.searches == 0 and state.steering.learned_reused > first.learned_reused
    assert endings[0] == endings[1]
    jsonschema.validate(json.loads(LOOPING_TEXT + tokenizer_info.bytes_of(endings[1]).decode()), LOOPING)
    # a steering made without its grammar (as in the tests above) learns for itself only
    assert BudgetSteering(tokenizer_info, None).learned is not budget_mod.learned_endings(grammar)
    assert state.steering.learned is budget_mod.learned_endings(grammar)


def test_a_learned_ending_is_followed_only_where_it_ends_the_grammar(compilers, tokenizer_info, monkeypatch):
    """A learned ending stands for a state only by its key: one that does not end the grammar from the
    state at hand is never followed (a search runs), so the output still ends valid."""
    grammar = compilers["llguidance"].compile(ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(
        {**LOOPING, "title": "other"})))  # a grammar of its own: nothing learned yet
    bogus = tokenizer_info.encode('"]]')
    monkeypatch.setattr(budget_mod.LearnedEndings, "get", lambda self, key: bogus)
    state = GrammarState(grammar, tokenizer_info, frozenset(tokenizer_info.stop_ids), budget_limits=ROOMY)
    state.steering.prepare(grammar, 16)
    _vet_all(state, tokenizer_info, LOOPING_TEXT)
    assert state.steering.learned_reused == 0 and state.steering.searches >= 3
    ending = state.forced_tokens(None, len(state.steering._plan) + 1)  # slack 0 with the stop token: close
    assert state.closing and ending
    text = LOOPING_TEXT + tokenizer_info.bytes_of([t for t in ending if t not in tokenizer_info.stop_ids]).decode()
    jsonschema.validate(json.loads(text), LOOPING)


def test_learned_endings_are_bounded_oldest_first():
    learned = budget_mod.LearnedEndings(capacity=2)
    learned.put((1, ()), [10])
    learned.put((2, ()), [20])
    learned.put((1, ()), [11])  # written again: the newest
    learned.put((3, (5,)), [30])
    assert len(learned) == 2 and learned.get((2, ())) is None
    assert learned.get((1, ())) == [11] and learned.get((3, (5,))) == [30]
