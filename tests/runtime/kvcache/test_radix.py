"""RadixCache: unit tests plus a stateful test against a brute-force model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.radix import MatchResult, RadixCache, TreeNode


def make(num_slots: int = 64, disabled: bool = False) -> tuple[KVPool, RadixCache]:
    pool = KVPool(num_slots, num_layers=1, num_kv_heads=1, head_dim=1, debug=True)
    return pool, RadixCache(pool, disabled=disabled)


def put(pool: KVPool, tree: RadixCache, tokens: list[int]) -> torch.Tensor:
    """Insert ``tokens`` with fresh slots like the engine does; return the tree's slots for them."""
    slots = pool.alloc(len(tokens))
    assert slots is not None
    cached = tree.insert(tokens, slots)
    pool.free(slots[:cached])
    return tree.match_prefix(tokens).slots


def path_of(node: TreeNode) -> tuple[int, ...]:
    parts: list[tuple[int, ...]] = []
    while node.parent is not None:
        parts.append(node.key)
        node = node.parent
    return tuple(t for part in reversed(parts) for t in part)


def assert_no_leak(pool: KVPool, tree: RadixCache, held: int = 0) -> None:
    assert pool.num_free + tree.all_slots().numel() + held == pool.capacity


# ----------------------------------------------------------------------------- unit tests


def test_empty_tree_and_empty_query():
    pool, tree = make()
    m = tree.match_prefix([1, 2])
    assert m.length == 0 and m.node is tree.root and m.slots.dtype == torch.int64
    put(pool, tree, [1, 2])
    m = tree.match_prefix([])
    assert m.length == 0 and m.node is tree.root
    tree.check_integrity()


def test_insert_returns_already_present_length_and_first_inserter_wins():
    pool, tree = make()
    a = pool.alloc(4)
    assert tree.insert([1, 2, 3, 4], a) == 0
    b = pool.alloc(6)
    assert tree.insert([1, 2, 3, 4, 5, 6], b) == 4
    pool.free(b[:4])
    assert tree.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == a.tolist() + b[4:].tolist()
    c = pool.alloc(2)
    assert tree.insert([1, 2], c) == 2  # fully present, nothing stored
    pool.free(c)
    assert tree.total_size() == 6
    tree.check_integrity()
    assert_no_leak(pool, tree)


def test_match_splits_inside_an_edge():
    pool, tree = make()
    slots = put(pool, tree, [1, 2, 3, 4])
    m = tree.match_prefix([1, 2, 9])
    assert m.length == 2
    assert m.slots.tolist() == slots[:2].tolist()
    assert m.node.key == (1, 2) and m.node.value.tolist() == slots[:2].tolist()
    (tail,) = m.node.children.values()
    assert tail.key == (3, 4) and tail.parent is m.node
    assert tree.root.children[1] is m.node
    assert tree.match_prefix([1, 2, 3, 4]).slots.tolist() == slots.tolist()
    tree.check_integrity()


def test_match_ending_inside_edge_when_query_runs_out():
    pool, tree = make()
    put(pool, tree, [5, 6, 7])
    m = tree.match_prefix([5])
    assert m.length == 1 and m.node.key == (5,) and path_of(m.node) == (5,)
    assert tree.match_prefix(torch.tensor([5, 6, 9])).length == 2  # tensors work as token ids
    tree.check_integrity()


def test_insert_splits_and_branches():
    pool, tree = make()
    put(pool, tree, [1, 2, 3])
    s = pool.alloc(3)
    assert tree.insert([1, 2, 4], s) == 2
    pool.free(s[:2])
    mid = tree.root.children[1]
    assert mid.key == (1, 2) and sorted(mid.children) == [3, 4]
    assert tree.match_prefix([1, 2, 4]).slots[2].item() == s[2].item()
    tree.check_integrity()
    assert_no_leak(pool, tree)


def test_insert_length_mismatch_raises():
    _, tree = make()
    with pytest.raises(ValueError, match="slots"):
        tree.insert([1, 2], torch.tensor([1]))


