"""Ending within the token budget: the shortest completion of a grammar state, and when to force it.

When ``max_new_tokens`` is about to run out inside a constrained value (a string, a number, an object
with required keys left), the output would be cut mid-value. ``shortest_completion`` finds a short
sequence of tokens that takes the matcher from its current state to a state where the grammar may end;
``BudgetSteering`` (used by ``GrammarState``) decides when the remaining budget calls for it, and the
engine then appends those tokens without sampling, as it does for jump-forward.

The search works on any ``TokenMatcher`` (llguidance and outlines-core; JSON schema, regex, Lark) with
nothing but its mask, ``consume``, ``rollback`` and forced bytes: a depth-first, branch-and-bound
search over a small ranked set of candidate tokens (the first canonical token of the bytes the grammar
forces, else closing characters, empty values, digits, single characters), bounded in depth and
matcher states visited (deterministic), with a time bound as a safety net. It is a heuristic: the
ending it finds is short, not provably shortest. ``start_ending`` caches the ending of a grammar's start
state (searched once per grammar), which ``BudgetSteering.prepare`` plans before a request's first
token. When no ending that fits is known, the request goes on as without steering.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import astuple, dataclass

import numpy as np
import torch

from plait.runtime.constrained.backends.base import CompiledGrammar, TokenMatcher
from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = ["FIRST_CHECK_BUDGET", "MAX_ESCALATION", "START_LIMITS", "BudgetSteering", "ClosingCandidates",
           "LearnedEndings", "SearchLimits", "candidates_for", "learned_endings", "shortest_completion", "start_ending"]

_CLOSERS = frozenset(b"\"'}])>")
_EMPTY_VALUES = (b'""', b"[]", b"{}", b"null", b"true", b"false", b"0")
_SEPARATORS = frozenset(b",:; ")
_FORCED_CACHE_SIZE = 4096
_ALLOWED_CACHE_SIZE = 4096
_GROUPS = 6  # rank groups of ClosingCandidates


class ClosingCandidates:
    """The tokens the search tries, best first (computed once per tokenizer).

    Rank groups, tokens of at most 4 printable ASCII bytes: 0 a single closing character (``"``, ``}``,
    ``]``, ``)``, ...); 1 an empty value, possibly after a space (``""``, `` []``, ``{}``, ``null``,
    ``0``, ...); 2 closers and separators together (``"}``, ``"]}``, ``",``, ``", "``; a string's quote
    first, more closers first); 3 a digit; 4 a letter; 5 any other single character (``@``, ``.``,
    ``-``, a space). A space appears only first or after ``,`` / ``:`` (never two)."""

    def __init__(self, info: TokenizerInfo):
        ranked: list[tuple[tuple, int]] = []
        for tid, data in enumerate(info.token_bytes):
            if not data or tid in info.special_ids:
                continue
            rank = self._rank(data)
            if rank is not None:
                ranked.append((rank, tid))
        ranked.sort()
        self.ids = np.array([tid for _, tid in ranked], dtype=np.int64)
        groups = np.array([rank[0] for rank, _ in ranked], dtype=np.int64)
        # candidates are sorted by group: group g is ids[bounds[g]:bounds[g + 1]]
        self.bounds = np.searchsorted(groups, np.arange(_GROUPS + 1)).tolist()
        # forced bytes -> their first canonical token (encoding is the costly part of a search step)
        self.forced_first: dict[bytes, int | None] = {}
        self.words = self.ids >> 5  # the bitmask word of each candidate
        self.bits = (self.ids & 31).astype(np.int32)
        # a candidate with a leading space -> the position of its twin without it (-1: none); where the
        # twin is allowed too the spaced one is left out (optional whitespace only costs tokens)
        position = {info.token_bytes[tid]: i for i, tid in enumerate(self.ids.tolist())}
        self.unspaced = np.array([position.get(info.token_bytes[tid][1:], -1)
                                  if info.token_bytes[tid][:1] == b" " else -1 for tid in self.ids.tolist()],
                                 dtype=np.int64)
        self._spaced = np.flatnonzero(self.unspaced >= 0)
        self._twins = self.unspaced[self._spaced]
        self._allowed: dict[tuple[bytes, tuple[int, ...]], tuple[int, ...]] = {}  # ``allowed``'s answers
        # token id -> whether it is a candidate with a closing or separating character (`"`, `}`, `]`,
        # `:`, `,`, `""`, `[]`, ...: JSON's structure; not `null` or a letter)
        self.structural = np.zeros(info.vocab_size, dtype=bool)
        punctuation = _CLOSERS | (_SEPARATORS - {32})
        punctuated = [tid for tid in self.ids.tolist() if any(b in punctuation for b in info.token_bytes[tid])]
        self.structural[punctuated] = True

    @staticmethod
    def _rank(data: bytes) -> tuple | None:
        if len(data) > 4 or not all(32 <= b < 127 for b in data):
            return None
        if any(b == 32 and data[i - 1] not in b",:" for i, b in enumerate(data) if i):
            return None  # a space leads a token or follows a separator (` "`, `", "`), never more
        if len(data) == 1 and data[0] in _CLOSERS:
            return (0, data)
        if data.lstrip(b" ") in _EMPTY_VALUES and data.count(b" ") <= 1:
            return (1, _EMPTY_VALUES.index(data.lstrip(b" ")), data)
        if data != b" " and all(b in _CLOSERS or b in _SEPARATORS for b in data):
            # `"}`, `"]}`, `",` ...: a string's quote first (JSON), a leading space last, more closers first
            return (2, data[:1] == b" ", data[:1] != b'"', -sum(b in _CLOSERS for b in data), len(data), data)
        if len(data) == 1:
            char = chr(data[0])
            group = 3 if char.isdigit() else 4 if char.isalpha() else 5
            return (group, data)
        return None

    def allowed(self, row: torch.Tensor | np.ndarray, per_group: tuple[int, ...]) -> list[int]:
        """The candidates ``row`` (a filled bitmask, int32 words) allows, best first, at most
        ``per_group[g]`` of rank group ``g`` (one digit or letter stands for the others where any is allowed)."""
        words = row if isinstance(row, np.ndarray) else row.numpy()
        ok = (words[self.words] >> self.bits) & 1
        # the answer depends on these bits only, and a search meets few patterns of them (23 in the
        # 1,500 calls of benchmarks/budget_search.py's pass): computed once per pattern
        key = (ok.tobytes(), per_group)
        cached = self._allowed.get(key)
        if cached is not None:
            return list(cached)
        ok[self._spaced[ok[self._twins] == 1]] = 0
        positions = np.flatnonzero(ok)  # candidates are sorted by group: each group's are one slice
        cuts = np.searchsorted(positions, self.bounds).tolist()
        out: list[int] = []
        for group, count in enumerate(per_group):
            if count and group < len(cuts) - 1:
                out.extend(self.ids[positions[cuts[group]:min(cuts[group + 1], cuts[group] + count)]].tolist())
        if len(self._allowed) >= _ALLOWED_CACHE_SIZE:
            self._allowed.clear()
        self._allowed[key] = tuple(out)
        return out


def candidates_for(info: TokenizerInfo) -> ClosingCandidates:
    """The tokenizer's ``ClosingCandidates`` (built on first use, then kept on ``info``)."""
    cands = getattr(info, "_closing_candidates", None)
    if cands is None:
        cands = ClosingCandidates(info)
        info._closing_candidates = cands
    return cands


