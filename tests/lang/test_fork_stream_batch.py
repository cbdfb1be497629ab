"""fork/join, streaming, run_batch and program ids, against the MockBackend."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

import plait as pl
from plait.lang import MockBackend, ProgramBatchError


def barrier_output(n: int, text: str):
    """An output that only completes once ``n`` generations wait at the same time (proves concurrency)."""
    barrier = threading.Barrier(n)

    def out(call):
        barrier.wait(timeout=10)
        return text

    return out


def test_fork_branches_run_concurrently_and_share_the_prefix():
    backend = MockBackend({"Idea": barrier_output(3, " idea")})

    @pl.function
    def brainstorm(s):
        s += "Topic: tea.\n"
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Idea {i}:" + pl.gen("idea", max_tokens=4)
        forks.join()

    state = brainstorm.run(backend=backend)
    assert state["idea"] == [" idea", " idea", " idea"]
    assert state.text() == "Topic: tea.\n"  # gather_variable leaves the source text alone
    (cached,) = backend.calls_of("cache_prefix")
    assert cached == ("Topic: tea.\n", state.program_id, None)
    prompts = sorted(c.prompt for c in backend.calls_of("generate"))
    assert prompts == [f"Topic: tea.\nIdea {i}:" for i in range(3)]
    assert backend.calls.index(("cache_prefix", cached)) < min(i for i, c in enumerate(backend.calls) if c[0] == "generate")


def test_fork_states_are_states(mock):
    @pl.function
    def prog(s):
        s += "Count:"
        forks = s.fork(2)
        forks += pl.gen("n", max_tokens=1)  # the same node to every branch
        forks += [" a", " b"]  # one item per branch
        forks += lambda i: f" #{i}"  # computed per branch
        assert forks[0]["n"] == forks[1]["n"] == " one"
        assert forks[1].text() == "Count: one b #1"
        assert len(forks) == 2 and next(iter(forks)) is forks[0]
        forks.join("concate_and_append")

    state = prog.run(backend=mock)
    assert state.text() == "Count: one a #0 one b #1"
    assert "n" not in state  # concate_and_append merges text, not variables


def test_join_gathers_only_new_variables_and_meta(mock):
    @pl.function
    def prog(s):
        s += "capital of France" + pl.gen("before", max_tokens=1)
        forks = s.fork(2)
        forks[0] += pl.gen("x", max_tokens=1)
        forks[1] += pl.gen("y", max_tokens=1)
        forks[1] += pl.gen("x", max_tokens=1)
        forks.join()
        forks_done = forks
        return forks_done

    state = prog.run(backend=mock)
    assert state["before"] == " Paris"
    assert state["x"] == [" Paris", " Paris"] and state["y"] == [" Paris"]
    assert len(state.get_meta_info("x")) == 2
    with pytest.raises(pl.lang.StateClosedError):
        state.ret_value[0] += "more"
    # the branches' calls are part of the run's record (and of its HTML view), tagged with the branch
    assert [(c.name, c.branch) for c in state.calls] == [("before", None), ("x", 0), ("y", 1), ("x", 1)]
    assert "x (fork 1)" in state._repr_html_()


def test_concatenating_join_keeps_the_branch_calls(mock):
    @pl.function
    def prog(s):
        s += "Count:"
        forks = s.fork(2)
        forks += pl.gen("n", max_tokens=1)
        forks.join("concate_and_append")

    state = prog.run(backend=mock)
    assert [(c.kind, c.branch) for c in state.calls] == [("gen", 0), ("gen", 1)]


def test_fork_of_one_does_not_cache_and_copy_joins(mock):
    @pl.function
    def prog(s):
        s += "Count:"
        with s.copy() as c:
            c += pl.gen("n", max_tokens=2)

    state = prog.run(backend=mock)
    assert state["n"] == [" one two"] and not mock.calls_of("cache_prefix")


def test_stream_text_iter_whole_text_and_variable():
    backend = MockBackend({"Count": " one two three"}, token_delay_s=0.01)

    @pl.function
    def prog(s):
        s += "Count:" + pl.gen("c", max_tokens=3) + " end"

    state = prog.run(backend=backend, stream=True)
    chunks = list(state.text_iter())
    assert "".join(chunks) == "Count: one two three end" and len(chunks) >= 3
    state = prog.run(backend=backend, stream=True)
    chunks = list(state.text_iter("c"))
    assert "".join(chunks) == " one two three" and len(chunks) >= 2
    assert backend.calls_of("stream") and not backend.calls_of("generate")


def test_stream_async_iter():
    backend = MockBackend({"Count": " one two three"}, token_delay_s=0.01)
    prog = pl.function(lambda s: s.__iadd__("Count:" + pl.gen("c", max_tokens=3)))

    async def collect():
        state = prog.run(backend=backend, stream=True)
        return [chunk async for chunk in state.text_async_iter("c")]

    chunks = asyncio.run(collect())
    assert "".join(chunks) == " one two three" and len(chunks) >= 2


def test_text_iter_without_stream_yields_the_result(mock):
    state = pl.function(lambda s: s.__iadd__("Count:" + pl.gen("c", max_tokens=1))).run(backend=mock)
    assert list(state.text_iter()) == ["Count: one"]
    assert list(state.text_iter("c")) == [" one"]
    with pytest.raises(pl.lang.UnknownVariableError, match="known variables: 'c'"):
        list(state.text_iter("d"))


def test_stream_error_surfaces_in_text_iter():
    backend = MockBackend(supports_select=False)
    state = pl.function(lambda s: s.__iadd__("x" + pl.select("c", choices=["a", "b"]))).run(backend=backend, stream=True)
    with pytest.raises(pl.lang.BackendCapabilityError):
        list(state.text_iter())
    assert isinstance(state.error(), pl.lang.BackendCapabilityError)


def test_program_id_on_every_call_and_begin_end_around_the_run():
    backend = MockBackend(choice_logprobs={"a": [-1.0], "b": [-2.0]})

    @pl.function
    def prog(s):
        s += "q" + pl.gen("g", max_tokens=1)
        forks = s.fork(2)
        forks += pl.gen("f", max_tokens=1)
        forks.join()
        s += pl.select("c", choices=["a", "b"])

    state = prog.run(backend=backend)
    pid = state.program_id
    kinds = [k for k, _ in backend.calls]
    assert kinds[0] == "begin_program" and kinds[-1] == "end_program"
    assert backend.calls[0][1] == backend.calls[-1][1] == pid and backend.open_programs == set()
    assert all(c.program_id == pid for c in backend.calls_of("generate"))
    assert all(c["program_id"] == pid for c in backend.calls_of("score_choices"))
    assert all(p == pid for _, p, _ in backend.calls_of("cache_prefix"))


def test_end_program_also_on_error(mock):
    @pl.function
    def prog(s):
        s += "x" + pl.gen("g", max_tokens=1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prog.run(backend=mock)
    assert mock.open_programs == set() and mock.calls[-1][0] == "end_program"


def test_each_run_has_its_own_program_id(mock):
    prog = pl.function(lambda s: s.__iadd__("x"))
    assert prog.run(backend=mock).program_id != prog.run(backend=mock).program_id


def test_run_batch_in_order_with_shared_prefix_cached_once():
    backend = MockBackend({"about": lambda call: " " + re.search(r"about (\w+)\?", call.prompt).group(1) + "!"})

    @pl.function
    def prog(s, topic, style="short"):
        s += pl.system(f"You write {style} answers.")
        s += pl.user(f"Tell me about {topic}?")
        s += pl.assistant(pl.gen("a", max_tokens=4))

    items = [{"topic": t} for t in ("tea", "rain", "owls", "ink")]
    states = prog.run_batch(items, backend=backend, num_threads=2, temperature=0)
    assert [s["a"] for s in states] == [" tea!", " rain!", " owls!", " ink!"]
    prefix = "<|im_start|>system\nYou write short answers.<|im_end|>\n<|im_start|>user\nTell me about "
    assert prog.batch_prefix(items, backend=backend) == prefix
    (cached,) = backend.calls_of("cache_prefix")
    assert cached[0] == prefix and cached[1].startswith("batch-")
    assert backend.calls.index(("cache_prefix", cached)) < [k for k, _ in backend.calls].index("generate")
    assert all(c.params.temperature == 0.0 for c in backend.calls_of("generate"))
    assert backend.open_programs == set()
    # An argument that varies ends the shared prefix earlier.
    varied = [{"topic": "tea", "style": "long"}, {"topic": "tea", "style": "short"}]
    assert prog.batch_prefix(varied, backend=backend) == "<|im_start|>system\nYou write "


def test_run_batch_progress_bar_and_auto_threads(mock, capsys):
    prog = pl.function(lambda s, x: s.__iadd__(f"{x}" + pl.gen("g", max_tokens=1)))
    states = prog.run_batch([{"x": i} for i in range(5)], backend=mock, progress_bar=True)
    assert [s.text() for s in states] == [f"{i} ok" for i in range(5)]
    assert "5/5" in capsys.readouterr().err


def test_run_batch_errors_are_collected():
    backend = MockBackend({"bad": lambda call: (_ for _ in ()).throw(RuntimeError("backend down"))})
    prog = pl.function(lambda s, x: s.__iadd__(x + pl.gen("g", max_tokens=1)))
    with pytest.raises(ProgramBatchError, match="1 of 3 programs failed") as info:
        prog.run_batch([{"x": "good"}, {"x": "bad"}, {"x": "fine"}], backend=backend)
    assert set(info.value.errors) == {1} and info.value.states[0]["g"] == "mock"
    states = prog.run_batch([{"x": "good"}, {"x": "bad"}], backend=backend, raise_on_error=False)
    assert states[0].error() is None and isinstance(states[1].error(), RuntimeError)


def test_default_backend(mock):
    pl.set_default_backend(mock)
    assert pl.function(lambda s: s.__iadd__("capital of France" + pl.gen("c"))).run()["c"] == " Paris"


def test_use_thread_false_runs_inline(mock):
    @pl.function
    def prog(s):
        s += "Count:" + pl.gen("c", max_tokens=1)
        forks = s.fork(2)
        forks += pl.gen("d", max_tokens=1)
        forks.join()

    state = prog.run(backend=mock, use_thread=False)
    assert state["c"] == " one" and state["d"] == [" one", " one"]
