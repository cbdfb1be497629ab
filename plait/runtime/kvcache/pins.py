"""ProgramPins: keep a program run's cached prefixes resident until the run ends.

Program-aware caching. Every request of one program run carries the run's id; when such a request
finishes, the radix-tree path of what it cached (prompt + output) is locked on behalf of the program,
exactly as a running request locks its prefix, so LRU eviction under memory pressure cannot take it
away between the program's calls. ``close`` (the run ended) unlocks everything the program holds.

Pins are bounded and never deadlock the engine:
- a program protects at most ``max_tokens_per_program`` distinct tokens: a longer path is pinned up
  to that length, and older paths of the program are unpinned first when a new one exceeds it;
- when the scheduler cannot admit or allocate because memory is pinned, it calls ``yield_lru``,
  which unpins every path of the least recently used program (counted in ``stats()["pin_yields"]``);
  the program stays open and its later calls pin again.

A program is open from ``open(pid)`` (explicit ``Engine.begin_program`` or implicit when the engine
receives a request with that id) until ``close(pid)``; a request finishing after its program was
closed pins nothing. Every method runs on the engine thread (the scheduler's thread).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from plait.runtime.kvcache.radix import RadixCache, TreeNode

# Programs left open forever (callers that never end them) must not grow without bound: opening one
# more than this closes the least recently used.
MAX_OPEN_PROGRAMS = 4096


@dataclass
class _Program:
    paths: list[TreeNode] = field(default_factory=list)  # locked nodes, least recently pinned first
    tokens: int = 0  # distinct tokens protected by ``paths``


def _in_tree(node: TreeNode) -> bool:
    """True while ``node`` hangs from a root (a removed node's parent link is cut)."""
    while node.parent is not None:
        node = node.parent
    return node.key == () and node.lock_ref > 0


def _is_ancestor_or_self(upper: TreeNode, node: TreeNode) -> bool:
    while node is not None:
        if node is upper:
            return True
        node = node.parent
    return False


def _path_nodes(paths: Iterable[TreeNode]) -> set[TreeNode]:
    """Every node on the way from each of ``paths`` up to (not including) its namespace's root."""
    nodes: set[TreeNode] = set()
    for node in paths:
        while not node.is_root and node not in nodes:
            nodes.add(node)
            node = node.parent
    return nodes


class ProgramPins:
    """Program id -> the radix nodes it keeps locked, in least-recently-used order of programs.

    ``max_tokens_per_program == 0`` turns pinning off (programs are tracked, nothing is locked).
    """

    def __init__(self, tree: RadixCache, max_tokens_per_program: int) -> None:
        if max_tokens_per_program < 0:
            raise ValueError(f"max_tokens_per_program must be >= 0, got {max_tokens_per_program}")
        self.tree = tree
        self.max_tokens_per_program = max_tokens_per_program
        self._programs: OrderedDict[str, _Program] = OrderedDict()
        self._pinned_tokens = 0  # plain ints, so that stats() may read them from any thread
        self._pinned_programs = 0
        self.num_yields = 0  # programs unpinned under memory pressure
        self.num_trims = 0  # paths unpinned because their program went over its budget

    @property
    def enabled(self) -> bool:
        return self.max_tokens_per_program > 0 and not self.tree.disabled

    # ------------------------------------------------------------------ program lifetime
    def open(self, pid: str) -> None:
        """Mark ``pid`` open (idempotent) and most recently used."""
        if pid in self._programs:
            self._programs.move_to_end(pid)
            return
        self._programs[pid] = _Program()
        while len(self._programs) > MAX_OPEN_PROGRAMS:
            self.close(next(iter(self._programs)))

    def close(self, pid: str) -> None:
        """The run ended: unlock all its paths. Unknown or already closed ids are ignored."""
        prog = self._programs.pop(pid, None)
        if prog is not None and prog.paths:
            self._unpin_all(prog)
            self._recount_total()

    def is_open(self, pid: str) -> bool:
        return pid in self._programs

    # ------------------------------------------------------------------ pinning
    def pin(self, pid: str, token_ids: Sequence[int], namespace: str | None = None) -> None:
        """Lock the cached path of ``token_ids`` (already inserted in the tree, in cache ``namespace``)
        for open program ``pid``."""
        prog = self._programs.get(pid)
        if prog is None or not self.enabled or not token_ids:
            return
        self._programs.move_to_end(pid)
        node = self.tree.match_prefix(token_ids[: self.max_tokens_per_program], namespace).node
        if node.is_root:
            return
        for held in prog.paths:
            if _is_ancestor_or_self(node, held):  # already protected by a longer pinned path
                prog.paths.remove(held)
                prog.paths.append(held)
                return
        self.tree.inc_lock_ref(node)
        for held in [p for p in prog.paths if _is_ancestor_or_self(p, node)]:
            prog.paths.remove(held)  # the new, longer path protects it
            self.tree.dec_lock_ref(held)
        prog.paths.append(node)
        prog.tokens = self._count(prog.paths)
        while prog.tokens > self.max_tokens_per_program and len(prog.paths) > 1:
            self.tree.dec_lock_ref(prog.paths.pop(0))
            self.num_trims += 1
            prog.tokens = self._count(prog.paths)
        self._recount_total()

    def yield_lru(self) -> bool:
        """Unpin every path of the least recently used program holding pins; False if none holds any."""
        for prog in self._programs.values():
            if prog.paths:
                self._unpin_all(prog)
                self.num_yields += 1
                self._recount_total()
                return True
        return False

    def release_all(self) -> None:
        """Unpin every program's paths (before a cache flush, at shutdown); programs stay open."""
        for prog in self._programs.values():
            self._unpin_all(prog)
        self._pinned_tokens = self._pinned_programs = 0

    # ------------------------------------------------------------------ accounting
    def pinned_tokens(self, pid: str | None = None) -> int:
        """Distinct tokens pinned by ``pid`` (or by all programs together)."""
        if pid is None:
            return self._pinned_tokens
        prog = self._programs.get(pid)
        return prog.tokens if prog is not None else 0

    def stats(self) -> dict[str, int]:
        """Counters for ``Engine.stats()`` (safe to call from any thread)."""
        return {
            "open_programs": len(self._programs),
            "pinned_programs": self._pinned_programs,
            "pinned_tokens": self._pinned_tokens,
            "pin_yields": self.num_yields,
            "pin_trims": self.num_trims,
        }

    def check_integrity(self) -> None:
        """Raise AssertionError if a pinned node left the tree or a counter is wrong."""
        for pid, prog in self._programs.items():
            for node in prog.paths:
                assert node.lock_ref > 0, f"program {pid!r} pins an unlocked node {node!r}"
                assert _in_tree(node), f"program {pid!r} pins a node outside the tree"
            assert prog.tokens == self._count(prog.paths), f"program {pid!r}: token count out of date"
        everything = [n for p in self._programs.values() for n in p.paths]
        assert self._pinned_tokens == self._count(everything), "pinned_tokens out of date"
        assert self._pinned_programs == sum(1 for p in self._programs.values() if p.paths), "pinned_programs out of date"

    # ------------------------------------------------------------------ internals
    def _unpin_all(self, prog: _Program) -> None:
        for node in prog.paths:
            self.tree.dec_lock_ref(node)
        prog.paths.clear()
        prog.tokens = 0

    def _count(self, paths: Iterable[TreeNode]) -> int:
        return sum(len(n.key) for n in _path_nodes(paths))

    def _recount_total(self) -> None:
        """Distinct pinned tokens over all programs; visits each pinned node once."""
        self._pinned_tokens = self._count(n for p in self._programs.values() for n in p.paths)
        self._pinned_programs = sum(1 for p in self._programs.values() if p.paths)