@dataclass
class SearchLimits:
    """Bounds of one search: tokens deep, matcher states visited, seconds, and branches per state."""

    max_tokens: int = 128
    max_nodes: int = 200
    max_seconds: float = 0.05  # a safety net: matcher states bound a search first, the same on any machine
    branching: int = 2
    # candidates tried per rank group of ClosingCandidates: closers, empty values, closer/separator
    # combinations, digits, letters, other single characters
    per_group: tuple[int, ...] = (3, 2, 2, 1, 1, 3)


def _forced_token(info: TokenizerInfo, matcher: TokenMatcher, cands: ClosingCandidates) -> int | None:
    """The first canonical token of the bytes the grammar forces next, if any."""
    forced = matcher.forced_bytes()
    if not forced:
        return None
    cached = cands.forced_first.get(forced, -1)
    if cached != -1:
        return cached
    try:
        text = forced.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = forced[: exc.start].decode("utf-8")
    ids = info.encode(text) if text else []
    first = ids[0] if ids else None
    if len(cands.forced_first) >= _FORCED_CACHE_SIZE:
        cands.forced_first.clear()
    cands.forced_first[forced] = first
    return first


def _weight(data: bytes | None) -> int:
    return len(data or b"") - (data or b"").count(b" ")


def _allows(matcher: TokenMatcher, row: torch.Tensor, token: int) -> bool:
    """Whether the matcher's mask allows ``token`` (checked before consuming: llguidance's matcher
    enters a permanent error state when it is given a token it does not allow)."""
    matcher.fill_bitmask(row)
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)


