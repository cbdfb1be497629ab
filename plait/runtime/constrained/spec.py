"""What a request asks its output to match: one ``ConstraintSpec`` per constrained request.

A spec is immutable and hashable, so it is the key of the compiled-grammar cache (with the
tokenizer, which is fixed per engine). It is built from ``SamplingParams`` (``regex``, ``json_schema``,
``ebnf`` or ``choices``) and checked here for what can be checked without a backend: the bounds of
``limits.py`` (size, nesting, rule count; first, so that nothing below can recurse too deep), JSON
that does not parse, a cyclic ``$ref``, an empty grammar, a regex Python cannot even parse.
"""

from __future__ import annotations

import enum
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from plait.runtime.constrained.limits import (
    GrammarLimits,
    check_grammar_rules,
    check_nesting,
    check_ref_cycles,
    check_size,
)
from plait.sampling import SamplingParams

__all__ = ["ConstraintError", "ConstraintKind", "ConstraintSpec", "spec_from_params"]


class ConstraintError(ValueError):
    """A constraint that cannot be served: bad syntax, an unsupported feature, a failed or timed-out
    compilation. A ``ValueError`` so that servers answer it with a 400."""


class ConstraintKind(str, enum.Enum):
    REGEX = "regex"
    JSON_SCHEMA = "json_schema"  # includes "any JSON" ({} / true) and OpenAI's json_object ({"type": "object"})
    GRAMMAR = "ebnf"  # a Lark grammar, or GBNF/EBNF (``root ::= ...``), converted to Lark
    CHOICES = "choices"  # the output is exactly one of a list of strings


