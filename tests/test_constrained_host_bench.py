"""benchmarks/constrained_host.py: the engine thread's parts on a small structured mix, timed and restored."""

from __future__ import annotations

import re

import pytest

from plait.runtime.constrained.matcher import GrammarState
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.model


def test_a_small_structured_mix_prints_every_part_and_leaves_nothing_patched(capsys, tmp_path):
    """Also ``--dump``: the constrained requests' outputs, which ``budget_search.py --replay`` takes through
    the grammar and budget steering again as the engine did (the same tokens come out)."""
    bench = load_benchmark("constrained_host")
    accept = GrammarState.accept_token
    dump = tmp_path / "outputs.json"
    assert bench.main(["--requests", "4", "--output", "20", "--dump", str(dump)]) == 0
    out = capsys.readouterr().out
    assert "4 requests, 50% constrained, 20 tokens" in out
    for part in ("settle a step", "settle before the sampling launch", "grammar: accept a token", "masks", "schedule",
                 "forward"):
        assert f"| {part}" in out, part
    assert GrammarState.accept_token is accept  # the timing wrappers are gone
    assert load_benchmark("budget_search").main(["--replay", str(dump), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"replayed 2 constrained requests \(\d+ tokens\).* searches [\d.]+ a request", out), out
    assert "outputs other than recorded 0" in out


def test_random_prompts_are_the_serving_benchmarks_and_differ(bundled_model_dir):
    """``--prompt-tokens N``: prompts of N tokens of random text, as benchmarks/serving.py's structured
    workload makes them (a different output per request), reproducible from ``--seed``."""
    import argparse

    bench = load_benchmark("constrained_host")
    args = argparse.Namespace(requests=3, prompt_tokens=40, seed=1)
    prompts = bench._prompts(args, str(bundled_model_dir))
    assert len(set(prompts)) == 3 and prompts == bench._prompts(args, str(bundled_model_dir))
    assert all(p.startswith("Extract a record as JSON from this text:\n") for p in prompts)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir))
    body = [len(tokenizer.encode(p.split("\n", 1)[1], add_special_tokens=False)) for p in prompts]
    assert all(30 <= n <= 40 for n in body), body
    short = bench._prompts(argparse.Namespace(requests=2, prompt_tokens=0, seed=1), str(bundled_model_dir))
    assert short[0].startswith("Extract record 0 as JSON")
