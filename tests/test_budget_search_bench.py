"""benchmarks/budget_search.py: budget steering's searches from random-walk JSON states, timed."""

from __future__ import annotations

import re

import pytest

from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.model


def test_searches_from_random_walk_states_print_times_and_a_fingerprint(capsys):
    bench = load_benchmark("budget_search")
    assert bench.main(["--walks", "1", "--repeats", "1", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    count = len(bench._schemas()) * len(bench.WALK_LENGTHS)
    match = re.search(rf"{count} searches a pass, 1 passes: fastest pass [\d.]+ ms.*endings fingerprint (\w+)", out)
    assert match, out
    assert bench.main(["--walks", "1", "--repeats", "1", "--seed", "3"]) == 0  # the same states: the same endings
    assert f"fingerprint {match.group(1)}" in capsys.readouterr().out


def test_batch_bitmask_timing(capsys):
    bench = load_benchmark("budget_search")
    assert bench.main(["--walks", "1", "--repeats", "1", "--seed", "3", "--batch-bitmask"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"batch bitmask, 40 rows \(20 constrained\): median \d+ us, fastest \d+ us", out), out
