"""outlines-core backend: regex and choices compiled to a token-level DFA (``Index``); JSON schema
through outlines' schema -> regex translation, for the keywords it translates exactly.

Index construction walks the whole vocabulary through the DFA (slower to compile than llguidance),
after which a mask is a table lookup. outlines' JSON translation silently drops some keywords
(numeric bounds, ``oneOf`` exclusivity, ...): those schemas are refused here, naming the keyword, so
the compiler falls back to llguidance and nothing is ever silently loosened.
"""

from __future__ import annotations

import json
import pickle
import threading
from typing import Any

import numpy as np
import torch

from plait.runtime.constrained.backends.base import (
    BackendUnavailable,
    CompiledGrammar,
    GrammarBackend,
    TokenMatcher,
    UnsupportedConstraint,
)
from plait.runtime.constrained.spec import ConstraintKind, ConstraintSpec
from plait.runtime.constrained.vocab import TokenizerInfo

# outlines puts this pattern around every separator; "[ ]?" accepts json.dumps' ", " / ": " and keeps
# whitespace bounded (at most one space per position).
JSON_WHITESPACE = r"[ ]?"
MAX_FORCED_BYTES = 256
_MAX_ALLOWED_FOR_FORCED = 4096  # a state allowing more tokens than this is not a forced one in practice

# Keywords outlines translates without loosening the schema (annotations included); anything else is refused.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "items", "minItems", "maxItems", "minLength", "maxLength", "enum",
    "const", "anyOf", "$ref", "$defs", "definitions", "format", "pattern", "additionalProperties",
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")


def _import() -> Any:
    try:
        import outlines_core
    except ImportError:
        raise BackendUnavailable("the outlines-core package is not installed (pip install 'outlines-core>=0.2')") from None
    return outlines_core


def _eos_id(info: TokenizerInfo) -> int:
    """The end-of-sequence id outlines' Vocabulary is built with (its masks and states use it)."""
    return min(info.stop_ids) if info.stop_ids else info.vocab_size


