"""benchmarks/detokenize.py: the decode stream against the window decode, timed, on the bundled tokenizer."""

from __future__ import annotations

import re

import pytest

from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.model


def test_both_paths_are_timed_and_give_the_same_text(capsys):
    assert load_benchmark("detokenize").main(["--requests", "3", "--tokens", "40", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("random ids", "README text"):
        assert re.search(rf"{name}: window decode [\d.]+ us a token, decode stream [\d.]+ us a token; same text: True",
                         out), out
