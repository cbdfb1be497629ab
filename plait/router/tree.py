"""An approximate radix tree over request text: what one replica was sent recently.

The router keeps one tree per replica (as SGLang's router does) and asks each how much of a new
request's text it has seen. It is approximate on purpose: it records what the router *sent*, not what
the replica still holds in its KV cache, and it stores characters, not tokens. Its size (characters on
its edges) is bounded; past the bound, least recently used leaves are dropped.

Costs are bounded per call: ``match`` and ``insert`` walk at most ``len(text)`` characters (the caller
caps the text), eviction is O(1) per dropped leaf (leaves are kept in LRU order).
"""

from __future__ import annotations

from collections import OrderedDict


class _Node:
    __slots__ = ("edge", "children", "parent")

    def __init__(self, edge: str, parent: _Node | None):
        self.edge = edge
        self.children: dict[str, _Node] = {}
        self.parent = parent


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class ApproxRadixTree:
    """Strings inserted recently, as a radix tree bounded to ``max_chars`` characters.

    ``match(text)`` is the length of the longest prefix of ``text`` that some inserted string shares;
    ``insert(text)`` adds ``text`` and marks it most recently used; ``size`` counts stored characters.
    """

    def __init__(self, max_chars: int):
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.max_chars = max_chars
        self.root = _Node("", None)
        self.size = 0
        self._leaves: OrderedDict[int, _Node] = OrderedDict()  # id(node) -> leaf, least recently used first

    def match(self, text: str) -> int:
        """Characters of ``text``'s longest prefix that is also a prefix of a stored string."""
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                return i
            if text.startswith(child.edge, i):
                i += len(child.edge)
                node = child
                continue
            return i + _common_prefix_len(child.edge, text[i:i + len(child.edge)])
        return i

    def insert(self, text: str) -> None:
        """Store ``text`` (marked most recently used), then drop old leaves while over ``max_chars``."""
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node)
                node.children[text[i]] = leaf
                self._leaves.pop(id(node), None)  # node has a child now
                self._leaves[id(leaf)] = leaf
                self.size += len(leaf.edge)
                node = leaf
                break
            if text.startswith(child.edge, i):
                i += len(child.edge)
                node = child
                continue
            split = _common_prefix_len(child.edge, text[i:i + len(child.edge)])
            middle = _Node(child.edge[:split], node)  # the shared part becomes a node of its own
            node.children[text[i]] = middle
            child.edge, child.parent = child.edge[split:], middle
            middle.children[child.edge[0]] = child
            node, i = middle, i + split
        if node is not self.root and not node.children:
            self._leaves[id(node)] = node
            self._leaves.move_to_end(id(node))
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_chars and self._leaves:
            _, leaf = self._leaves.popitem(last=False)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.size -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                self._leaves[id(parent)] = parent  # the oldest now: its newest child was just dropped
                self._leaves.move_to_end(id(parent), last=False)

    def __len__(self) -> int:
        return self.size