def test_lock_protects_from_eviction_and_sizes():
    pool, tree = make()
    a = put(pool, tree, [1, 1, 1])
    put(pool, tree, [2, 2])
    m = tree.match_prefix([1, 1, 1])
    tree.inc_lock_ref(m.node)
    assert tree.protected_size() == 3 and tree.evictable_size() == 2
    assert tree.evict(100) == 2
    assert tree.match_prefix([1, 1, 1]).slots.tolist() == a.tolist()
    assert tree.match_prefix([2, 2]).length == 0
    tree.check_integrity()
    tree.dec_lock_ref(m.node)
    assert tree.protected_size() == 0 and tree.evictable_size() == 3
    assert tree.evict(1) == 3
    assert tree.total_size() == 0 and pool.num_free == pool.capacity
    tree.check_integrity()


def test_lock_on_inner_node_protects_ancestors_only():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    m = tree.match_prefix([1, 2])  # splits; locks only the (1, 2) head
    tree.inc_lock_ref(m.node)
    tree.inc_lock_ref(m.node)
    assert tree.protected_size() == 2
    assert tree.evict(10) == 2  # the (3, 4) tail
    assert tree.match_prefix([1, 2, 3]).length == 2
    tree.check_integrity()
    tree.dec_lock_ref(m.node)
    assert tree.evict(10) == 0
    tree.dec_lock_ref(m.node)
    with pytest.raises(RuntimeError, match="unlocked"):
        tree.dec_lock_ref(m.node)
    assert tree.evict(10) == 2
    tree.check_integrity()


def test_split_of_a_locked_node_keeps_locks_consistent():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    m = tree.match_prefix([1, 2, 3, 4])
    tree.inc_lock_ref(m.node)
    tree.match_prefix([1, 2])  # splits the locked node; the head must inherit the lock
    tree.check_integrity()
    assert tree.protected_size() == 4
    tree.dec_lock_ref(m.node)
    assert tree.protected_size() == 0 and tree.evictable_size() == 4
    tree.check_integrity()


def test_evict_is_lru_over_leaves():
    pool, tree = make()
    for first in (1, 2, 3):
        put(pool, tree, [first, 0])
    tree.match_prefix([1, 0])  # 1 is now the most recently used; 2 the least
    assert tree.evict(1) == 2
    assert tree.match_prefix([2, 0]).length == 0
    assert tree.match_prefix([3, 0]).length == 2  # touches 3: now 1 is the oldest
    assert tree.evict(2) == 2
    assert tree.match_prefix([1, 0]).length == 0
    assert tree.match_prefix([3, 0]).length == 2
    tree.check_integrity()
    assert_no_leak(pool, tree)


def test_evict_repushes_parent_that_becomes_a_leaf():
    pool, tree = make()
    put(pool, tree, [1, 2, 3])
    put(pool, tree, [1, 2, 4, 4])
    put(pool, tree, [7])
    tree.match_prefix([7])  # newest: the (1, 2) subtree must go first, parent included
    assert tree.evict(5) == 5  # leaf (3), leaf (4, 4), then parent (1, 2)
    assert tree.total_size() == 1 and tree.match_prefix([7]).length == 1
    tree.check_integrity()
    assert_no_leak(pool, tree)


def test_reset_frees_everything_and_refuses_when_locked():
    pool, tree = make()
    put(pool, tree, [1, 2, 3])
    put(pool, tree, [1, 3])
    m = tree.match_prefix([1, 3])
    tree.inc_lock_ref(m.node)
    with pytest.raises(RuntimeError, match="locked"):
        tree.reset()
    tree.dec_lock_ref(m.node)
    tree.reset()
    assert pool.num_free == pool.capacity
    assert tree.total_size() == 0 and tree.all_slots().numel() == 0
    assert tree.match_prefix([1, 2, 3]).length == 0
    tree.check_integrity()


def test_disabled_mode():
    pool, tree = make(disabled=True)
    slots = pool.alloc(3)
    assert tree.insert([1, 2, 3], slots) == 3
    pool.free(slots)
    m = tree.match_prefix([1, 2, 3])
    assert m.length == 0 and m.node is tree.root
    tree.inc_lock_ref(m.node)
    tree.dec_lock_ref(m.node)
    assert tree.evict(10) == 0
    assert tree.total_size() == tree.evictable_size() == tree.protected_size() == 0
    tree.reset()
    tree.check_integrity()
    assert pool.num_free == pool.capacity


