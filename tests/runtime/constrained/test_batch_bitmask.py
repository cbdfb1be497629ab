"""A batch's bitmask: llguidance rows computed together on its thread pool equal rows filled one by one."""

from __future__ import annotations

import json

import pytest
import torch

from plait.runtime.constrained import ConstraintKind, ConstraintSpec, GrammarState
from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceMatcher
from plait.runtime.constrained.bitmask import PARALLEL_MIN_ROWS, build_batch_bitmask

pytestmark = pytest.mark.model

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name"]}
# (backend, kind, source, prefix, stop tokens: the tokenizer's, or none as with ignore_eos)
ROWS = [
    ("llguidance", ConstraintKind.JSON_SCHEMA, json.dumps(PERSON), '{"name": "Ada', "eos"),
    ("llguidance", ConstraintKind.JSON_SCHEMA, json.dumps(PERSON), '{"name": "Ada", "tags": ["x"', "eos"),
    ("llguidance", ConstraintKind.JSON_SCHEMA, json.dumps(PERSON), "", "eos"),  # its start mask is pending
    ("llguidance", ConstraintKind.REGEX, r"[0-9]+(\.[0-9]+)?", "3.1", "none"),  # accepting, stop bits edited
    ("llguidance", ConstraintKind.REGEX, r"[a-z]+@[a-z]+\.com", "ab", "none"),
    ("outlines", ConstraintKind.REGEX, r"[a-z]+@[a-z]+\.com", "ab@", "eos"),  # no batch path: one by one
    ("llguidance", ConstraintKind.CHOICES, json.dumps(["red", "green", "blue"]), "gr", "eos"),
]


def _states(compilers, info) -> list[GrammarState | None]:
    states: list[GrammarState | None] = [None]  # an unconstrained row
    for backend, kind, source, prefix, stops in ROWS:
        grammar = compilers[backend].compile(ConstraintSpec(kind, source))
        state = GrammarState(grammar, info, frozenset(info.stop_ids) if stops == "eos" else frozenset())
        for token in info.encode(prefix) if prefix else []:
            assert state.accept_token(token) is None, prefix
        states.append(state)
    return states


def test_rows_computed_together_equal_rows_filled_one_by_one(compilers, tokenizer_info, monkeypatch):
    words = tokenizer_info.bitmask_words
    calls = []
    original = LLGuidanceMatcher.fill_many
    monkeypatch.setattr(LLGuidanceMatcher, "fill_many",
                        staticmethod(lambda matchers, *args: calls.append(len(matchers)) or original(matchers, *args)))
    together, rows = build_batch_bitmask(_states(compilers, tokenizer_info), words)
    assert calls == [5] and 5 >= PARALLEL_MIN_ROWS  # the llguidance rows past their start
    alone = _states(compilers, tokenizer_info)
    assert rows == [i for i, state in enumerate(alone) if state is not None]
    for i, state in enumerate(alone):
        row = torch.full((words,), -1, dtype=torch.int32)
        if state is not None:
            state.fill_bitmask(row)
        assert torch.equal(together[i], row), ROWS[i - 1] if i else "unconstrained"
    assert not torch.equal(together[1], together[2])  # different states, different masks


def test_few_rows_are_filled_one_by_one(compilers, tokenizer_info, monkeypatch):
    calls = []
    monkeypatch.setattr(LLGuidanceMatcher, "fill_many", staticmethod(lambda *args: calls.append(args)))
    states = _states(compilers, tokenizer_info)[:PARALLEL_MIN_ROWS]  # None, then fewer llguidance rows past their start
    build_batch_bitmask(states, tokenizer_info.bitmask_words)
    assert calls == []
