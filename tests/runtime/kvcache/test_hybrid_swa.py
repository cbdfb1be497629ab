"""Hybrid KV pools (sliding-window layers in sliding slots of their own) and the radix tree over them.

The pool: every full slot handed out gets a sliding slot (``full_to_sliding``), freed with it or alone.
The tree: per-token sliding flags, matches that stop where a sliding layer's window would reach a
token without one, adoption of a request's sliding slots where the tree lost its own, and LRU eviction
of sliding slots that keeps each node's last window and never touches protected nodes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.radix import RadixCache, usable_prefix

W = 4  # the sliding window of these tests


def make(num_slots: int = 64, sliding: int = 32) -> tuple[KVPool, RadixCache]:
    pool = KVPool(num_slots, 3, 1, 2, debug=True, sliding_layers=(0, 2), num_sliding_slots=sliding, sliding_window=W)
    return pool, RadixCache(pool)


def put(pool: KVPool, tree: RadixCache, tokens: list[int], sliding_from: int = 0) -> torch.Tensor:
    """Insert ``tokens`` with fresh slots whose first ``sliding_from`` lost their sliding slots."""
    slots = pool.alloc(len(tokens))
    assert slots is not None
    pool.free_sliding(slots[:sliding_from])
    assert tree.insert(tokens, slots, sliding_from=sliding_from) == 0
    return slots


def assert_all_free(pool: KVPool, tree: RadixCache) -> None:
    tree.reset()
    tree.check_integrity()
    assert pool.num_free == pool.capacity and pool.num_sliding_free == pool.num_sliding_slots


def test_pool_maps_each_full_slot_to_a_sliding_slot():
    pool, _ = make()
    assert [b.shape[0] for b in pool.k_buffers] == [33, 65, 33]
    slots = pool.alloc(5)
    sliding = pool.full_to_sliding[slots]
    assert bool((sliding > 0).all()) and torch.unique(sliding).numel() == 5
    assert pool.num_sliding_free == 27
    pool.free_sliding(slots[:2])
    assert pool.num_sliding_free == 29 and pool.full_to_sliding[slots[:2]].tolist() == [0, 0]
    with pytest.raises(ValueError, match="sliding slots"):
        pool.free(slots)  # the first two have no sliding slot any more: caught in debug mode, nothing freed
    assert pool.num_free == 59
    pool.free(slots[:2], sliding=False)
    pool.free(slots[2:])
    assert pool.num_free == 64 and pool.num_sliding_free == 32


def test_alloc_needs_both_kinds_of_slot():
    pool, _ = make(num_slots=64, sliding=8)
    assert pool.alloc(9) is None and pool.num_free == 64  # nothing taken when the sliding slots run short
    slots = pool.alloc(8)
    assert slots is not None and pool.alloc(1) is None
    pool.free_sliding(slots[:1])
    assert pool.alloc(1) is not None


def test_memory_budget_splits_between_the_two_pools():
    per_layer = 2 * 1 * 2 * 4  # K and V, 1 head, head_dim 2, float32
    budget = 10_000
    pool = KVPool.from_memory_budget(budget, 3, 1, 2, sliding_layers=(0, 2), sliding_window=W, sliding_fraction=0.25)
    assert abs(pool.num_sliding_slots - 0.25 * pool.num_slots) <= 2
    assert pool.memory_bytes <= budget
    assert budget - pool.memory_bytes < 2 * per_layer * 2  # no more whole slot fits
    plain = KVPool.from_memory_budget(budget, 3, 1, 2)
    assert pool.num_slots > 1.5 * plain.num_slots  # the sliding layers' share mostly went to more tokens
    floored = KVPool.from_memory_budget(budget, 3, 1, 2, sliding_layers=(0, 2), sliding_window=W,
                                        sliding_fraction=0.0, min_sliding_slots=100)
    assert floored.num_sliding_slots == 100 and floored.memory_bytes <= budget


@pytest.mark.parametrize(
    ("held", "expected"),
    [
        ("1111111", 7),
        ("0001111", 7),  # the window before 7 is 4..6: all held
        ("0000111", 7),
        ("1110111", 7),
        ("1110011", 3),  # 7..4 each see the lost token 4 or 5 in their window; 3 sees only 0..2
        ("1111110", 6),
        ("0", 0),
        ("", 0),
    ],
)
def test_usable_prefix(held, expected):
    flags = np.array([c == "1" for c in held], dtype=bool)
    got = usable_prefix(flags, W)
    assert got == expected
    # brute force: the largest p whose W - 1 preceding tokens are all held
    best = max(p for p in range(len(flags) + 1) if flags[max(0, p - W + 1) : p].all())
    assert got == best


def test_match_stops_where_a_window_would_reach_a_lost_sliding_slot():
    pool, tree = make()
    put(pool, tree, list(range(10)), sliding_from=6)  # tokens 0..5 lost theirs
    assert tree.match_prefix(list(range(10))).length == 10  # the window before 10: 7..9
    assert tree.match_prefix(list(range(9))).length == 9  # 6..8
    assert tree.match_prefix(list(range(8))).length == 0  # 5..7 includes a lost one: nothing before 5 is usable either
    tree.check_integrity()
    assert_all_free(pool, tree)


def test_cache_tokens_adopts_the_requests_sliding_slots_where_the_tree_lost_them():
    pool, tree = make()
    tokens = list(range(12))
    put(pool, tree, tokens, sliding_from=12)  # the tree holds all 12 tokens, none with a sliding slot
    own = pool.alloc(12)  # a request computed the same tokens; it still has sliding slots from 5 on
    pool.free_sliding(own[:5])
    sliding_of_own = pool.full_to_sliding[own[5:]].clone()
    assert tree.cache_tokens(tokens, own, None, own_from=0, sliding_from=5) == 12
    match = tree.match_prefix(tokens)
    assert match.length == 12  # usable again: the tree took the request's sliding slots
    assert pool.full_to_sliding[match.slots[5:]].tolist() == sliding_of_own.tolist()
    assert pool.num_free == 64 - 12 and pool.num_sliding_free == 32 - 7  # the request's full slots freed
    tree.check_integrity()
    assert_all_free(pool, tree)


def test_cache_tokens_frees_duplicates_the_tree_already_had_whole():
    pool, tree = make()
    tokens = list(range(8))
    put(pool, tree, tokens)
    own = pool.alloc(8)
    assert tree.cache_tokens(tokens + [99], torch.cat((own, pool.alloc(1))), None, own_from=0, sliding_from=0) == 8
    assert pool.num_free == 64 - 9 and pool.num_sliding_free == 32 - 9
    tree.check_integrity()
    assert_all_free(pool, tree)


def test_evict_sliding_keeps_node_tails_first_and_skips_protected_nodes():
    pool, tree = make(num_slots=64, sliding=40)
    put(pool, tree, list(range(10)))  # older
    put(pool, tree, list(range(100, 110)))  # newer
    protected = tree.match_prefix(list(range(100, 110))).node
    assert tree.evict_sliding(3, protected=[protected]) == 6  # the older node, all but its last W
    assert tree.match_prefix(list(range(10))).length == 10  # a match ending at the node still works
    assert tree.match_prefix(list(range(7))).length == 0
    assert tree.evict_sliding(100, protected=[protected]) == 4  # then the older node's tail
    assert tree.sliding_size() == 10 and tree.match_prefix(list(range(100, 110))).length == 10
    assert tree.match_prefix(list(range(10))).length == 0
    assert tree.total_size() == 20  # full slots stay cached
    tree.check_integrity()
    assert tree.evict(100) == 20 and pool.num_free == 64 and pool.num_sliding_free == 40
    tree.check_integrity()


def test_split_nodes_keep_their_flags():
    pool, tree = make()
    put(pool, tree, list(range(12)), sliding_from=3)
    own = pool.alloc(8)
    assert tree.cache_tokens(list(range(6)) + [50, 51], own, None, own_from=0, sliding_from=0) == 6  # splits at 6
    tree.check_integrity()
    assert tree.sliding_size() == 9 + 2 + 3  # the tree adopted the request's sliding slots of tokens 0..2
    assert_all_free(pool, tree)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_swa_full_tokens_ratio_is_checked(ratio):
    from plait.runtime.config import EngineConfig

    with pytest.raises(ValueError, match="swa_full_tokens_ratio"):
        EngineConfig(swa_full_tokens_ratio=ratio)
