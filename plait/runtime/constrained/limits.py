"""Bounds checked on a constraint's source text before any backend compiles it.

Grammar libraries recurse over a grammar's structure: a 3000-rule chained Lark grammar overflows
llguidance's stack (the process dies with SIGSEGV), a schema nested a few hundred levels deep exceeds
its recursion limit, and Python's own ``json`` / ``re`` parsers raise ``RecursionError`` on deep enough
input. So every constraint is measured first, with iterative scans that cannot recurse: its size in
bytes, its nesting depth (JSON containers, or brackets in a regex / grammar) and, for grammars, its rule
count. Past a bound the request gets a ``ConstraintError`` naming the bound and its setting.

JSON schemas are also checked for ``$ref`` cycles that consume no output (``{"$ref": "#"}``): such a
schema matches no document, and would otherwise be accepted and abort after the first token.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["GrammarLimits", "check_grammar_rules", "check_nesting", "check_ref_cycles", "check_size"]


class _LimitError(ValueError):
    """Raised by the checks; ``spec.py`` turns it into a ``ConstraintError``."""


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds on one constraint (``EngineConfig``: ``grammar_max_bytes``, ``grammar_max_depth``,
    ``grammar_max_rules``)."""

    max_bytes: int = 256 * 1024  # source text of a regex, schema (compact JSON), grammar or choice list
    max_depth: int = 64  # JSON container nesting of a schema; bracket nesting of a regex or grammar
    max_rules: int = 1000  # rule and terminal definitions of an EBNF / Lark grammar

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_rules"):
            if getattr(self, name) < 1:
                raise ValueError(f"grammar limit {name} must be >= 1, got {getattr(self, name)}")


def check_size(text: str, what: str, limits: GrammarLimits) -> None:
    # an ASCII text (``isascii`` is a flag of the str, no scan) is as many bytes as characters: no copy
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise _LimitError(f"the {what} is {size} bytes; the limit is {limits.max_bytes} (grammar_max_bytes)")


_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {")", "]", "}"}


# JSON string literals (the unrolled form: no per-character alternation) and the brackets left outside them
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _check_json_nesting(text: str, limits: GrammarLimits) -> None:
    """``check_nesting`` for JSON in C-speed steps: drop the string literals, keep the brackets, take the
    running depth's maximum (a character loop in Python cost ~0.35 ms for a 3.6 KB schema, a fifth of
    the backend's own compile). Depth is exact over any valid prefix of the text, which is all that
    ``json.loads`` recurses into (it stops at the first error; an unterminated string keeps its brackets,
    so they count). A text with at most ``max_depth`` opening brackets in all (strings included) cannot
    nest deeper: two counts, no scan (most schemas)."""
    if text.count("{") + text.count("[") <= limits.max_depth:
        return
    brackets = _BRACKETS.findall(_JSON_STRING.sub("", text))
    deepest = max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)
    if deepest > limits.max_depth:
        raise _LimitError(f"the json_schema nests deeper than {limits.max_depth} levels (grammar_max_depth)")


def check_nesting(text: str, what: str, limits: GrammarLimits) -> None:
    """Bracket nesting of ``text`` within ``max_depth``, by one iterative scan. ``what`` is ``json_schema``
    (``[`` / ``{`` outside strings count), ``regex`` (groups count; character classes and escapes are
    skipped) or ``ebnf`` (all brackets outside quoted literals count)."""
    if what == "json_schema":
        _check_json_nesting(text, limits)
        return
    opening = "([{"
    quotes = "" if what == "regex" else "\"'"
    depth = deepest = 0
    quote: str | None = None
    escaped = in_class = False  # in a regex character class, brackets are literal
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quote is not None:
            quote = None if ch == quote else quote
        elif ch in quotes:
            quote = ch
        elif in_class:
            in_class = ch != "]"
        elif what == "regex" and ch == "[":
            in_class = True
        elif ch in opening:
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limits.max_depth:
                raise _LimitError(f"the {what} nests deeper than {limits.max_depth} levels (grammar_max_depth)")
        elif ch in _CLOSE and depth:
            depth -= 1