def test_check_integrity_catches_corruption():
    pool, tree = make()
    put(pool, tree, [1, 2, 3])
    put(pool, tree, [1, 2, 4])
    tree.check_integrity()
    tree._evictable_size += 1
    with pytest.raises(AssertionError, match="evictable"):
        tree.check_integrity()
    tree._evictable_size -= 1
    mid = tree.root.children[1]
    mid.children[4].value = mid.children[3].value.clone()
    with pytest.raises(AssertionError, match="twice"):
        tree.check_integrity()


# ------------------------------------------------------------------------ stateful test

CAPACITY = 16
TOKENS = st.lists(st.integers(0, 3), min_size=0, max_size=10)


@dataclass
class InFlight:
    """A request between match and insert: it locks ``node`` and holds ``fresh`` slots."""

    tokens: tuple[int, ...]
    node: TreeNode
    cached: torch.Tensor
    fresh: torch.Tensor


class RadixMachine(RuleBasedStateMachine):
    """RadixCache vs a model: every cached prefix -> the slot of its last token."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = KVPool(CAPACITY, num_layers=1, num_kv_heads=1, head_dim=1, debug=True)
        self.tree = RadixCache(self.pool)
        self.model: dict[tuple[int, ...], int] = {}
        self.requests: list[InFlight] = []
        self.locks: list[tuple[TreeNode, tuple[int, ...]]] = []

    # -- model helpers
    def expected(self, tokens: tuple[int, ...]) -> tuple[int, list[int]]:
        n = 0
        while n < len(tokens) and tokens[: n + 1] in self.model:
            n += 1
        return n, [self.model[tokens[: i + 1]] for i in range(n)]

    def draw_tokens(self, data: st.DataObject) -> tuple[int, ...]:
        """Random tokens, often extending a cached prefix so that matches end inside edges."""
        tail = data.draw(TOKENS)
        if self.model and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(sorted(self.model)))
            return base + tuple(tail[: data.draw(st.integers(0, 4))])
        return tuple(tail)

    def checked_match(self, tokens: tuple[int, ...]) -> MatchResult:
        m = self.tree.match_prefix(tokens)
        n, slots = self.expected(tokens)
        assert m.length == n, f"match length {m.length}, model says {n}"
        assert m.slots.tolist() == slots
        assert path_of(m.node) == tokens[:n]
        return m

    def checked_insert(self, tokens: tuple[int, ...], slots: torch.Tensor) -> int:
        n, _ = self.expected(tokens)
        got = self.tree.insert(tokens, slots)
        assert got == n, f"insert returned {got}, model says {n} tokens were cached"
        for i in range(n, len(tokens)):
            self.model[tokens[: i + 1]] = int(slots[i])
        return got

    def evict(self, num_tokens: int) -> int:
        evictable = self.tree.evictable_size()
        freed = self.tree.evict(num_tokens)
        kept = set(self.tree.all_slots().tolist())
        gone = [p for p, s in self.model.items() if s not in kept]
        assert len(gone) == freed <= evictable
        for p in gone:
            del self.model[p]
        if freed < num_tokens:
            assert self.tree.evictable_size() == 0
        return freed

    def alloc(self, n: int) -> torch.Tensor | None:
        if self.pool.num_free < n:
            self.evict(n - self.pool.num_free)
        return self.pool.alloc(n)

    # -- rules
    @rule(data=st.data())
    def insert_fresh(self, data: st.DataObject) -> None:
        key = self.draw_tokens(data)
        slots = self.alloc(len(key))
        if slots is None:
            return
        cached = self.checked_insert(key, slots)
        self.pool.free(slots[:cached])

    @rule(data=st.data())
    def start_request(self, data: st.DataObject) -> None:
        key = self.draw_tokens(data)
        m = self.checked_match(key)
        self.tree.inc_lock_ref(m.node)
        fresh = self.alloc(len(key) - m.length)
        if fresh is None:
            self.tree.dec_lock_ref(m.node)
            return
        self.requests.append(InFlight(key, m.node, m.slots, fresh))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        req = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        # The locked prefix must have survived every eviction since the match.
        assert self.expected(req.tokens)[1][: req.cached.numel()] == req.cached.tolist()
        full = torch.cat((req.cached, req.fresh))
        cached = self.checked_insert(req.tokens, full)
        assert cached >= req.cached.numel()
        self.pool.free(full[req.cached.numel() : cached])
        self.tree.dec_lock_ref(req.node)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self.checked_match(self.draw_tokens(data))

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        key = self.draw_tokens(data)
        m = self.checked_match(key)
        self.tree.inc_lock_ref(m.node)
        self.locks.append((m.node, key[: m.length]))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.tree.dec_lock_ref(node)

    @rule(num_tokens=st.integers(0, 6))
    def evict_tokens(self, num_tokens: int) -> None:
        self.evict(num_tokens)

    @precondition(lambda self: not self.requests and not self.locks)
    @rule()
    def reset(self) -> None:
        self.tree.reset()
        self.model.clear()
        assert self.pool.num_free == self.pool.capacity

    # -- invariants
    @invariant()
    def integrity_and_no_leak(self) -> None:
        self.tree.check_integrity()
        held = sum(r.fresh.numel() for r in self.requests)
        assert_no_leak(self.pool, self.tree, held)

    @invariant()
    def sizes_match_model(self) -> None:
        assert self.tree.total_size() == len(self.model)
        assert all(len(p) == 1 or p[:-1] in self.model for p in self.model), "model not prefix-closed"
        locked_paths = [r.tokens[: r.cached.numel()] for r in self.requests]
        locked_paths += [path for _, path in self.locks]
        protected = {p[:i] for p in locked_paths for i in range(1, len(p) + 1)}
        assert protected <= self.model.keys(), "a locked prefix was evicted"
        assert self.tree.protected_size() == len(protected)

    def teardown(self) -> None:
        while self.requests:
            req = self.requests.pop()
            self.pool.free(req.fresh)
            self.tree.dec_lock_ref(req.node)
        while self.locks:
            self.tree.dec_lock_ref(self.locks.pop()[0])
        self.tree.check_integrity()
        self.tree.reset()
        assert self.pool.num_free == self.pool.capacity


RadixMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestRadixMachine = RadixMachine.TestCase


# ----------------------------------------------------------------------------- namespaces
def put_in(pool: KVPool, tree: RadixCache, tokens: list[int], namespace: str | None) -> None:
    slots = pool.alloc(len(tokens))
    assert slots is not None
    pool.free(slots[: tree.insert(tokens, slots, namespace)])


def test_namespaces_never_share_prefixes():
    pool, tree = make()
    put_in(pool, tree, [1, 2, 3, 4], None)
    put_in(pool, tree, [1, 2, 3, 9], "tenant-a")
    assert tree.match_prefix([1, 2, 3, 4]).length == 4
    assert tree.match_prefix([1, 2, 3, 4], "tenant-a").length == 3  # its own [1, 2, 3], not the default's
    assert tree.match_prefix([1, 2, 3, 9], "tenant-b").length == 0
    assert tree.match_prefix([1, 2, 3, 9]).length == 3
    again = pool.alloc(4)
    assert tree.insert([1, 2, 3, 9], again, "tenant-a") == 4  # cached there already
    pool.free(again)
    assert sorted(map(str, tree.namespaces())) == ["None", "tenant-a"]
    tree.check_integrity()


def test_namespaced_nodes_lock_and_evict_and_their_root_goes_when_empty():
    pool, tree = make()
    put_in(pool, tree, [5, 6, 7], "t")
    match = tree.match_prefix([5, 6, 7], "t")
    tree.inc_lock_ref(match.node)
    assert tree.evict(pool.capacity) == 0 and tree.protected_size() == 3
    tree.dec_lock_ref(match.node)
    assert tree.evict(pool.capacity) == 3
    assert tree.namespaces() == [None] and tree.match_prefix([5, 6, 7], "t").length == 0
    tree.check_integrity()
    assert_no_leak(pool, tree)
    put_in(pool, tree, [5, 6], "t")
    tree.reset()
    assert tree.namespaces() == [None]
    assert_no_leak(pool, tree)