def check_schema_keywords(schema: Any, path: str = "#") -> None:
    """Raise ``UnsupportedConstraint`` naming the first keyword outlines would not translate exactly."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        return
    string_rules = [k for k in ("pattern", "format", "minLength") if k in schema]
    if "maxLength" in schema and "minLength" not in schema:
        string_rules.append("maxLength")
    if len(string_rules) > 1:  # outlines keeps only one of them
        raise UnsupportedConstraint(
            f"outlines-core cannot combine the JSON schema keywords {' and '.join(map(repr, string_rules))} (at {path})")
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key not in SUPPORTED_KEYWORDS:
            raise UnsupportedConstraint(f"outlines-core does not support the JSON schema keyword {key!r} (at {where})")
        if key == "additionalProperties" and value not in (False,):
            raise UnsupportedConstraint(f"outlines-core supports 'additionalProperties' only as false (at {where})")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema_keywords(sub, f"{where}/{name}")
        elif key == "items":
            check_schema_keywords(value, where)
        elif key == "anyOf" and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema_keywords(sub, f"{where}/{i}")


class OutlinesMatcher(TokenMatcher):
    def __init__(self, grammar: OutlinesGrammar):
        self._g = grammar
        self._state = grammar.index.get_initial_state()
        self._history: list[int] = []

    def consume(self, token: int) -> bool:
        nxt = self._g.index.get_next_state(self._state, token)
        if nxt is None:
            return False
        self._history.append(self._state)
        self._state = nxt
        return True

    def fill_bitmask(self, row: torch.Tensor) -> None:
        row.copy_(self._g.mask_of(self._state))

    def can_terminate(self) -> bool:
        return self._g.index.is_final_state(self._state)

    def is_terminated(self) -> bool:
        return self._g.is_terminal(self._state)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > len(self._history):
            raise RuntimeError(f"cannot roll back {num_tokens} tokens; only {len(self._history)} consumed")
        for _ in range(num_tokens):
            self._state = self._history.pop()

    def forced_bytes(self) -> bytes:
        return self._g.forced_bytes_of(self._state)


class OutlinesGrammar(CompiledGrammar):
    """An outlines Index plus per-state memos (masks, forced bytes, terminal), filled lazily on the
    engine thread. Immutable as far as requests can tell."""

    backend_name = "outlines"

    def __init__(self, spec: ConstraintSpec, index: Any, info: TokenizerInfo, eos_id: int):
        self.spec = spec
        self.index = index
        self._info = info
        self._eos = eos_id
        self._masks: dict[int, torch.Tensor] = {}
        self._forced: dict[int, bytes] = {}
        self._terminal: dict[int, bool] = {}

    def new_matcher(self) -> TokenMatcher:
        return OutlinesMatcher(self)

    def allowed(self, state: int) -> list[int]:
        return [t for t in self.index.get_allowed_tokens(state) if t != self._eos]

    def mask_of(self, state: int) -> torch.Tensor:
        mask = self._masks.get(state)
        if mask is None:
            bits = np.zeros(self._info.bitmask_words * 32, dtype=np.uint8)
            bits[np.asarray(self.allowed(state), dtype=np.int64)] = 1
            # little bit order + little-endian int32 view: bit j of word w = token 32 * w + j
            mask = torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").copy())
            self._masks[state] = mask
        return mask

    def is_terminal(self, state: int) -> bool:
        done = self._terminal.get(state)
        if done is None:
            done = self.index.is_final_state(state) and not self.allowed(state)
            self._terminal[state] = done
        return done

    def forced_bytes_of(self, state: int) -> bytes:
        forced = self._forced.get(state)
        if forced is None:
            forced = self._walk_forced(state)
            self._forced[state] = forced
        return forced

    def _walk_forced(self, state: int) -> bytes:
        """Follow the DFA byte by byte while every allowed token starts with the same byte (then every
        continuation does) and the match cannot end here."""
        out = bytearray()
        info = self._info
        while len(out) < MAX_FORCED_BYTES and not self.index.is_final_state(state):
            allowed = self.index.get_allowed_tokens(state)
            if len(allowed) > _MAX_ALLOWED_FOR_FORCED:
                break
            first = {info.token_bytes[t][0] for t in allowed if t != self._eos and info.token_bytes[t]}
            if len(first) != 1:
                break
            byte = first.pop()
            token = info.single_byte_token(byte)
            nxt = None if token is None else self.index.get_next_state(state, token)
            if nxt is None:
                break
            out.append(byte)
            state = nxt
        return bytes(out)


class OutlinesBackend(GrammarBackend):
    name = "outlines"

    def __init__(self) -> None:
        self._oc = _import()
        self._lock = threading.Lock()
        self._vocabs: dict[int, tuple[Any, int]] = {}

    def vocabulary_for(self, info: TokenizerInfo) -> tuple[Any, int]:
        """outlines' Vocabulary of ``info`` and the eos id it uses (built once per tokenizer)."""
        with self._lock:
            cached = self._vocabs.get(id(info))
            if cached is None:
                eos = _eos_id(info)
                by_bytes: dict[bytes, list[int]] = {}
                for i, b in enumerate(info.token_bytes):
                    if b:
                        by_bytes.setdefault(b, []).append(i)
                cached = (self._oc.Vocabulary(eos, by_bytes), eos)
                self._vocabs[id(info)] = cached
            return cached

    def regex_for(self, spec: ConstraintSpec) -> str:
        if spec.kind is ConstraintKind.JSON_SCHEMA:
            schema = spec.schema
            check_schema_keywords(schema)
            try:
                return self._oc.json_schema.build_regex_from_schema(json.dumps(schema), JSON_WHITESPACE)
            except Exception as exc:  # noqa: BLE001 -- outlines raises ValueError or its own errors here
                raise UnsupportedConstraint(f"outlines-core: {exc}") from None
        if spec.kind in (ConstraintKind.REGEX, ConstraintKind.CHOICES):
            return spec.as_regex()
        raise UnsupportedConstraint("outlines-core does not support grammars (ebnf); use llguidance")

    def prepare(self, spec: ConstraintSpec, info: TokenizerInfo) -> bytes:
        """The token DFA (``Index``) of ``spec``, pickled (the slow part: a walk of the whole vocabulary)."""
        return pickle.dumps(self._index(spec, info))

    def load(self, spec: ConstraintSpec, payload: bytes, info: TokenizerInfo) -> CompiledGrammar:
        grammar = OutlinesGrammar(spec, pickle.loads(payload), info, _eos_id(info))  # no Vocabulary needed
        grammar.nbytes = 2 * len(payload)  # measured: resident size ~2.2x the pickled index
        return grammar

    def compile(self, spec: ConstraintSpec, info: TokenizerInfo) -> CompiledGrammar:
        index = self._index(spec, info)
        grammar = OutlinesGrammar(spec, index, info, self.vocabulary_for(info)[1])
        grammar.nbytes = 2 * len(pickle.dumps(index))
        return grammar

    def _index(self, spec: ConstraintSpec, info: TokenizerInfo) -> Any:
        regex = self.regex_for(spec)
        vocab, _ = self.vocabulary_for(info)
        try:
            return self._oc.Index(regex, vocab)
        except Exception as exc:  # noqa: BLE001 -- ValueError for bad regexes, others for unsupported syntax
            raise UnsupportedConstraint(f"outlines-core: {exc}") from None
