"""Helpers shared by the engine tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

REFERENCE_NEW_TOKENS = 20
FFFD = "\ufffd"


def greedy_params(n: int = REFERENCE_NEW_TOKENS) -> dict:
    """Greedy, exactly n tokens, EOS masked like transformers' min_new_tokens."""
    return {"temperature": 0.0, "max_new_tokens": n, "min_new_tokens": n}


def assert_no_leak(engine) -> None:
    """Invariant 2: once idle and flushed, every KV slot and table row is free and the tree is intact."""
    assert engine.flush_cache(), "flush refused: requests still running"
    engine.tree.check_integrity()
    pool = engine.runner.pool
    assert pool.num_free == pool.capacity, f"{pool.capacity - pool.num_free} KV slots leaked"
    assert pool.num_sliding_free == pool.num_sliding_slots, (
        f"{pool.num_sliding_slots - pool.num_sliding_free} sliding KV slots leaked")
    table = engine.runner.slot_table
    assert table.num_free == engine.config.max_running_requests


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def assert_cumulative(snapshots: list[dict]) -> dict:
    """Check a stream of one request: snapshots grow, only the last is final; return the last.

    Every snapshot's output ids extend the previous ones, every streamed text is a prefix of the final
    text and none shows half a character (U+FFFD) -- only the final text may end in one, when the
    generation was cut inside a character.
    """
    assert snapshots, "the stream yielded nothing"
    final = snapshots[-1]
    assert final["meta_info"]["finish_reason"] is not None
    prev_ids: list[int] = []
    for snap in snapshots[:-1]:
        assert snap["meta_info"]["finish_reason"] is None
        assert snap["output_ids"][: len(prev_ids)] == prev_ids
        assert len(snap["output_ids"]) > len(prev_ids)
        assert FFFD not in snap["text"], f"streamed half a character: {snap['text']!r}"
        assert final["text"].startswith(snap["text"]), f"{snap['text']!r} is not a prefix of {final['text']!r}"
        prev_ids = snap["output_ids"]
    assert final["output_ids"][: len(prev_ids)] == prev_ids
    return final


def split_by_index(snapshots: Iterable[dict]) -> dict[int, list[dict]]:
    """Group the snapshots of a batch stream by their ``index``."""
    groups: dict[int, list[dict]] = {}
    for snap in snapshots:
        groups.setdefault(snap["index"], []).append(snap)
    return groups
