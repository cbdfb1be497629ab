"""Stop regexes in the incremental detokenizer: cut like stop strings, never streamed, bounded work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from plait.runtime.stop_regex import MAX_WINDOW, StopRegexes, max_match_chars
from plait.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tok(bundled_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(bundled_model_dir)


def stream(tok: Tokenizer, text: str, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    chunks = [detok.add(i) for i in tok.encode(text)]
    chunks.append(detok.finish())
    return chunks, detok


def test_regex_cuts_the_text_at_the_match(tok):
    chunks, detok = stream(tok, "Order 66 was given at 10:45 sharp.", stop_regex=[r"\d\d:\d\d"])
    assert detok.stopped and detok.matched_stop == r"\d\d:\d\d"
    assert "".join(chunks) == detok.text == "Order 66 was given at "
    _, kept = stream(tok, "Order 66 was given at 10:45 sharp.", stop_regex=[r"\d\d:\d\d"], no_stop_trim=True)
    assert kept.text == "Order 66 was given at 10:45"


def test_no_part_of_a_match_is_streamed(tok):
    detok = IncrementalDetokenizer(tok, stop_regex=[r"END-\d+"])
    streamed = ""
    for token in tok.encode("We are done. END-42 and beyond"):
        streamed += detok.add(token)
        assert "We are done. ".startswith(streamed)  # "END-" was held back until the match completed
    assert streamed == detok.text == "We are done. "


def test_held_back_text_comes_out_when_no_match_completes(tok):
    chunks, detok = stream(tok, "The END is near", stop_regex=[r"END-\d+"])
    assert not detok.stopped and "".join(chunks) == "The END is near"


def test_earliest_of_stop_strings_and_regexes_wins(tok):
    text = "alpha beta 123 gamma"
    _, by_regex = stream(tok, text, stop=["gamma"], stop_regex=[r"\d+"])
    assert by_regex.text == "alpha beta " and by_regex.matched_stop == r"\d+"
    _, by_string = stream(tok, text, stop=["beta"], stop_regex=[r"\d+"])
    assert by_string.text == "alpha " and by_string.matched_stop == "beta"


def test_search_window_is_bounded():
    assert max_match_chars(r"\d\d:\d\d") == 5 and max_match_chars(r"a+") == MAX_WINDOW
    matcher = StopRegexes([r"x\d{3}y"])
    text = "x123y" + "-" * 10_000
    assert matcher.find(text, len(text) - 1) is None  # an old match far behind the window is not searched again
    assert matcher.find(text[:5], 4).start == 0


def test_catastrophic_backtracking_ends_the_request_instead_of_the_engine(tok):
    chunks, detok = stream(tok, "a" * 60 + "!", stop_regex=[r"(a|a)*b\d"])
    assert detok.failure is not None and "longer than" in detok.failure
    assert detok.stopped and len("".join(chunks)) < 61


def test_matches_equal_a_full_search_for_bounded_patterns(tok):
    text = "ab12 cd34 x9y z77 end"
    for pattern in (r"\d\d", r"[a-z]\d[a-z]", r"cd|end", r"(?<=z)\d"):
        _, detok = stream(tok, text, stop_regex=[pattern])
        assert detok.text == text[: re.search(pattern, text).start()], pattern