_RULE = re.compile(r"^\s*[?!]?[A-Za-z_][\w.\-]*\s*(::=|:(?!:))", re.MULTILINE)


def check_grammar_rules(text: str, limits: GrammarLimits) -> None:
    """Rule (and terminal) definitions of an EBNF / Lark grammar within ``max_rules``. Each rule can
    reference the next, so this also bounds how deep a chain of rules goes."""
    count = sum(1 for _ in _RULE.finditer(text))
    if count > limits.max_rules:
        raise _LimitError(f"the ebnf grammar defines {count} rules; the limit is {limits.max_rules} (grammar_max_rules)")


_ALIAS_LISTS = ("allOf", "anyOf", "oneOf")


def _resolve(root: Any, ref: str) -> Any:
    """The schema a local ``$ref`` (``#`` or ``#/a/b``) points at; None when it is not local or missing."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _alias_targets(root: Any, node: dict, resolved: dict[str, Any]) -> list[tuple[str, Any]]:
    """Schemas that ``node`` must match at the same position of the output (no output in between):
    its ``$ref`` target, every ``allOf`` member, and the members of a one-alternative ``anyOf`` / ``oneOf``.
    ``resolved`` caches ``_resolve`` per reference (a schema refers to a few definitions many times)."""
    out: list[tuple[str, Any]] = []
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = resolved[ref] if ref in resolved else resolved.setdefault(ref, _resolve(root, ref))
        out.append((f"$ref {ref!r}", target))
    for key in _ALIAS_LISTS:
        members = node.get(key)
        if isinstance(members, list) and (key == "allOf" or len(members) == 1):
            out.extend((key, m) for m in members)
    return [(label, t) for label, t in out if isinstance(t, dict)]


def _alias_nodes(schema: dict) -> list[dict]:
    """Every dict in the document that has an alias key (``$ref``, ``allOf``, ``anyOf``, ``oneOf``), in
    the order of a depth-first walk (last child first); the others cannot be on a cycle. One pass, with
    the key tests inline (no generator per node: half the check's time was there)."""
    nodes: list[dict] = []
    stack: list[Any] = [schema]
    pop, extend = stack.pop, stack.extend
    while stack:  # every dict in the document is a candidate schema node
        value = pop()
        if isinstance(value, dict):
            if "$ref" in value or "allOf" in value or "anyOf" in value or "oneOf" in value:
                nodes.append(value)
            extend(value.values())
        elif isinstance(value, list):
            extend(value)
    return nodes


def check_ref_cycles(schema: Any) -> None:
    """Raise when a schema reaches itself through ``$ref`` / ``allOf`` (or a single ``anyOf`` /
    ``oneOf`` member) alone: it would have to match itself before producing anything, so no
    document matches it. Recursion through ``properties`` or ``items`` (a tree) is fine."""
    if not isinstance(schema, dict):
        return
    resolved: dict[str, Any] = {}
    state: dict[int, int] = {}  # id(node) -> 1 on the current path, 2 done
    for start in _alias_nodes(schema):
        if state.get(id(start)):
            continue
        path: list[tuple[dict, list[tuple[str, Any]]]] = [(start, _alias_targets(schema, start, resolved))]
        state[id(start)] = 1
        while path:
            node, targets = path[-1]
            if not targets:
                state[id(node)] = 2
                path.pop()
                continue
            label, target = targets.pop()
            mark = state.get(id(target))
            if mark == 1:
                raise _LimitError(
                    f"the json_schema has a cyclic {label}: it refers back to itself before producing any "
                    "output, so no document can match it")
            if mark is None:
                state[id(target)] = 1
                path.append((target, _alias_targets(schema, target, resolved)))