@dataclass(frozen=True)
class ConstraintSpec:
    """One constraint: its kind and its source text (a regex, a JSON schema as compact JSON text,
    a Lark grammar, or the JSON list of choices)."""

    kind: ConstraintKind
    source: str

    def __post_init__(self) -> None:
        # The hash, once: specs key ordered dicts (the compiler's cache), and iterating an OrderedDict
        # hashes every key it passes; the generated hash (a tuple, and the Enum's hash in Python)
        # cost ~0.4 us a time, ~0.1 ms per compile once the compiler's cache was full.
        object.__setattr__(self, "_hash", hash((self.kind, self.source)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple:
        # pickled (to compile workers) without the hash: str hashes differ from process to process
        return ConstraintSpec, (self.kind, self.source)

    @property
    def schema(self) -> Any:
        """The parsed JSON schema (only for ``JSON_SCHEMA``)."""
        return json.loads(self.source)

    @property
    def choices(self) -> list[str]:
        """The list of allowed strings (only for ``CHOICES``)."""
        return json.loads(self.source)

    def as_regex(self) -> str:
        """A regex equivalent to a REGEX or CHOICES spec (choices become an escaped alternation)."""
        if self.kind is ConstraintKind.REGEX:
            return self.source
        if self.kind is ConstraintKind.CHOICES:
            return "(" + "|".join(re.escape(c) for c in self.choices) + ")"
        raise ConstraintError(f"a {self.kind.value} constraint has no regex form")

    def describe(self, limit: int = 80) -> str:
        text = self.source if len(self.source) <= limit else self.source[: limit - 3] + "..."
        return f"{self.kind.value} {text!r}"


def _normalize_schema(text: str) -> str:
    try:
        schema = json.loads(text)
    except RecursionError:  # only past grammar_max_depth, which is checked first
        raise ConstraintError("sampling parameter 'json_schema' nests too deep") from None
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"sampling parameter 'json_schema' is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(
            f"sampling parameter 'json_schema' must be a JSON object (or true), got {type(schema).__name__}"
        )
    if schema is False:
        raise ConstraintError("sampling parameter 'json_schema' is false: no document can match it")
    if "$ref" in text or "\\u" in text:
        # A cycle goes through a "$ref" (parsed JSON is a tree: allOf / anyOf members alone never lead
        # back), and that key is in the text as is unless written with \u escapes. Most schemas have
        # neither: the walk over every node is skipped.
        check_ref_cycles(schema)
    # One compact text per schema, so equal schemas share one compiled grammar. Keys keep their order:
    # the order of "properties" is the order the fields are generated in.
    return _COMPACT.encode(schema)


# ``json.dumps(schema, separators=(",", ":"))``, the same text, without the circular-reference check
# (parsed JSON is a tree) and without building an encoder per call: ~25% of the dump's time.
_COMPACT = json.JSONEncoder(separators=(",", ":"), check_circular=False)


class _SpecCache:
    """Specs already checked and normalized, per (kind, source text as given, limits): a request that
    repeats a constraint (the usual case: one schema for every request of an application) skips the
    checks and the JSON round trip (0.05 ms for a typical schema, a few ms for a 100 KB one). Bounded
    by the texts' total length and by count, least recently used dropped first; refusals are not kept."""

    def __init__(self, max_chars: int = 16 * 2**20, max_entries: int = 1024):
        self.max_chars, self.max_entries = max_chars, max_entries
        self._lock = threading.Lock()
        self._specs: OrderedDict[tuple[str, str, GrammarLimits], ConstraintSpec] = OrderedDict()
        self._chars = 0

    def get(self, key: tuple[str, str, GrammarLimits]) -> ConstraintSpec | None:
        with self._lock:
            spec = self._specs.get(key)
            if spec is not None:
                self._specs.move_to_end(key)
            return spec

    def clear(self) -> None:
        with self._lock:
            self._specs.clear()
            self._chars = 0

    def __len__(self) -> int:
        return len(self._specs)

    def put(self, key: tuple[str, str, GrammarLimits], spec: ConstraintSpec) -> None:
        size = len(key[1]) + len(spec.source)
        if size > self.max_chars:
            return
        with self._lock:
            if key in self._specs:
                return
            self._specs[key] = spec
            self._chars += size
            while self._chars > self.max_chars or len(self._specs) > self.max_entries:
                (_, old_source, _), old = self._specs.popitem(last=False)
                self._chars -= len(old_source) + len(old.source)


_SPECS = _SpecCache()
_DEFAULT_LIMITS = GrammarLimits()  # frozen: one instance serves every call without limits


def spec_from_params(params: SamplingParams, limits: GrammarLimits | None = None) -> ConstraintSpec | None:
    """The constraint of ``params``, validated and normalized; None when unconstrained.

    Raises ``ConstraintError`` for a constraint that is malformed or past ``limits`` (default
    ``GrammarLimits()``) before any backend sees it. A constraint seen before (the same text and limits)
    is served from a cache of checked specs.
    """
    constraint = params.constraint
    if constraint is None:
        return None
    name, value = constraint
    key = (name, value, limits or _DEFAULT_LIMITS)
    spec = _SPECS.get(key)
    if spec is not None:
        return spec
    try:
        spec = _checked_spec(name, value, key[2])
    except ValueError as exc:  # the limits' own error type, and ConstraintError itself
        if isinstance(exc, ConstraintError):
            raise
        raise ConstraintError(f"sampling parameter {name!r}: {exc}") from None
    _SPECS.put(key, spec)
    return spec


def _checked_spec(name: str, value: str, limits: GrammarLimits) -> ConstraintSpec:
    check_size(value, name, limits)
    if name == "regex":
        check_nesting(value, "regex", limits)
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            # Python's syntax is close to the backends' (both follow Rust's regex crate closely); a regex
            # Python rejects would be rejected there too, with a less helpful message.
            raise ConstraintError(f"sampling parameter 'regex' is not a valid regex: {exc}") from None
        return ConstraintSpec(ConstraintKind.REGEX, value)
    if name == "json_schema":
        check_nesting(value, "json_schema", limits)
        return ConstraintSpec(ConstraintKind.JSON_SCHEMA, _normalize_schema(value))
    if name == "ebnf":
        if not value.strip():
            raise ConstraintError("sampling parameter 'ebnf' is an empty grammar")
        check_grammar_rules(value, limits)
        check_nesting(value, "ebnf", limits)
        return ConstraintSpec(ConstraintKind.GRAMMAR, value)
    if name == "choices":
        return ConstraintSpec(ConstraintKind.CHOICES, value)
    raise ConstraintError(f"unknown constraint kind {name!r}")