def _retokenized(matcher: TokenMatcher, info: TokenizerInfo, path: list[int], row: torch.Tensor) -> list[int]:
    """``path``'s text in the tokenizer's own tokenization when the grammar accepts it and it is
    shorter (the search builds an ending a token at a time: `"` then `:` where the tokenizer writes
    `":`); else ``path``."""
    try:
        text = info.bytes_of(path).decode("utf-8")
    except UnicodeDecodeError:
        return path
    tokens = info.encode(text)
    if len(tokens) >= len(path) or info.bytes_of(tokens) != info.bytes_of(path):
        return path
    return tokens if _ends_with(matcher, tokens, row) else path


def _consume_one(matcher: TokenMatcher, row: torch.Tensor, token: int) -> bool:
    """Consume ``token`` if the grammar allows it (never a refused one, see ``_allows``); whether it did."""
    if matcher.try_consume_tokens is not None:
        return matcher.try_consume_tokens([token]) == 1
    return _allows(matcher, row, token) and matcher.consume(token)


def _ends_with(matcher: TokenMatcher, path: list[int], row: torch.Tensor) -> bool:
    """Whether appending ``path`` takes the matcher to a state where the grammar may end (the matcher
    is left as it was)."""
    if matcher.try_consume_tokens is not None:  # no mask per token
        consumed = matcher.try_consume_tokens(path)
        try:
            return consumed == len(path) and matcher.can_terminate()
        finally:
            matcher.rollback(consumed)
    consumed = 0
    try:
        for token in path:
            if matcher.is_terminated() or not _consume_one(matcher, row, token):
                return False
            consumed += 1
        return matcher.can_terminate()
    finally:
        matcher.rollback(consumed)


def shortest_completion(matcher: TokenMatcher, info: TokenizerInfo, limits: SearchLimits | None = None,
                        row: torch.Tensor | None = None) -> list[int] | None:
    """A short token sequence that takes ``matcher`` from its state to one where the grammar may end
    (``[]`` if it may end already), or None when none was found within ``limits``. The matcher is left
    in the state it was in (every token the search consumes is rolled back).

    Where the grammar forces bytes, the only child is their first canonical token. Elsewhere the
    allowed candidates (``ClosingCandidates``, at most ``limits.per_group`` per group) are each tried one token
    deep and ordered by progress: a child where the grammar may end first, then the child that allows
    the fewest tokens (closing a string or a number leaves a handful of structural tokens allowed;
    writing more of it leaves thousands); the best ``limits.branching`` are searched depth-first, with
    branch-and-bound on the best length found."""
    limits = limits or SearchLimits()
    if matcher.can_terminate():
        return []
    cands = candidates_for(info)
    if row is None:
        row = torch.empty(info.bitmask_words, dtype=torch.int32)
    # the matcher fills ``row``; the search reads it through numpy views of the same memory (a mask
    # kept for a child is a numpy copy): a step costs a few microseconds less than through torch
    row_words = row.numpy()
    row_bits = row_words.view(np.uint32)
    deadline = time.perf_counter() + limits.max_seconds
    best: list[int] | None = None
    path: list[int] = []
    nodes = 0

    def children(mask: np.ndarray | None) -> list[tuple[int, np.ndarray | None]]:
        """This state's children, best first, with their masks where computed (``mask``: this state's)."""
        nonlocal nodes
        forced = _forced_token(info, matcher, cands)
        if forced is not None and mask is None and matcher.try_consume_tokens is not None:
            if matcher.try_consume_tokens([forced]) == 1:  # allowed: the state's mask is not needed
                matcher.rollback(1)
                return [(forced, None)]
        if mask is None:
            matcher.fill_bitmask(row)
            mask = row_words
        if forced is not None and (int(mask[forced >> 5]) >> (forced & 31)) & 1:
            return [(forced, None)]
        by_score: dict[int, tuple[int, np.ndarray]] = {}  # allowed-token count after the child -> child
        allowed = cands.allowed(mask, limits.per_group)
        for token in allowed:
            if time.perf_counter() > deadline:
                break
            if not matcher.consume(token):
                continue
            nodes += 1
            ends = matcher.can_terminate()
            if not ends:
                matcher.fill_bitmask(row)
                score = int(np.bitwise_count(row_bits).sum())
            matcher.rollback(1)
            if ends:  # no shorter ending below this state
                return [(token, None)]
            # children after which as many tokens are allowed are likely the same state: keep the one
            # that writes more non-space bytes in its token (the earlier-ranked one of equals)
            kept = by_score.get(score)
            if kept is None or _weight(info.token_bytes[token]) > _weight(info.token_bytes[kept[0]]):
                by_score[score] = (token, row_words.copy())
        # where a structural token is allowed (a closer, a separator, `""`, `[]`...) or right after
        # whitespace, a token of whitespace alone is layout (JSON's optional spaces): it goes last.
        # Elsewhere (a regex's required space between words) it is ranked like any other token.
        layout = ((path and not info.token_bytes[path[-1]].strip())
                  or any(token < len(cands.structural) and cands.structural[token] for token in allowed))
        def rank(score: int) -> tuple[bool, int]:
            return layout and not info.token_bytes[by_score[score][0]].strip(), score

        return [by_score[score] for score in sorted(by_score, key=rank)[: limits.branching]]

    def visit(mask: np.ndarray | None = None) -> bool:
        """Search below the current state (``mask``: its mask, if known); False once a bound is hit."""
        nonlocal best, nodes
        nodes += 1
        if nodes > limits.max_nodes or time.perf_counter() > deadline:
            return False
        if matcher.can_terminate():
            best = list(path)
            return True
        bound = limits.max_tokens if best is None else len(best) - 1
        if len(path) >= bound:  # a completion from here would be no shorter than the best one
            return True
        for token, child_mask in children(mask):
            if not matcher.consume(token):
                continue
            path.append(token)
            try:
                going = visit(child_mask)
            finally:
                path.pop()
                matcher.rollback(1)
            if not going:
                return False
        return True

    visit()
    return best if not best else _retokenized(matcher, info, best, row)


