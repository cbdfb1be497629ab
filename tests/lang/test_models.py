"""Per-call models (LoRA adapters): gen/select/call_tools model=, the s.using scope, forks, run_batch,
records, trace and HTML view, on the mock backend."""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang import MockBackend
from plait.lang.errors import BackendCapabilityError


def by_model(call) -> str:
    return f" from {call.model or 'base'}"


@pytest.fixture
def backend() -> MockBackend:
    return MockBackend(default=by_model, models=["writer", "judge"])


def served(backend: MockBackend) -> list:
    return [c.model for c in backend.calls_of("generate")]


def test_gen_and_select_name_their_model(backend):
    @pl.function
    def prog(s):
        s += "Draft:" + pl.gen("draft", max_tokens=4, model="writer")
        s += " Verdict:" + pl.select("verdict", ["good", "bad"], model="judge")
        s += " Again:" + pl.gen("plain", max_tokens=4)
        s += " Or:" + pl.gen("via_choices", choices=["yes", "no"], model="judge")

    state = prog.run(backend=backend)
    assert state["draft"] == " from writer" and state["plain"] == " from base"
    assert served(backend) == ["writer", None]
    assert [p["model"] for p in backend.calls_of("score_choices")] == ["judge", "judge"]
    assert [(c.name, c.model) for c in state.calls] == [
        ("draft", "writer"), ("verdict", "judge"), ("plain", None), ("via_choices", "judge")]
    assert state.get_meta_info("draft")["model"] == "writer" and state.get_meta_info("plain")["model"] is None
    assert state.get_meta_info("verdict")["model"] == "judge"


def test_using_scopes_nest_and_a_call_naming_its_model_wins(backend):
    @pl.function
    def prog(s):
        s += pl.gen("a", max_tokens=4)
        with s.using(model="writer"):
            s += pl.gen("b", max_tokens=4)
            s += pl.gen("c", max_tokens=4, model="judge")
            with s.using(model=None):  # the default (base) model inside an outer scope
                s += pl.gen("d", max_tokens=4)
            with s.using("judge"):
                s += pl.user(pl.gen("e", max_tokens=4))  # inside a role block (a Seq)
            s += pl.gen("f", max_tokens=4)
        s += pl.gen("g", max_tokens=4)

    state = prog.run(backend=backend)
    assert [c.model for c in state.calls] == [None, "writer", "judge", None, "judge", "writer", None]
    assert state["f"] == " from writer" and state["g"] == " from base"


def test_using_restores_the_scope_when_the_block_raises(backend):
    @pl.function
    def prog(s):
        with s.using(model="writer"):
            s += pl.gen("a", max_tokens=4)
            try:
                with s.using(model="judge"):
                    s += pl.gen("b", max_tokens=4)
                    raise KeyError("inside")
            except KeyError:
                pass
            s += pl.gen("c", max_tokens=4)
        try:
            with s.using(model="judge"):
                raise RuntimeError("outer")
        except RuntimeError:
            pass
        s += pl.gen("d", max_tokens=4)

    state = prog.run(backend=backend)
    assert [c.model for c in state.calls] == ["writer", "judge", "writer", None]


def test_forks_inherit_the_scope_and_warm_the_cache_under_its_model(backend):
    @pl.function
    def prog(s):
        s += "Topic: tea.\n"
        with s.using(model="writer"):
            forks = s.fork(3)
        with forks[2].using(model="judge"):  # a branch's own scope
            forks[2] += pl.gen("x", max_tokens=4)
        for f in forks[:2]:
            f += pl.gen("x", max_tokens=4)
        forks.join()
        s += pl.gen("after", max_tokens=4)  # the scope ended in the parent

    state = prog.run(backend=backend)
    assert state["x"] == [" from writer", " from writer", " from judge"]
    assert backend.calls_of("cache_prefix") == [("Topic: tea.\n", state.program_id, "writer")]
    assert state.get_meta_info("after")["model"] is None
    assert sorted((c.branch, c.model) for c in state.calls if c.name == "x") == [
        (0, "writer"), (1, "writer"), (2, "judge")]


def test_run_batch_keeps_models_and_prefills_under_the_first_calls_model(backend):
    @pl.function
    def prog(s, topic):
        s += "Write about " + topic + "."
        with s.using(model="writer"):
            s += pl.gen("text", max_tokens=4)
        s += pl.select("ok", ["yes", "no"], model="judge")

    @pl.function
    def judged(s, topic):
        s += "Judge this. " + pl.select("verdict", ["yes", "no"], model="judge") + topic

    states = prog.run_batch([{"topic": t} for t in ("tea", "ink", "owls")], backend=backend)
    assert [s["text"] for s in states] == [" from writer"] * 3
    assert {c.model for s in states for c in s.calls} == {"writer", "judge"}
    ((prefix, _, model),) = backend.calls_of("cache_prefix")
    assert prefix == "Write about " and model == "writer"
    judged.run_batch([{"topic": "a"}, {"topic": "b"}], backend=backend)
    assert backend.calls_of("cache_prefix")[-1][2] == "judge"


