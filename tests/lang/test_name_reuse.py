"""A gen/select/var_scope name used twice in one run is an error (SGLang overwrites silently), unless the
program opts in with ``@pl.function(name_reuse="overwrite")``. Forks have their own names."""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang import VariableReuseError


def test_a_name_reused_in_a_loop_is_an_error(mock):
    @pl.function
    def loop(s):
        for _ in range(3):
            s += "Step:" + pl.gen("step", max_tokens=1)

    with pytest.raises(VariableReuseError, match=r"variable 'step' is already set .* f'step_\{i\}' .*"
                                                  r"name_reuse='overwrite'") as info:
        loop.run(backend=mock)
    assert isinstance(info.value, ValueError)
    assert len(mock.calls_of("generate")) == 1  # raised where the second gen was written, before it ran


@pytest.mark.parametrize("second", [
    lambda: pl.select("x", choices=["a", "b"]),
    lambda: pl.gen("x", max_tokens=1),
    lambda: pl.gen("y") + pl.gen("x"),
])
def test_every_kind_of_producer_counts(mock, second):
    @pl.function
    def twice(s):
        s += pl.gen("x", max_tokens=1)
        s += second()

    with pytest.raises(VariableReuseError, match="'x'"):
        twice.run(backend=mock)


def test_var_scope_and_one_expression_with_the_name_twice(mock):
    @pl.function
    def scoped(s):
        with s.var_scope("x"):
            s += "text"
        s += pl.gen("x", max_tokens=1)

    with pytest.raises(VariableReuseError):
        scoped.run(backend=mock)
    with pytest.raises(VariableReuseError):
        pl.function(lambda s: s.__iadd__(pl.gen("x") + pl.gen("x"))).run(backend=mock)


def test_the_reasoning_variable_is_a_name_too(mock):
    @pl.function
    def clash(s):
        s += pl.separate_reasoning(pl.gen("a", max_tokens=1), model_type="qwen3")
        s += pl.gen("a_reasoning_content", max_tokens=1)

    with pytest.raises(VariableReuseError, match="a_reasoning_content"):
        clash.run(backend=mock)


def test_overwrite_is_sglangs_behaviour(mock):
    @pl.function(name_reuse="overwrite")
    def loop(s):
        for i in range(3):
            s += f"Count {i}:" + pl.gen("step", max_tokens=2)
            s["seen_" + str(i)] = s["step"]

    state = loop.run(backend=mock)
    assert state["step"] == state["seen_2"] and len(mock.calls_of("generate")) == 3
    with pytest.raises(ValueError, match="name_reuse must be one of"):
        pl.function(lambda s: None, name_reuse="list")


def test_setting_a_variable_and_joining_forks_are_not_reuse(mock):
    @pl.function
    def rounds(s):
        s["idea"] = "seed"
        for _ in range(2):  # each round's branches set "idea" once; join replaces the list
            forks = s.fork(2)
            forks += pl.gen("idea", max_tokens=1)
            forks.join()
        with s.copy() as c:
            c += pl.gen("note", max_tokens=1)
        with s.copy() as c:
            c += pl.gen("note", max_tokens=1)

    state = rounds.run(backend=mock)
    assert len(state["idea"]) == 2 and state["note"] == [" ok"]


def test_a_branch_cannot_reuse_its_own_name(mock):
    @pl.function
    def branch_twice(s):
        forks = s.fork(2)
        forks += pl.gen("a", max_tokens=1)
        forks += pl.gen("a", max_tokens=1)

    with pytest.raises(VariableReuseError):
        branch_twice.run(backend=mock)


def test_tracing_reports_reuse_and_honours_the_opt_out():
    def body(s):
        s += pl.gen("x") + pl.gen("x")

    assert "VariableReuseError" in pl.function(body).trace().stopped
    assert pl.function(body, name_reuse="overwrite").trace().stopped is None