# Below this many tokens left, a request's ending is looked for (a first search); far from the end nothing runs.
FIRST_CHECK_BUDGET = 512

# After a check finds no ending that fits, the next step looks again with twice the matcher states, up to
# this many times the engine's bound; then a quarter of the budget later with the engine's. The time bound
# (a safety net) is not scaled: it bounds what one step may cost the engine thread.
MAX_ESCALATION = 4

# Bounds of the generous search from a grammar's start state, run once per compiled grammar (``start_ending``)
# for the requests whose budget is tight from their first token: bounded by matcher states (deterministic);
# the time bound is a safety net for a machine far slower than usual.
START_LIMITS = SearchLimits(max_tokens=256, max_nodes=20000, max_seconds=2.0)

_start_lock = threading.Lock()
# compiled grammar -> {bounds: the ending found from its start state within them}
_start_endings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def start_ending(grammar: CompiledGrammar, info: TokenizerInfo, limits: SearchLimits) -> list[int] | None:
    """``shortest_completion`` from the start state of ``grammar`` within ``limits``, computed once per
    (grammar, bounds) and kept as long as the grammar is (a start state's ending does not depend on the
    request). Thread-safe: concurrent callers of one (grammar, bounds) wait for its one search; searches of
    other grammars or bounds run at the same time (no lock is held while searching)."""
    key = astuple(limits)
    with _start_lock:
        known = _start_endings.setdefault(grammar, {})
        entry = known.get(key)
        owner = entry is None
        if owner:
            entry = known[key] = Future()
    if owner:
        try:
            entry.set_result(shortest_completion(grammar.new_matcher(), info, limits))
        except BaseException as exc:
            with _start_lock:
                known.pop(key, None)  # not cached: the next caller searches again
            entry.set_exception(exc)
            raise
    path = entry.result()
    return None if path is None else list(path)


def start_ending_known(grammar: CompiledGrammar, limits: SearchLimits) -> bool:
    """Whether ``start_ending(grammar, ..., limits)`` is cached (returns without searching)."""
    with _start_lock:
        entry = _start_endings.get(grammar, {}).get(astuple(limits))
    return entry is not None and entry.done() and entry.exception() is None


