"""Every typed error of the language, and that its message says what to do."""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang import (
    BackendCapabilityError,
    ChatTemplateError,
    EmptyChoicesError,
    GenerationError,
    InvalidDtypeError,
    MockBackend,
    NoBackendError,
    PlaitLangError,
    ProgramArgumentError,
    RoleError,
    StateClosedError,
    UnknownVariableError,
)
from plait.lang.backends import base


def test_capability_error_is_the_protocols():
    assert BackendCapabilityError is base.BackendCapabilityError
    assert pl.lang.errors.BackendCapabilityError is base.BackendCapabilityError


def test_unknown_variable_names_the_known_ones(mock):
    def body(s):
        s += "capital of France" + pl.gen("city", max_tokens=1)
        s["note"] = 1

    state = pl.function(body).run(backend=mock)
    with pytest.raises(UnknownVariableError, match=r"unknown variable 'cty'; known variables: 'city', 'note'") as info:
        state["cty"]
    assert isinstance(info.value, KeyError) and isinstance(info.value, PlaitLangError)
    with pytest.raises(UnknownVariableError):
        state.get_meta_info("cty")


def test_unknown_variable_inside_the_program(mock):
    def body(s):
        s += pl.gen("a", max_tokens=1)
        s["b"]

    with pytest.raises(UnknownVariableError, match="known variables: 'a'"):
        pl.function(body).run(backend=mock)


@pytest.mark.parametrize("choices", [[], None, "ab"])
def test_empty_choices(choices):
    with pytest.raises(EmptyChoicesError, match="non-empty list of choices"):
        pl.select("x", choices=choices)
    if choices is not None:
        with pytest.raises(EmptyChoicesError):
            pl.gen("x", choices=choices)


def test_bad_choices_and_method():
    with pytest.raises(ValueError, match="non-empty str"):
        pl.select("x", choices=["a", ""])
    with pytest.raises(ValueError, match="unknown choices_method 'best'"):
        pl.select("x", choices=["a"], choices_method="best")
    with pytest.raises(ValueError, match="temperature"):
        pl.select("x", choices=["a"], temperature=0.5)


@pytest.mark.parametrize("dtype", [list, dict, "int", 3])
def test_bad_dtype(dtype):
    with pytest.raises(InvalidDtypeError, match="int, float, bool, str"):
        pl.gen("x", dtype=dtype)


def test_output_that_does_not_parse_as_dtype():
    backend = MockBackend(default="twelve", enforce_constraints=False)
    with pytest.raises(GenerationError, match=r"'twelve', which is not a int"):
        pl.function(lambda s: s.__iadd__(pl.gen("n", dtype=int))).run(backend=backend)


def test_aborted_generation_is_an_error():
    class Aborting(MockBackend):
        def generate(self, call):
            result = super().generate(call)
            result.finish_reason = {"type": "abort", "message": "out of memory"}
            return result

    with pytest.raises(GenerationError, match="aborted gen 'a': out of memory"):
        pl.function(lambda s: s.__iadd__(pl.gen("a"))).run(backend=Aborting())


def test_gen_on_a_finished_state(mock):
    state = pl.function(lambda s: s.__iadd__("x")).run(backend=mock)
    with pytest.raises(StateClosedError, match="start a new run"):
        state += pl.gen("more")
    with pytest.raises(StateClosedError):
        state.fork(2)


def test_no_backend():
    prog = pl.function(lambda s: s.__iadd__("x"))
    with pytest.raises(NoBackendError, match="set_default_backend"):
        prog.run()
    with pytest.raises(NoBackendError):
        prog.run_batch([{}])


def test_not_a_backend():
    with pytest.raises(TypeError, match="not a plait backend"):
        pl.set_default_backend(object())


def test_backend_without_select():
    prog = pl.function(lambda s: s.__iadd__(pl.select("x", choices=["a", "b"])))
    with pytest.raises(BackendCapabilityError, match="cannot score choices"):
        prog.run(backend=MockBackend(supports_select=False))


def test_backend_without_unconditional_scores():
    class NoUnconditional(MockBackend):
        def score_choices(self, prefix, choices, *, unconditional=False, program_id=None):
            return super().score_choices(prefix, choices, unconditional=False, program_id=program_id)

    prog = pl.function(lambda s: s.__iadd__(pl.select("x", choices=["a", "b"], choices_method="unconditional_likelihood_normalized")))
    with pytest.raises(BackendCapabilityError, match="unconditional"):
        prog.run(backend=NoUnconditional())


def test_program_arguments(mock):
    @pl.function
    def prog(s, question):
        s += question

    with pytest.raises(ProgramArgumentError, match="unexpected argument 'questoin'"):
        prog.run(questoin="x", backend=mock)
    with pytest.raises(ProgramArgumentError, match="missing a required argument: 'question'"):
        prog.run(backend=mock)
    with pytest.raises(ProgramArgumentError, match="item 1"):
        prog.run_batch([{"question": "a"}, "b"], backend=mock)
    with pytest.raises(ValueError, match="temperature"):
        prog.run("q", backend=mock, temperature=-1)
    with pytest.raises(ProgramArgumentError, match="first parameter"):
        pl.function(lambda: None)


def test_roles(mock):
    with pytest.raises(RoleError, match="roles do not nest"):
        pl.function(lambda s: s.__iadd__(pl.user(pl.assistant("x")))).run(backend=mock)
    with pytest.raises(RoleError, match="open block is None"):
        pl.function(lambda s: s.__iadd__(pl.user_end())).run(backend=mock)
    with pytest.raises(RoleError, match="unknown role"):
        pl.lang.primitives.role("tool", "x")


def test_chat_templates():
    with pytest.raises(ChatTemplateError, match="unknown chat template 'chatmlx'; known: .*chatml"):
        pl.function(lambda s: s.__iadd__("x")).run(backend=MockBackend(), chat_template="chatmlx")
    partial = pl.lang.ChatTemplate("partial", {"user": ("U:", "\n")})
    with pytest.raises(ChatTemplateError, match="has no 'system' role"):
        pl.function(lambda s: s.__iadd__(pl.system("x"))).run(backend=MockBackend(chat_template=partial))


def test_appending_non_text(mock):
    with pytest.raises(TypeError, match="f-string"):
        pl.function(lambda s: s.__iadd__(5)).run(backend=mock)
    with pytest.raises(TypeError, match="None"):
        pl.function(lambda s: s.__iadd__(None)).run(backend=mock)


def test_error_in_a_node_surfaces_at_the_next_append(mock):
    seen = []

    def body(s):
        s += pl.user_end()  # fails in the worker
        try:
            s.sync()
        except RoleError:
            seen.append("sync")
        s += "more"

    with pytest.raises(RoleError):
        pl.function(body).run(backend=mock)
    assert seen == ["sync"]