def test_the_cache_is_per_model(backend):
    """The mock keys cached prefixes per model, as the engine does: a prefix a writer call computed is no
    cache hit for the judge."""
    @pl.function
    def prog(s):
        s += "A long shared preamble of the program. " * 4
        s += pl.gen("a", max_tokens=2, model="writer", stop="\n")
        s += pl.gen("b", max_tokens=2, model="judge")
        s += pl.gen("c", max_tokens=2, model="writer")

    state = prog.run(backend=backend)
    cached = {c.name: c.cached_tokens for c in state.calls}
    assert cached["b"] == 0 and cached["c"] > 0


def test_a_one_model_backend_refuses_a_named_model():
    backend = MockBackend(default=" ok", per_call_models=False)

    @pl.function
    def prog(s, model):
        s += "Q:" + pl.gen("a", max_tokens=2, model=model)

    assert prog.run(backend=backend, model=None)["a"] == " ok"
    with pytest.raises(BackendCapabilityError, match="model 'judge'.*serves one model"):
        prog.run(backend=backend, model="judge")
    assert len(backend.calls_of("generate")) == 1  # refused before the call

    @pl.function
    def scoped(s):
        s += "Q:"
        with s.using(model="judge"):
            s += pl.select("v", ["yes", "no"])

    with pytest.raises(BackendCapabilityError, match="select 'v'"):
        scoped.run(backend=backend)


def test_an_unknown_model_is_an_error_naming_the_loaded_ones(backend):
    @pl.function
    def prog(s):
        s += "Q:" + pl.gen("a", max_tokens=2, model="poet")

    with pytest.raises(ValueError, match=r"unknown model 'poet'.*\['writer', 'judge'\]"):
        prog.run(backend=backend)


@pytest.mark.parametrize("bad, error", [("", ValueError), (" judge", ValueError), (3, TypeError)])
def test_bad_model_names_fail_where_they_are_written(bad, error):
    with pytest.raises(error, match="model"):
        pl.gen("a", model=bad)
    with pytest.raises(error, match="model"):
        pl.select("a", ["x"], model=bad)
    with pytest.raises(error, match="model"):
        pl.call_tools("a", model=bad)

    @pl.function
    def prog(s):
        with s.using(model=bad):
            s += pl.gen("a")

    with pytest.raises(error, match="using"):
        prog.run(backend=MockBackend())


def test_call_tools_turns_go_to_the_named_model():
    backend = MockBackend(default="The answer is 4.")

    @pl.tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @pl.function
    def agent(s):
        s += pl.system("You add.", tools=[add])
        s += pl.user("2+2?")
        with s.using(model="tool-caller"):
            s += pl.call_tools("answer", max_tokens=16)

    state = agent.run(backend=backend)
    assert state["answer"] == "The answer is 4."
    assert served(backend) == ["tool-caller"] and state.calls[0].kind == "call_tools"
    assert state.calls[0].model == "tool-caller"


def test_trace_shows_the_model_of_each_call():
    @pl.function
    def prog(s, q):
        s += pl.user(q)
        with s.using(model="writer"):
            s += pl.assistant(pl.gen("draft", max_tokens=8))
        s += pl.select("verdict", ["good", "bad"], model="judge")
        s += pl.gen("plain", max_tokens=2)

    text = str(prog.trace())
    assert "gen 'draft'(max_new_tokens=8)  on model 'writer'" in text
    assert "method=token_length_normalized  on model 'judge'" in text
    assert "gen 'plain'(max_new_tokens=2)\n" in text  # the default model is not mentioned
    assert [c.model for c in prog.trace().calls] == ["writer", "judge", None]


def test_html_tags_calls_of_other_models_and_adds_a_model_column(backend):
    @pl.function
    def prog(s):
        s += pl.user("Write.")
        s += pl.assistant(pl.gen("draft", max_tokens=4, model="writer"))
        s += pl.gen("plain", max_tokens=4)

    html = prog.run(backend=backend)._repr_html_()
    assert '<span class="plait-model" title="served by model &#x27;writer&#x27;">writer</span>' in html
    assert 'title="gen draft (model writer)"' in html and html.count('class="plait-model"') == 1
    assert "<th>model</th>" in html and '<td class="plait-left">writer</td>' in html
    assert '<td class="plait-left plait-note">default</td>' in html

    @pl.function
    def plain(s):
        s += "Q:" + pl.gen("a", max_tokens=2)

    html = plain.run(backend=backend)._repr_html_()
    assert "<th>model</th>" not in html and "plait-model\"" not in html
