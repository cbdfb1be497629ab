"""fork/join: joined values are the branches' current ones, per-branch seeds, every branch's calls recorded."""

from __future__ import annotations

import re
from collections import Counter

import pytest

import plait as pl
from plait.lang import MockBackend
from plait.lang.interpreter import branch_seed


def echo_round(call) -> str:
    """The output names the last round and branch in the prompt, so each gen's value is traceable."""
    round_, branch = re.findall(r"round (\d+) branch (\d+)", call.prompt)[-1]
    return f" {round_}.{branch}"


def test_fork_in_a_loop_joins_each_rounds_values():
    @pl.function
    def rounds(s):
        seen = []
        for r in range(3):
            forks = s.fork(2)
            forks += lambda i: f"round {r} branch {i}:" + pl.gen("x", max_tokens=4)
            forks.join()
            seen.append(list(s["x"]))
        return seen

    state = rounds.run(backend=MockBackend({"round": echo_round}))
    assert state.ret_value == [[" 0.0", " 0.1"], [" 1.0", " 1.1"], [" 2.0", " 2.1"]]
    assert state["x"] == [" 2.0", " 2.1"]
    assert [m["prompt_tokens"] > 0 for m in state.get_meta_info("x")] == [True, True]


def test_join_replaces_a_parent_variable_the_branches_set_and_keeps_the_others():
    @pl.function
    def prog(s):
        s += "round 9 branch 9:" + pl.gen("x", max_tokens=4)
        s["kept"] = "parent"
        forks = s.fork(3)
        forks[0] += "round 1 branch 0:" + pl.gen("x", max_tokens=4)
        forks[2]["x"] = "set by hand"
        forks.join()

    state = prog.run(backend=MockBackend({"round": echo_round}))
    assert state["x"] == [" 1.0", "set by hand"]  # branch 1 did not set x: no entry for it
    assert state["kept"] == "parent"  # no branch set it: the parent's value stays


def seed_output(call) -> str:
    return f" seed={call.params.seed}"


def test_branches_get_distinct_seeds_derived_from_the_run_seed():
    @pl.function
    def prog(s):
        s += "Q:" + pl.gen("root", max_tokens=4)
        forks = s.fork(3)
        forks += "A:" + pl.gen("a", max_tokens=4)
        forks[1] += "B:" + pl.gen("pinned", max_tokens=4, seed=5)  # a gen's own seed is kept
        inner = forks[2].fork(2)
        inner += "C:" + pl.gen("c", max_tokens=4)
        inner.join()
        forks.join()

    backend = MockBackend(default=seed_output)
    state = prog.run(backend=backend, seed=7)
    assert state["root"] == " seed=7"  # outside any fork the run's seed is used as given
    seeds = [branch_seed(7, i) for i in range(3)]
    assert state["a"] == [f" seed={x}" for x in seeds]
    assert len(set(seeds)) == 3 and 7 not in seeds
    assert state["pinned"] == [" seed=5"]
    assert state["c"] == [[f" seed={branch_seed(seeds[2], j)}" for j in range(2)]]
    assert prog.run(backend=backend, seed=7)["a"] == state["a"]  # deterministic
    assert prog.run(backend=backend, seed=8)["a"] != state["a"]
    assert prog.run(backend=backend)["a"] == [" seed=None"] * 3  # no run seed: branches have none


def test_branch_seed_is_stable():
    # the documented derivation: blake2b("{seed}/{index}"), 8 bytes little-endian, low 31 bits
    import hashlib

    expected = int.from_bytes(hashlib.blake2b(b"42/3", digest_size=8).digest(), "little") & 0x7FFFFFFF
    assert branch_seed(42, 3) == expected
    assert 0 <= branch_seed(2**70, 0) < 2**31


def test_calls_of_forks_never_joined_are_in_the_root_record():
    @pl.function
    def tree(s):
        s += "Q:" + pl.gen("q", max_tokens=2)
        forks = s.fork(2)
        forks += "think:" + pl.gen("t", max_tokens=3)
        deeper = forks[1].fork(2)  # never joined, inside a branch that is never joined
        deeper += "deeper:" + pl.gen("d", max_tokens=1)
        return [f["t"] for f in forks]  # tree-of-thought style: read the branches, no join

    state = tree.run(backend=MockBackend(default=" a b c"))
    calls = state.calls
    assert [c.name for c in calls].count("q") == 1 and calls[0].branch is None
    assert Counter((c.name, c.branch) for c in calls[1:]) == Counter({("t", 0): 1, ("t", 1): 1, ("d", 1): 2})
    assert all(c.prompt_tokens > 0 and c.completion_tokens > 0 for c in calls)


@pytest.mark.parametrize("join_outer", [True, False])
def test_each_branch_call_is_recorded_once(join_outer):
    @pl.function
    def prog(s):
        forks = s.fork(2)
        forks += "x:" + pl.gen("x", max_tokens=1)
        inner = forks[0].fork(3)  # never joined; its branch is (or is not) joined
        inner += "y:" + pl.gen("y", max_tokens=1)
        inner[0].sync()
        if join_outer:
            forks.join()

    backend = MockBackend(default=" z")
    state = prog.run(backend=backend)
    assert len(state.calls) == len(backend.calls_of("generate")) == 5
    assert Counter((c.name, c.branch) for c in state.calls) == Counter({("x", 0): 1, ("x", 1): 1, ("y", 0): 3})
