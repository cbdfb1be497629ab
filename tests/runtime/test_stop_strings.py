"""Stop strings cost time and memory linear in their length (a long stop string cannot exhaust memory).

The matcher is checked against a brute-force definition on random texts; the detokenizer's memory is
measured with tracemalloc (not wall time, which depends on the machine's load).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.runtime.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tok(bundled_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(bundled_model_dir)


def _longest_partial_brute(text: str, stops: list[str]) -> int:
    """The definition: the longest suffix of ``text`` that is a proper prefix of some stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=7), min_size=1, max_size=4),
    pieces=st.lists(st.text(alphabet="abc", max_size=5), max_size=8),
)
def test_matcher_agrees_with_the_definition(stops: list[str], pieces: list[str]) -> None:
    matcher = StopStringMatcher(stops)
    text = ""
    for piece in pieces:
        before = text
        text += piece
        completed = matcher.feed(piece)
        assert matcher.longest_partial == _longest_partial_brute(text, stops)
        # a stop string is reported exactly when an occurrence of it ends inside the new piece
        expected = [i for i, s in enumerate(stops) if s in text and text.rfind(s) + len(s) > len(before)]
        assert completed == expected


def _peak_bytes_of_building(tok: Tokenizer, stop: str) -> int:
    tracemalloc.start()
    try:
        IncrementalDetokenizer(tok, stop=[stop])
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_stop_string_memory_is_linear_in_its_length(tok: Tokenizer) -> None:
    # Listing every prefix of the stop string took ~200 MB for 20 KB (quadratic); now ~4 bytes a character.
    small = "x" * 19_999 + "y"
    assert _peak_bytes_of_building(tok, small) < 1_000_000
    huge = "x" * 999_999 + "y"  # 1 MB: the quadratic version asked for ~500 GB
    assert _peak_bytes_of_building(tok, huge) < 12 * len(huge)


def test_long_stop_string_held_back_and_matched_across_tokens(tok: Tokenizer) -> None:
    stop = "ab" * 5000 + "!"
    detok = IncrementalDetokenizer(tok, stop=[stop, "zzz"])
    tracemalloc.start()
    try:
        emitted = detok.add(tok.encode("hello ", add_special_tokens=False)[0])
        for token in tok.encode("ab" * 5000, add_special_tokens=False):
            emitted += detok.add(token)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert emitted == "hello" and not detok.stopped  # the 10 000 characters that may start the stop are held
    assert peak < 4_000_000
    for token in tok.encode("!", add_special_tokens=False):
        detok.add(token)
    assert detok.stopped and detok.matched_stop == stop and detok.text == "hello"


def test_held_back_text_is_released_when_the_long_stop_string_breaks(tok: Tokenizer) -> None:
    stop = "ab" * 100 + "!"
    detok = IncrementalDetokenizer(tok, stop=[stop])
    text = "ab" * 50 + "?"
    out = "".join(detok.add(t) for t in tok.encode(text, add_special_tokens=False))
    assert out == text and not detok.stopped
