"""Radix prefix cache: token-id prefixes -> KV slot indices (page size 1).

A radix tree over token ids. Each edge (``TreeNode.key``) is a run of token ids and the node's
``value`` holds the KV slot of each of those tokens. The tree never owns KV memory: slots enter it
through ``insert`` (ownership passes from the caller) and leave it through ``evict`` / ``reset``,
which hand them back with ``pool.free``.

Contract with the engine:
- ``match_prefix(ids)`` returns the cached slots of the longest cached prefix and the node where it
  ends (splitting an edge so the node ends exactly there). The caller locks that node
  (``inc_lock_ref``) for as long as it uses the slots, and unlocks it (``dec_lock_ref``) after.
- ``insert(ids, slots)`` returns how many leading tokens were already cached. The tree keeps its own
  slots for that range; the caller frees its duplicates ``slots[own_cached_len:returned]`` and the
  tree takes ownership of ``slots[returned:]``.
- Locked nodes (and so all their ancestors) are never evicted; ``evict`` frees least-recently-used
  unlocked leaves first.

Namespaces: ``match_prefix`` and ``insert`` take a ``namespace`` (None: the default). Each namespace has
its own root, so a prefix cached in one is never matched from another: tenants that cannot see each
other's prompts cannot probe them through cache hits either. Eviction is one LRU over all namespaces;
a namespace's root is dropped when its last node goes. A root is any node without a parent
(``TreeNode.is_root``); locking walks up to it and never past it.

Hybrid pools (``KVPool.hybrid``: sliding-window layers keep their KV in fewer, *sliding* slots): each
node also records, per token, whether that token still has its sliding slot (``TreeNode.sliding``, a
host bool tensor). A cached prefix is usable up to position ``p`` only if the ``W - 1`` tokens before
``p`` still have theirs (a sliding layer's query at ``p`` reads the keys ``p - W + 1 .. p``), so
``match_prefix`` stops at the last such ``p``. Sliding slots leave the tree with their nodes
(``evict``, ``reset``) or alone, least recently used first (``evict_sliding``: first everything but the
last ``W`` tokens of each node, which keep a match ending at the node usable, then the rest), never from
nodes a caller protects. ``cache_tokens`` hands a request's KV to the tree: where the tree already holds
a token but no longer its sliding slot, the tree adopts the request's.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from plait.runtime.kvcache.pool import KVPool


class TreeNode:
    """One edge of the radix tree and the node it leads to.

    ``children`` is keyed by the first token id of each child's key. ``value[i]`` is the KV slot of
    token ``key[i]``. ``lock_ref`` counts the users holding this node or a descendant of it.
    """

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access", "sliding", "sliding_held")

    def __init__(
        self,
        key: tuple[int, ...],
        value: torch.Tensor,
        parent: TreeNode | None,
        last_access: float = 0.0,
        sliding: torch.Tensor | None = None,
    ) -> None:
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access = last_access
        # hybrid pools: per token, whether it still has its sliding slot (host bool), and how many do
        self.sliding = sliding
        self.sliding_held = 0 if sliding is None else int(sliding.sum())

    @property
    def is_root(self) -> bool:
        """True for the root of a namespace (a node of the tree without a parent)."""
        return self.parent is None

    def __repr__(self) -> str:
        return f"TreeNode(key={self.key}, lock_ref={self.lock_ref}, children={len(self.children)})"


@dataclass
class MatchResult:
    """Result of ``RadixCache.match_prefix``.

    slots: int64 slot indices of the matched prefix, one per token.
    node: the deepest matched node (the root if nothing matched); lock it while using ``slots``.
    """

    slots: torch.Tensor
    node: TreeNode

    @property
    def length(self) -> int:
        """Number of matched tokens."""
        return self.slots.numel()


def _as_key(token_ids: Sequence[int]) -> tuple[int, ...]:
    if isinstance(token_ids, torch.Tensor):
        return tuple(token_ids.reshape(-1).tolist())
    if hasattr(token_ids, "tolist"):  # numpy arrays
        return tuple(token_ids.tolist())
    return tuple(token_ids)


def _true_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D host bool tensor."""
    if mask.numel() == 0:
        return []
    edges = np.diff(np.concatenate(([0], mask.numpy().astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), ends.tolist()))


