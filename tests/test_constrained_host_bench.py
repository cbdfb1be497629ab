"""benchmarks/constrained_host.py: the engine thread's parts on a small structured mix, timed and restored."""

from __future__ import annotations

import pytest

from plait.runtime.constrained.matcher import GrammarState
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.model


def test_a_small_structured_mix_prints_every_part_and_leaves_nothing_patched(capsys):
    bench = load_benchmark("constrained_host")
    accept = GrammarState.accept_token
    assert bench.main(["--requests", "4", "--output", "12"]) == 0
    out = capsys.readouterr().out
    assert "4 requests, 50% constrained, 12 tokens" in out
    for part in ("settle a step", "settle before the sampling launch", "grammar: accept a token", "masks", "schedule",
                 "forward"):
        assert f"| {part}" in out, part
    assert GrammarState.accept_token is accept  # the timing wrappers are gone