class LearnedEndings:
    """Endings that searches found, by (the last token, the ending known before it: the plan a vetting
    had, or the plan a check last dropped): candidates for the next vetting or check with the same key,
    which checks them from its own state before it searches (``BudgetSteering._learned_or_search``).
    The key stands for a state without naming it (the matchers expose none); a candidate that does not
    end the grammar from the state at hand costs one check. Bounded (``capacity`` keys, the oldest
    dropped first); thread-safe."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._endings: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[int, tuple[int, ...]]) -> list[int] | None:
        with self._lock:
            return self._endings.get(key)

    def put(self, key: tuple[int, tuple[int, ...]], ending: list[int]) -> None:
        with self._lock:
            self._endings.pop(key, None)
            if len(self._endings) >= self.capacity:
                del self._endings[next(iter(self._endings))]
            self._endings[key] = list(ending)

    def __len__(self) -> int:
        return len(self._endings)


_learned_lock = threading.Lock()
_learned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # compiled grammar -> its LearnedEndings


def learned_endings(grammar: CompiledGrammar) -> LearnedEndings:
    """The ``LearnedEndings`` of ``grammar``'s requests (made on first use, kept as long as the grammar is)."""
    with _learned_lock:
        learned = _learned.get(grammar)
        if learned is None:
            learned = _learned[grammar] = LearnedEndings()
        return learned


