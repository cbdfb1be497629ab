"""Routing policies: which replica gets a request.

Every policy answers ``choose(text, loads) -> Choice``: ``text`` is the request's routing text (its
prompt, rendered messages or token ids as a string, already capped; "" when it has none) and ``loads``
maps each healthy replica's URL to the requests the router has in flight there. Program affinity
(``program_id``) is decided before the policy is asked (``app.RouterState``).

- ``cache_aware`` (SGLang's router): while the load is balanced, the replica whose tree matches the
  longest prefix of ``text`` if the match covers more than ``cache_threshold`` of it, else the replica
  with the smallest tree (the least recently filled cache); once the load is imbalanced (the busiest
  replica has more than ``balance_abs_threshold`` requests over the idlest *and* more than
  ``balance_rel_threshold`` times its load), the least loaded replica. The chosen replica's tree
  records ``text`` either way.
- ``round_robin``: each replica in turn. ``random``: uniformly at random.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from plait.router.tree import ApproxRadixTree

POLICIES = ("cache_aware", "round_robin", "random")


@dataclass(frozen=True)
class Choice:
    """A routing decision: the replica's URL and why (``cache_hit``, ``cache_miss``, ``balance``,
    ``round_robin``, ``random``; the router adds ``program`` for program affinity)."""

    replica: str
    reason: str


class CacheAwarePolicy:
    """Prefix affinity through one ``ApproxRadixTree`` per replica, with a load-balance fallback."""

    name = "cache_aware"

    def __init__(self, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.0001, max_tree_size: int = 2**22):
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be within [0, 1], got {cache_threshold}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_size = max_tree_size
        self.trees: dict[str, ApproxRadixTree] = {}

    def tree(self, replica: str) -> ApproxRadixTree:
        if replica not in self.trees:
            self.trees[replica] = ApproxRadixTree(self.max_tree_size)
        return self.trees[replica]

    def imbalanced(self, loads: dict[str, int]) -> bool:
        busiest, idlest = max(loads.values()), min(loads.values())
        return busiest - idlest > self.balance_abs_threshold and busiest > idlest * self.balance_rel_threshold

    def choose(self, text: str, loads: dict[str, int]) -> Choice:
        order = list(loads)  # the replicas' order breaks ties
        if self.imbalanced(loads):
            choice = Choice(min(order, key=lambda url: loads[url]), "balance")
        else:
            matches = {url: self.tree(url).match(text) for url in order} if text else {}
            best = max(order, key=lambda url: matches.get(url, 0))
            if text and matches[best] > self.cache_threshold * len(text):
                choice = Choice(best, "cache_hit")
            else:
                choice = Choice(min(order, key=lambda url: (self.tree(url).size, loads[url])), "cache_miss")
        if text:
            self.tree(choice.replica).insert(text)
        return choice

    def forget(self, replica: str) -> None:
        """Drop what was recorded for ``replica`` (it died: its cache is gone)."""
        self.trees.pop(replica, None)

    def sizes(self) -> dict[str, int]:
        return {url: tree.size for url, tree in self.trees.items()}


class RoundRobinPolicy:
    """Each healthy replica in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, text: str, loads: dict[str, int]) -> Choice:
        order = list(loads)
        return Choice(order[next(self._counter) % len(order)], "round_robin")

    def forget(self, replica: str) -> None:
        pass

    def sizes(self) -> dict[str, int]:
        return {}


class RandomPolicy:
    """A healthy replica chosen uniformly at random."""

    name = "random"

    def __init__(self, seed: int | None = None):
        self._random = random.Random(seed)

    def choose(self, text: str, loads: dict[str, int]) -> Choice:
        return Choice(self._random.choice(list(loads)), "random")

    def forget(self, replica: str) -> None:
        pass

    def sizes(self) -> dict[str, int]:
        return {}


def make_policy(name: str, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                balance_rel_threshold: float = 1.0001, max_tree_size: int = 2**22):
    """The policy called ``name`` (one of ``POLICIES``)."""
    if name == "cache_aware":
        return CacheAwarePolicy(cache_threshold, balance_abs_threshold, balance_rel_threshold, max_tree_size)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy()
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