def usable_prefix(held: np.ndarray, window: int) -> int:
    """The largest ``p <= len(held)`` whose ``window - 1`` preceding tokens all have their sliding slot
    (``held``: one bool per token): a sliding layer's query at ``p`` reads the keys ``p - W + 1 .. p``."""
    p = len(held)
    while p > 0:
        lo = max(0, p - window + 1)
        missing = np.flatnonzero(~held[lo:p])
        if missing.size == 0:
            return p
        before = np.flatnonzero(held[: lo + int(missing[-1])])  # start again after the last token that has one
        p = int(before[-1]) + 1 if before.size else 0
    return 0


def _common_prefix_len(key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    """Length of the common prefix of ``key`` and ``tokens[start:]``."""
    n = len(key)
    if tokens[start : start + n] == key:
        return n
    limit = min(n, len(tokens) - start)
    i = 0
    while i < limit and key[i] == tokens[start + i]:
        i += 1
    return i


class RadixCache:
    """Prefix index over token ids whose nodes hold KV slot indices of ``pool``.

    With ``disabled=True`` nothing is ever cached: matches are empty, ``insert`` returns the full
    length (the caller frees all its slots) and every size is 0.
    """

    def __init__(self, pool: KVPool, disabled: bool = False) -> None:
        self.pool = pool
        self.disabled = disabled
        self.hybrid = pool.hybrid
        self.window = pool.sliding_window
        self._clock = 0
        self._init_tree()

    def _init_tree(self) -> None:
        """Forget every node WITHOUT freeing slots (use ``reset`` to give them back to the pool)."""
        self.root = self._new_root()  # the default namespace's
        self._roots: dict[str, TreeNode] = {}  # the other namespaces' roots
        self._namespace_of: dict[TreeNode, str] = {}  # and back
        self._evictable_size = 0
        self._protected_size = 0
        self._sliding_size = 0  # hybrid: tokens of the tree that still have their sliding slot
        self._leaves: set[TreeNode] = set()  # every non-root node without children

    def _held(self, n: int) -> torch.Tensor | None:
        """A node's sliding flags for ``n`` tokens that all have their sliding slot (None for a pool
        without sliding layers)."""
        return torch.ones(n, dtype=torch.bool) if self.hybrid else None

    def _new_root(self) -> TreeNode:
        root = TreeNode((), self._empty_slots(), None, self._tick(), self._held(0))
        root.lock_ref = 1  # a root is never evictable
        return root

    def root_of(self, namespace: str | None, create: bool = False) -> TreeNode | None:
        """The root of ``namespace`` (None: the default); None if it has nothing cached and not ``create``."""
        if namespace is None:
            return self.root
        root = self._roots.get(namespace)
        if root is None and create:
            root = self._roots[namespace] = self._new_root()
            self._namespace_of[root] = namespace
        return root

    def namespaces(self) -> list[str | None]:
        """The default namespace (None) and every other namespace holding cached tokens."""
        return [None, *self._roots]

    def _empty_slots(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.pool.device)

    def _tick(self) -> float:
        self._clock += 1
        return float(self._clock)

    # ------------------------------------------------------------------ sizes

    def total_size(self) -> int:
        """Tokens (= slots) held by the tree."""
        return self._evictable_size + self._protected_size

    def evictable_size(self) -> int:
        """Tokens in unlocked nodes."""
        return self._evictable_size

    def protected_size(self) -> int:
        """Tokens in locked nodes."""
        return self._protected_size

    def sliding_size(self) -> int:
        """Hybrid pools: tokens of the tree that still hold a sliding slot (0 otherwise)."""
        return self._sliding_size

    # ---------------------------------------------------------------- lookup

    def match_prefix(self, token_ids: Sequence[int], namespace: str | None = None) -> MatchResult:
        """Longest prefix of ``token_ids`` cached in ``namespace``: its slots and the node where it ends.

        If the match ends inside an edge the node is split so the returned node ends exactly at the
        match. Refreshes ``last_access`` along the path. Nothing matched: the node is a root.
        """
        node = None if self.disabled else self.root_of(namespace)
        if node is None:
            return MatchResult(self._empty_slots(), self.root)
        tokens = _as_key(token_ids)
        node.last_access = self._tick()
        values: list[torch.Tensor] = []
        held: list[torch.Tensor] = []
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            matched = _common_prefix_len(child.key, tokens, i)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = self._tick()
            values.append(child.value)
            if self.hybrid and child.sliding_held < len(child.key):
                held.append(child.sliding)
            elif self.hybrid:
                held.append(None)
            node = child
            i += matched  # after a split no child of ``node`` starts with tokens[i]: loop ends
        if held and any(h is not None for h in held):  # some token lost its sliding slot: is the end usable?
            flags = np.concatenate([np.ones(v.numel(), dtype=bool) if h is None else h.numpy()
                                    for v, h in zip(values, held)])
            usable = usable_prefix(flags, self.window)
            if usable < i:
                return self.match_prefix(tokens[:usable], namespace)
        slots = torch.cat(values) if values else self._empty_slots()
        return MatchResult(slots, node)

    def insert(
        self, token_ids: Sequence[int], slots: torch.Tensor, namespace: str | None = None, *, sliding_from: int = 0,
    ) -> int:
        """Cache ``token_ids`` with their ``slots`` in ``namespace``; return how many leading tokens
        were cached there before.

        For that leading range the tree keeps its own slots (the caller frees its duplicates); the
        tree takes ownership of ``slots[returned:]``. Hybrid pools: of the tokens taken, those at
        positions ``>= sliding_from`` come with their sliding slot, the others without.
        """
        return self._insert(token_ids, slots, namespace, sliding_from)[0]

    def cache_tokens(
        self, token_ids: Sequence[int], slots: torch.Tensor, namespace: str | None, own_from: int, sliding_from: int,
    ) -> int:
        """Hand a request's KV to the tree: ``insert``, then free the request's duplicates of what the
        tree already held (``slots[own_from:returned]``; ``slots[:own_from]`` are the tree's own, the
        request's locked prefix). Hybrid pools: the request's tokens at positions ``>= sliding_from``
        have sliding slots; where the tree holds such a token without one, it adopts the request's
        (a prefix the request still reads through its window stays whole), and the rest are freed.
        Returns ``insert``'s count."""
        already, segments = self._insert(token_ids, slots, namespace, sliding_from)
        if already <= own_from:
            return already
        slots = slots.reshape(-1).to(device=self.pool.device, dtype=torch.int64)
        if not self.hybrid:
            self.pool.free(slots[own_from:already])
            return already
        frees = torch.zeros(already, dtype=torch.bool)  # caller positions whose sliding slot is freed
        frees[max(own_from, sliding_from):] = True
        mapping = self.pool.full_to_sliding
        for node, start in segments:  # the node's tokens are the caller's from position ``start`` on
            lo = max(start, own_from, sliding_from)
            if lo >= start + len(node.key) or node.sliding_held == len(node.key):
                continue
            for a, b in _true_runs(~node.sliding[lo - start :]):  # positions lo + a .. lo + b lost theirs
                tree_slots = node.value[lo - start + a : lo - start + b]
                own = slots[lo + a : lo + b]
                mapping[tree_slots] = mapping[own]  # the tree's token takes the request's sliding slot
                mapping[own] = 0
                node.sliding[lo - start + a : lo - start + b] = True
                node.sliding_held += b - a
                self._sliding_size += b - a
                frees[lo + a : lo + b] = False
        self.pool.free(slots[own_from:already], sliding=False)
        runs = _true_runs(frees[own_from:])
        if runs:
            self.pool.free_sliding(torch.cat([slots[own_from + a : own_from + b] for a, b in runs]))
        return already

    def _insert(
        self, token_ids: Sequence[int], slots: torch.Tensor, namespace: str | None, sliding_from: int,
    ) -> tuple[int, list[tuple[TreeNode, int]]]:
        """``insert``, also returning the cached nodes it walked, each with the position in ``token_ids``
        where it starts (each node ends within the tokens: the walk splits a node where they diverge)."""
        tokens = _as_key(token_ids)
        if slots.numel() != len(tokens):
            raise ValueError(f"insert got {len(tokens)} token ids but {slots.numel()} slots")
        if self.disabled or not tokens:
            return len(tokens), []
        slots = slots.reshape(-1).to(device=self.pool.device, dtype=torch.int64)
        node = self.root_of(namespace, create=True)
        node.last_access = self._tick()
        segments: list[tuple[TreeNode, int]] = []
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                held = None
                if self.hybrid:
                    held = torch.arange(i, len(tokens)) >= sliding_from
                self._add_leaf(node, tokens[i:], slots[i:].clone(), held)
                break
            matched = _common_prefix_len(child.key, tokens, i)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = self._tick()
            segments.append((child, i))
            node = child
            i += matched
        return i, segments

    # --------------------------------------------------------------- locking

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Lock ``node`` and its ancestors (root excluded) against eviction."""
        while not node.is_root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one ``inc_lock_ref(node)``. Raises RuntimeError if ``node`` is not locked."""
        if not node.is_root and node.lock_ref <= 0:
            raise RuntimeError(f"dec_lock_ref on an unlocked node {node!r}")
        while not node.is_root:
            if node.lock_ref == 1:
                self._evictable_size += len(node.key)
                self._protected_size -= len(node.key)
            node.lock_ref -= 1
            assert node.parent is not None
            node = node.parent

    # -------------------------------------------------------------- eviction

    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until ``num_tokens`` slots were freed.

        Stops early when nothing evictable remains. Returns the number of slots freed to the pool.
        """
        if self.disabled or num_tokens <= 0:
            return 0
        heap = [(n.last_access, id(n), n) for n in self._leaves if n.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            self._free_sliding_of(node)
            freed.append(node.value)
            num_freed += len(node.key)
            self._remove_leaf(node)
            if not parent.is_root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        if freed:
            self.pool.free(torch.cat(freed), sliding=False)
        return num_freed

    def evict_sliding(self, num_tokens: int, protected: Iterable[TreeNode] = ()) -> int:
        """Hybrid pools: free the sliding slots of least-recently-used tokens (their full slots stay
        cached) until ``num_tokens`` were freed: first every token but the last ``W`` of each node,
        then the rest; never in ``protected`` nodes (those running requests still read through their
        windows). Returns how many were freed."""
        if not self.hybrid or self.disabled or num_tokens <= 0:
            return 0
        keep = set(protected)
        nodes = sorted((n for n in self._nodes() if n.sliding_held and not n.is_root and n not in keep),
                       key=lambda n: n.last_access)
        num_freed = 0
        for tail in (self.window, 0):
            for node in nodes:
                if num_freed >= num_tokens:
                    return num_freed
                if tail and node.sliding_held <= tail:  # usually only its tail left (the check is cheap)
                    continue
                num_freed += self._free_sliding_of(node, max(len(node.key) - tail, 0))
        return num_freed

    def _free_sliding_of(self, node: TreeNode, end: int | None = None) -> int:
        """Free the sliding slots the first ``end`` tokens of ``node`` (None: all) still hold; returns how many."""
        if not self.hybrid or not node.sliding_held:
            return 0
        assert node.sliding is not None
        end = len(node.key) if end is None else end
        runs = _true_runs(node.sliding[:end])
        if not runs:
            return 0
        self.pool.free_sliding(torch.cat([node.value[a:b] for a, b in runs]))
        node.sliding[:end] = False
        count = sum(b - a for a, b in runs)
        node.sliding_held -= count
        self._sliding_size -= count
        return count

    def reset(self) -> None:
        """Drop every node and free every slot the tree holds. Raises RuntimeError if any is locked."""
        if self._protected_size > 0:
            raise RuntimeError(
                f"RadixCache.reset while {self._protected_size} cached tokens are locked by requests"
            )
        for node in self._nodes():
            self._free_sliding_of(node)
        self.pool.free(self.all_slots(), sliding=False)
        self._init_tree()

    def all_slots(self) -> torch.Tensor:
        """Every slot held by the tree (int64, order unspecified)."""
        values = [node.value for node in self._nodes() if node is not self.root]
        return torch.cat(values) if values else self._empty_slots()

    # ------------------------------------------------------------- internals

    def _nodes(self) -> list[TreeNode]:
        """All nodes of every namespace, each root before its descendants (iterative DFS)."""
        out: list[TreeNode] = []
        stack = [self.root, *self._roots.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _add_leaf(
        self, parent: TreeNode, key: tuple[int, ...], value: torch.Tensor, sliding: torch.Tensor | None = None,
    ) -> TreeNode:
        if self.hybrid and sliding is None:
            sliding = self._held(len(key))
        leaf = TreeNode(key, value, parent, self._tick(), sliding if self.hybrid else None)
        parent.children[key[0]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self._evictable_size += len(key)
        self._sliding_size += leaf.sliding_held
        return leaf

    def _remove_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None and not node.children and node.lock_ref == 0
        del parent.children[node.key[0]]
        self._leaves.discard(node)
        if not parent.is_root and not parent.children:
            self._leaves.add(parent)
        elif parent.is_root and not parent.children and parent is not self.root:
            del self._roots[self._namespace_of.pop(parent)]  # an emptied namespace goes
        self._evictable_size -= len(node.key)
        node.parent = None

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Split ``child``'s edge after ``at`` tokens; return the new upper node.

        ``child`` keeps the tail (so references held to it stay valid) and the new node takes the
        head, the parent link and the same lock count. Sizes do not change.
        """
        assert 0 < at < len(child.key)
        parent = child.parent
        assert parent is not None
        head = TreeNode(child.key[:at], child.value[:at], parent, child.last_access,
                        None if child.sliding is None else child.sliding[:at].clone())
        if child.sliding is not None:
            child.sliding = child.sliding[at:].clone()
            child.sliding_held -= head.sliding_held
        head.lock_ref = child.lock_ref
        head.children[child.key[at]] = child
        parent.children[child.key[0]] = head
        child.parent = head
        child.key = child.key[at:]
        child.value = child.value[at:]
        return head

    # ------------------------------------------------------------- checking

    def check_integrity(self) -> None:
        """Raise AssertionError if any structural invariant or size counter is wrong."""
        roots = [self.root, *self._roots.values()]
        for root in roots:
            assert root.parent is None and root.key == () and root.value.numel() == 0, "bad root"
        assert all(r.children for r in self._roots.values()), "an empty namespace root was kept"
        evictable = protected = 0
        leaves: set[TreeNode] = set()
        for node in self._nodes():
            for first, child in node.children.items():
                assert child.parent is node, f"child {child!r} has a wrong parent link"
                assert child.key and child.key[0] == first, f"child key {child.key} stored under {first}"
            if node.is_root:
                continue
            assert len(node.key) > 0, "non-root node with an empty key"
            assert len(node.key) == node.value.numel(), f"{node!r}: key/value lengths differ"
            assert node.lock_ref >= 0, f"{node!r}: negative lock_ref"
            parent = node.parent
            assert parent is not None
            if not parent.is_root:
                assert parent.lock_ref >= node.lock_ref, (
                    f"{node!r} lock_ref {node.lock_ref} > parent's {parent.lock_ref}"
                )
            if node.lock_ref > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            if not node.children:
                leaves.add(node)
        assert evictable == self._evictable_size, (
            f"evictable_size counter {self._evictable_size} != recount {evictable}"
        )
        assert protected == self._protected_size, (
            f"protected_size counter {self._protected_size} != recount {protected}"
        )
        assert leaves == self._leaves, "leaf set out of sync with the tree"
        if self.hybrid:
            self._check_sliding()
        slots = self.all_slots()
        assert torch.unique(slots).numel() == slots.numel(), "a slot appears twice in the tree"
        if slots.numel():
            assert int(slots.min()) >= 1 and int(slots.max()) <= self.pool.capacity, (
                "tree holds a slot outside the pool's usable range"
            )
            assert not bool(self.pool.is_free(slots).any()), "tree holds a slot that the pool lists as free"

    def _check_sliding(self) -> None:
        """Hybrid: flags match their counts, and a token has a sliding slot in the pool's map iff flagged."""
        mapping = self.pool.full_to_sliding
        assert mapping is not None
        total = 0
        held_slots = []
        for node in self._nodes():
            assert node.sliding is not None and node.sliding.numel() == len(node.key), f"{node!r}: sliding flags"
            assert node.sliding_held == int(node.sliding.sum()), f"{node!r}: sliding count"
            total += node.sliding_held
            if len(node.key):
                sliding = mapping[node.value].cpu()
                assert bool(((sliding != 0) == node.sliding).all()), f"{node!r}: flags disagree with the pool's map"
                held_slots.append(sliding[node.sliding])
        assert total == self._sliding_size, f"sliding_size counter {self._sliding_size} != recount {total}"
        held = torch.cat(held_slots) if held_slots else torch.empty(0, dtype=torch.int64)
        assert torch.unique(held).numel() == held.numel(), "a sliding slot appears twice in the tree"

    def pretty(self) -> str:
        """Multi-line rendering of the tree for debugging."""
        lines: list[str] = []
        stack = [(self.root, 0)] + [(root, 0) for root in self._roots.values()]
        while stack:
            node, depth = stack.pop()
            if node.is_root and node is not self.root:
                lines.append(f"namespace {self._namespace_of[node]!r}:")
            if not node.is_root:
                lines.append(f"{'  ' * depth}{list(node.key)} lock={node.lock_ref} slots={node.value.tolist()}")
            stack.extend((c, depth + 1) for c in node.children.values())
        return "\n".join(lines)
