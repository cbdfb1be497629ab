"""Stop regexes (``SamplingParams.stop_regex``): finding them in streamed text with bounded work.

Each time the generated text grows, every pattern is searched in a tail window only: the new text
plus the pattern's longest possible match before it (``re``'s width analysis), capped at
``MAX_WINDOW`` characters. A match of a bounded pattern is therefore found exactly where a search of
the whole text would find it; a pattern with an unbounded repeat (``\\d+``) is looked for in the
last ``MAX_WINDOW`` characters, so its match starts at most that far back. Every search runs under a
time limit (the ``regex`` module's ``timeout``), so a catastrophically backtracking pattern costs at
most ``SEARCH_TIMEOUT_S`` per step before the request is ended.

While streaming, text that could still become the start of a match (a partial match at the end of
the text, ``regex``'s ``partial=True``) is held back, as the start of a stop string is: no part of a
trimmed match is ever streamed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import regex

try:  # Python 3.11+
    import re._parser as sre_parse  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse  # type: ignore[no-redef]

MAX_WINDOW = 1024  # characters of earlier text a search may look back over
LOOKBEHIND_MARGIN = 32  # extra characters before the window, for lookbehind assertions
SEARCH_TIMEOUT_S = 0.05  # per search of one pattern


class StopRegexTimeout(RuntimeError):
    """A stop regex took longer than ``SEARCH_TIMEOUT_S`` on one step (catastrophic backtracking)."""


@dataclass(frozen=True)
class StopRegexMatch:
    """The earliest match: where it starts and ends in the text, and its pattern."""

    start: int
    end: int
    pattern: str


def max_match_chars(pattern: str) -> int:
    """The longest text ``pattern`` can match, capped at ``MAX_WINDOW`` (unbounded repeats hit the cap)."""
    try:
        width = sre_parse.parse(pattern).getwidth()[1]
    except (re.error, RecursionError, OverflowError):
        return MAX_WINDOW
    return min(int(width), MAX_WINDOW)


class StopRegexes:
    """The compiled stop regexes of one request, searched over the tail of a growing text."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = tuple(dict.fromkeys(patterns))
        try:
            self.compiled = [regex.compile(p) for p in self.patterns]
        except regex.error as exc:
            raise ValueError(f"sampling parameter 'stop_regex' has a pattern this engine cannot compile: {exc}") from None
        self.lookback = max((max_match_chars(p) for p in self.patterns), default=0) + LOOKBEHIND_MARGIN

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def window_start(self, text: str, old_len: int) -> int:
        """Where a search starts after the text grew from ``old_len`` characters."""
        return max(0, old_len - self.lookback)

    def find(self, text: str, old_len: int) -> StopRegexMatch | None:
        """The earliest full match in the window after the text grew from ``old_len`` characters.

        Ties (two patterns matching at the same place) prefer the shorter match. Raises
        ``StopRegexTimeout`` when a pattern exceeds its time limit.
        """
        start = self.window_start(text, old_len)
        best: StopRegexMatch | None = None
        for pattern, compiled in zip(self.patterns, self.compiled):
            m = self._search(compiled, text, start, partial=False)
            if m is not None and (best is None or (m.start(), m.end()) < (best.start, best.end)):
                best = StopRegexMatch(m.start(), m.end(), pattern)
        return best

    def partial_start(self, text: str, old_len: int) -> int | None:
        """Where the earliest partial match (text that may still become a match) starts, or None."""
        start = self.window_start(text, old_len)
        earliest = None
        for compiled in self.compiled:
            m = self._search(compiled, text, start, partial=True)
            if m is not None and m.partial and (earliest is None or m.start() < earliest):
                earliest = m.start()
        return earliest

    @staticmethod
    def _search(compiled: regex.Pattern, text: str, start: int, partial: bool) -> regex.Match | None:
        try:
            return compiled.search(text, start, partial=partial, timeout=SEARCH_TIMEOUT_S)
        except TimeoutError:
            raise StopRegexTimeout(
                f"stop_regex {compiled.pattern[:80]!r} took longer than {SEARCH_TIMEOUT_S} s on one step") from None
