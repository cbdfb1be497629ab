"""GPT-OSS's hybrid KV layout against transformers (tiny random model, CPU, float32).

The sliding-window layers (window 8) keep their KV in a sliding pool far smaller than the full one, so
running requests free the sliding slots their windows leave behind, cached prefixes lose theirs under
pressure (the tree keeps each node's last window first) and adopt a request's again, and requests are
retracted; greedy tokens must still equal transformers', and every scenario ends leak-free with the
tree's sliding flags agreeing with the pool.
"""

from __future__ import annotations

import pytest

from plait.runtime.engine import Engine
from tests.runtime.engine_helpers import assert_no_leak

pytest.importorskip("transformers")

from tests.runtime.models.moe_helpers import PROMPTS, WINDOW, build_hf, greedy, hf_greedy  # noqa: E402

NEW = 24  # long enough for requests to leave many tokens behind their window
LONG = [[1] + [(7 * i + 3) % 250 + 3 for i in range(90)], [1] + [(11 * i + 5) % 250 + 3 for i in range(70)]]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(transformers model, checkpoint dir, {prompt: transformers' greedy tokens})."""
    hf = build_hf("gpt_oss")
    path = tmp_path_factory.mktemp("gpt_oss_hybrid")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path, {}


def reference(gpt_oss, ids: list[int]) -> list[int]:
    hf, _, refs = gpt_oss
    if tuple(ids) not in refs:
        refs[tuple(ids)] = hf_greedy(hf, ids, NEW)
    return refs[tuple(ids)]


@pytest.fixture
def small_batches(monkeypatch):
    """Free behind windows every 2 tokens and evict sliding slots a few at a time (the defaults, 64 and
    4096, are sized for real models and would never trigger here)."""
    import plait.runtime.scheduler as scheduler

    monkeypatch.setattr(scheduler, "SLIDING_FREE_BATCH", 2)
    monkeypatch.setattr(scheduler, "SLIDING_EVICT_MIN", 4)


def engine_with(path, **kwargs) -> Engine:
    kwargs = {"max_total_tokens": 2048, "max_running_requests": 4, "chunked_prefill_size": 32,
              "swa_full_tokens_ratio": 0.01, **kwargs}
    return Engine(model=str(path), **kwargs)


def check(engine: Engine, gpt_oss, prompts: list[list[int]]) -> list[dict]:
    outs = engine.generate(input_ids=prompts, sampling_params=greedy(NEW))
    for ids, out in zip(prompts, outs):
        assert out["output_ids"] == reference(gpt_oss, ids)
    engine.tree.check_integrity()
    return outs


def test_layout_is_hybrid_and_smaller(gpt_oss, small_batches):
    _, path, _ = gpt_oss
    with engine_with(path) as engine:
        pool = engine.runner.pool
        assert pool.hybrid and pool.sliding_layers == {0, 2} and pool.sliding_window == WINDOW
        # the floor: 4 running x (2 x 8 + 2) + 2 chunks of 32
        assert pool.num_sliding_slots == 4 * (2 * WINDOW + 2) + 64 < pool.num_slots
        assert [b.shape[0] for b in pool.k_buffers] == [pool.num_sliding_slots + 1, 2049, pool.num_sliding_slots + 1]
    with engine_with(path, disable_hybrid_swa_memory=True) as engine:
        assert not engine.runner.pool.hybrid and engine.stats()["kv_sliding_slots_total"] == 0


def test_batched_greedy_with_sliding_pressure(gpt_oss, small_batches):
    _, path, _ = gpt_oss
    with engine_with(path) as engine:
        check(engine, gpt_oss, LONG + PROMPTS)
        stats = engine.stats()
        assert stats["kv_sliding_slots_used"] <= stats["kv_sliding_slots_total"]
        assert_no_leak(engine)


def test_prefix_hits_past_the_window_after_sliding_eviction(gpt_oss, small_batches):
    """The second round shares long cached prefixes whose sliding slots were partly evicted: matches
    stop where a window would reach a lost one, and the tokens are still transformers'."""
    _, path, _ = gpt_oss
    with engine_with(path) as engine:
        check(engine, gpt_oss, LONG)
        variants = [LONG[0][:60] + [9, 9], LONG[0] + [4], LONG[1][:40] + [5], LONG[1] + [6, 7]]
        outs = check(engine, gpt_oss, variants)
        assert max(o["meta_info"]["cached_tokens"] for o in outs) > 3 * WINDOW
        assert_no_leak(engine)


def test_chunked_prefill_shorter_than_the_window(gpt_oss, small_batches):
    _, path, _ = gpt_oss
    with engine_with(path, chunked_prefill_size=WINDOW - 3) as engine:
        check(engine, gpt_oss, LONG + PROMPTS[:2])
        assert_no_leak(engine)


def test_retraction(gpt_oss, small_batches):
    """A full pool too small for every request: requests are retracted (their KV cached, windows and
    all) and resumed from what is still usable."""
    _, path, _ = gpt_oss
    total = max(len(ids) for ids in LONG) + NEW + 8
    with engine_with(path, max_total_tokens=total, schedule_conservativeness=0) as engine:
        check(engine, gpt_oss, LONG + PROMPTS)
        assert engine.stats()["retractions"] > 0
        assert_no_leak(engine)


def test_without_the_prefix_cache(gpt_oss, small_batches):
    """With the radix cache off, requests still free their sliding slots behind their windows, and
    give back the rest when they finish."""
    _, path, _ = gpt_oss
    with engine_with(path, disable_radix_cache=True) as engine:
        check(engine, gpt_oss, LONG + PROMPTS)
        assert_no_leak(engine)