class BudgetSteering:
    """Ending a constrained request valid within its token budget (one per request).

    The engine asks ``closing_tokens(matcher, budget)`` once the tokens of a step are appended
    (``budget``: how many the request may still append) and ``vet(matcher, token, budget)`` before it
    appends a sampled token. An *ending* is what ``shortest_completion`` finds, plus the request's stop
    token where it fits; its *slack* is ``budget - len(ending)``.

    - A *plan*, the shortest ending known for the matcher's current state, is kept while the request
      stays on it: when the request appends the plan's first token the rest is the plan of the new state
      (no search); any other token drops it (or replaces it with the ending its vetting found).
    - Before the first token (``prepare``, on the thread that admits the request, not the engine's),
      a request whose budget is at most ``FIRST_CHECK_BUDGET`` gets the ending of the grammar's start
      state as its plan (``start_ending``, once per grammar, bounded by ``limits``); where that leaves a
      slack within ``zone``, a generous one (``start_limits``), so that a budget only a token or two over
      the shortest ending is followed from token 0.
    - Far from the end nothing runs. The first search runs once ``budget <= FIRST_CHECK_BUDGET`` (unless
      a plan is known); the next once the slack has halved, and so on. A check that finds no ending
      that fits is repeated at the next step with twice the matcher states, up to ``MAX_ESCALATION``
      times ``limits.max_nodes``; then a quarter of the budget later.
    - Once the slack is at most ``zone`` tokens, every sampled token is vetted: the ending after it is
      searched before it is appended (that search is the next step's check, so it costs one search per
      token, not two; none for the plan's own next token). A token after which no ending fits (an opening
      bracket, a new key with required values), or none is found within the bounds, is replaced by the
      plan, appended without sampling. So once a plan that fits is known, the output ends valid whatever
      later searches find.
    - A check or a vetting first tries the last ending known (the plan, or the plan dropped last) from
      the state at hand: most tokens (a character of a string, a digit) leave it an ending, and trying
      it costs a matcher step per token of it; only when it no longer ends the grammar, or no longer
      fits, is a search run. The ending then followed may be longer than the shortest one (never by more than
      the search's own ending was when found).
    - A vetting or a check then tries the ending a search found before after the same token from a
      state with the same known ending (``LearnedEndings``: kept per grammar, shared by its requests):
      a document that repeats itself (a list of values, an object's properties one after another)
      meets the same few states again and again. It is checked from the state at hand as a plan is,
      so it always ends the grammar; a search runs only when it does not, or does not fit.
    - Once the slack is at most ``margin``, the ending is appended without sampling (unless the output
      is complete already: then the model goes on, its tokens vetted, until it stops or the budget
      ends).

    The request then finishes with ``{"type": "stop", "matched": <stop id>}`` (or ``matched: None``
    where the grammar allows nothing more), or with ``"length"`` and a complete output when not even
    the stop token fits. When no ending that fits is known (none found within the search's bounds, or
    none exists), the request goes on as without steering (it may end incomplete, flagged as before).
    """

    def __init__(self, info: TokenizerInfo, stop_id: int | None, margin: int = 1, zone: int = 16,
                 limits: SearchLimits | None = None, start_limits: SearchLimits | None = None,
                 grammar: CompiledGrammar | None = None):
        self.info = info
        # endings found by searches, shared with the grammar's other requests (no grammar: this request's own)
        self.learned = learned_endings(grammar) if grammar is not None else LearnedEndings()
        self.stop_id = stop_id
        self.margin = margin
        self.zone = zone
        self.limits = limits or SearchLimits()
        self.start_limits = start_limits or START_LIMITS
        self.closed = False  # an ending was returned: nothing more to do
        self.replaced = 0  # sampled tokens replaced by the ending (vet)
        self.searches = 0
        self.searches_without_ending = 0  # searches that found no ending within their bounds
        self.search_seconds = 0.0
        self.search_max_seconds = 0.0
        self._next_check = FIRST_CHECK_BUDGET
        self._escalation = 1  # the next check's bounds, in multiples of ``limits``
        self._plan: list[int] | None = None  # the shortest ending known for the matcher's current state
        self._earlier: list[int] | None = None  # the last plan dropped: tried before the next search
        self.reused = 0  # searches saved by an earlier ending that still fits (``_reusable``)
        self.learned_reused = 0  # of those, endings learned by earlier searches (``LearnedEndings``)
        self._vetted: tuple[int, list[int]] | None = None  # (token, its state's ending) from vet
        self._last: int | None = None  # the last token consumed
        self._row: torch.Tensor | None = None

    def prepare(self, grammar: CompiledGrammar, budget: int, search: bool = True) -> None:
        """Before the request's first token, with ``budget`` tokens for it (``max_new_tokens``): where
        the first check would run at token 0, plan the start state's ending (cached per grammar, see
        the class). With ``search`` call it on a thread other than the engine's and its command loop:
        a generous search can take a while the first time a grammar is seen (up to ``start_limits``).
        ``search=False`` uses only endings already cached (none: no plan; the per-step checks remain)."""
        if not self.needs_start_plan(budget):
            return
        if not search and not start_ending_known(grammar, self.limits):
            return
        path = start_ending(grammar, self.info, self.limits)
        if path is None or budget - len(self._with_stop(path, budget)) <= self.zone:
            if search or start_ending_known(grammar, self.start_limits):
                roomy = start_ending(grammar, self.info, self.start_limits)
                if roomy is not None and (path is None or len(roomy) < len(path)):
                    path = roomy
        self._plan = path

    @staticmethod
    def needs_start_plan(budget: int) -> bool:
        """Whether a request with ``budget`` tokens is planned from its start state (``prepare``)."""
        return 0 < budget <= FIRST_CHECK_BUDGET

    def start_plan_cached(self, grammar: CompiledGrammar, budget: int) -> bool:
        """Whether ``prepare(grammar, budget)`` would find every ending it looks at cached (no search).
        Counts a stop token into the ending, so it may call for the generous search where ``prepare``
        (knowing the request's stop token) would not: never the other way round."""
        if not self.needs_start_plan(budget):
            return True
        if not start_ending_known(grammar, self.limits):
            return False
        path = start_ending(grammar, self.info, self.limits)  # cached: no search
        if path is None or budget - len(path) - 1 <= self.zone:
            return start_ending_known(grammar, self.start_limits)
        return True

    def _search(self, matcher: TokenMatcher, budget: int, scale: int = 1) -> list[int] | None:
        """An ending of the matcher's state that fits ``budget`` (without the stop token), or None
        (``scale``: a multiple of the bound on matcher states)."""
        if self._row is None:
            self._row = torch.empty(self.info.bitmask_words, dtype=torch.int32)
        # the search builds its ending a token at a time and then re-tokenizes it (shorter): let it go
        # deeper than the budget; an ending longer than the budget once re-tokenized does not fit
        limits = SearchLimits(min(2 * budget + 8, self.limits.max_tokens), self.limits.max_nodes * scale,
                              self.limits.max_seconds, self.limits.branching, self.limits.per_group)
        start = time.perf_counter()
        path = shortest_completion(matcher, self.info, limits, self._row)
        elapsed = time.perf_counter() - start
        self.searches += 1
        self.searches_without_ending += path is None
        self.search_seconds += elapsed
        self.search_max_seconds = max(self.search_max_seconds, elapsed)
        return path if path is not None and len(path) <= budget else None

    def _reusable(self, matcher: TokenMatcher, path: list[int] | None, budget: int) -> list[int] | None:
        """``path``, an ending found for an earlier state, if it is one of the matcher's state too and
        fits ``budget`` with the stop token: most tokens (a character of a string, a digit) leave the
        ending as it was, and checking it costs a matcher step per token of it (``_ends_with``) where a
        search costs hundreds of masks."""
        if not path or len(self._with_stop(path, budget)) > budget:
            return None
        if self._row is None:
            self._row = torch.empty(self.info.bitmask_words, dtype=torch.int32)
        if not _ends_with(matcher, path, self._row):
            return None
        self.reused += 1
        return path

    def _learned_or_search(self, matcher: TokenMatcher, token: int | None, known: list[int] | None, budget: int,
                           scale: int = 1) -> list[int] | None:
        """An ending of the matcher's state that fits ``budget``: the one learned after ``token`` from a
        state whose ending was ``known`` (``LearnedEndings``) if it ends the grammar from here, else a
        search's (then learned)."""
        key = None if token is None else (token, tuple(known or ()))
        found = None if key is None else self._reusable(matcher, self.learned.get(key), budget)
        if found is not None:
            self.learned_reused += 1
            return found
        found = self._search(matcher, budget, scale)
        if found is not None and key is not None:
            self.learned.put(key, found)
        return found

    def _with_stop(self, path: list[int], budget: int) -> list[int]:
        return path + [self.stop_id] if self.stop_id is not None and len(path) < budget else path

    def consumed(self, token: int) -> None:
        """The matcher consumed ``token``: the plan moves on with it (the plan's next token), or is
        replaced by the ending ``vet`` found after it, or is dropped."""
        self._last = token
        vetted, self._vetted = self._vetted, None
        plan, self._plan = self._plan, None
        if plan and plan[0] == token:
            self._plan = plan[1:]
        elif plan:
            self._earlier = plan
        if vetted is not None and vetted[0] == token:
            if self._plan is None or len(vetted[1]) < len(self._plan):
                self._plan = vetted[1]

    def vet(self, matcher: TokenMatcher, token: int, budget: int) -> list[int] | None:
        """Before a sampled ``token`` is appended with ``budget`` tokens left: None to append it, or
        the ending to append instead when no ending fits after it (only near the end, see above)."""
        plan = self._plan
        if self.closed or plan is None or len(plan) > budget:
            return None  # nothing to vet against: no plan that fits
        if budget - len(self._with_stop(plan, budget)) > self.zone:
            return None  # far from the end
        if plan and plan[0] == token:
            return None  # the plan's own next token: the rest of the plan fits after it
        if self._row is None:
            self._row = torch.empty(self.info.bitmask_words, dtype=torch.int32)
        if not _consume_one(matcher, self._row, token):
            return None  # refused: accept_token says so
        try:
            after = (self._reusable(matcher, plan, budget - 1)
                     or self._learned_or_search(matcher, token, plan, budget - 1))
        finally:
            matcher.rollback(1)
        if after is not None and len(self._with_stop(after, budget - 1)) <= budget - 1:
            self._vetted = (token, after)
            return None
        replacement = self._with_stop(plan, budget)
        if not replacement:  # complete already and no stop token to end with: the token stays
            return None
        self.closed = True
        self.replaced += 1
        return replacement

    def closing_tokens(self, matcher: TokenMatcher, budget: int) -> list[int]:
        """The tokens to append now to end within ``budget`` (empty: let the model go on)."""
        if self.closed or budget <= 0:
            return []
        path = self._plan
        if path is None or len(path) > budget:
            if budget > self._next_check:
                return []
            found = self._reusable(matcher, self._earlier, budget) or \
                self._learned_or_search(matcher, self._last, self._earlier, budget, self._escalation)
            if found is not None and (path is None or len(found) < len(path)):
                path = self._plan = found
        if path is None or len(path) > budget:
            # none found within the bounds, or none that fits: look again at the next step with twice
            # the bounds; past MAX_ESCALATION, a quarter of the budget later with the engine's
            if self._escalation < MAX_ESCALATION:
                self._escalation *= 2
                self._next_check = budget - 1
            else:
                self._escalation = 1
                self._next_check = budget - max(1, budget // 4)
            return []
        self._escalation = 1
        ending = self._with_stop(path, budget)
        slack = budget - len(ending)
        if slack <= self.margin and path:  # (already complete: let the model go on, vetting its tokens)
            self.closed = True
            return ending
        if slack <= self.zone:  # vet the next token against this ending
            self._next_check = budget - 1
        else:
            self._next_check = budget - max(1, (slack - self.zone) // 2)
        return []
