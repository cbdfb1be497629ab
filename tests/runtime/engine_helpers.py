"""Helpers shared by the engine tests."""

from __future__ import annotations

REFERENCE_NEW_TOKENS = 20


def greedy_params(n: int = REFERENCE_NEW_TOKENS) -> dict:
    """Greedy, exactly n tokens, EOS masked like transformers' min_new_tokens."""
    return {"temperature": 0.0, "max_new_tokens": n, "min_new_tokens": n}


def assert_no_leak(engine) -> None:
    """Invariant 2: once idle and flushed, every KV slot and table row is free and the tree is intact."""
    assert engine.flush_cache(), "flush refused: requests still running"
    engine.tree.check_integrity()
    pool = engine.runner.pool
    assert pool.num_free == pool.capacity, f"{pool.capacity - pool.num_free} KV slots leaked"
    table = engine.runner.slot_table
    assert table.num_free == engine.config.max_running_requests
