"""A run's end: a reader leaving text_iter, state.abort(), timeout= on run/run_batch. MockBackend only (each
token takes ``token_delay_s``; ``abort_program`` ends a program's calls in flight, as real backends do)."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

import plait as pl
from plait.lang import MockBackend, ProgramAbortedError, ProgramTimeoutError

LONG = " ".join(f"w{i}" for i in range(200))


@pytest.fixture
def slow() -> MockBackend:
    return MockBackend(default=LONG, token_delay_s=0.01)


@pl.function
def two_gens(s):
    s += "First:" + pl.gen("a", max_tokens=200)
    s += "\nSecond:" + pl.gen("b", max_tokens=200)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def ended(backend: MockBackend, state) -> bool:
    return ("end_program", state.program_id) in backend.calls


def test_breaking_out_of_text_iter_aborts_the_run(slow):
    state = two_gens.run(backend=slow, stream=True)
    for i, _ in enumerate(state.text_iter("a")):
        if i == 2:
            break
    wait_until(lambda: ended(slow, state))
    assert slow.calls_of("abort_program") == [state.program_id]
    assert isinstance(state.error(), ProgramAbortedError) and "stopped before the run ended" in str(state.error())
    assert len(slow.calls_of("stream")) == 1  # the second gen never started
    assert "w150" not in state._executor.text  # the first one stopped early (text() raises the abort)
    with pytest.raises(ProgramAbortedError):
        state.sync()


def test_a_reader_that_finishes_does_not_abort(slow):
    fast = MockBackend(default="one two three")
    state = two_gens.run(backend=fast, stream=True)
    assert "".join(state.text_iter("a")) == "one two three"
    state.sync()
    assert state.error() is None and fast.calls_of("abort_program") == []


def test_a_garbage_collected_iterator_aborts_the_run(slow):
    state = two_gens.run(backend=slow, stream=True)
    iterator = state.text_iter()
    next(iterator)
    del iterator
    gc.collect()
    wait_until(lambda: ended(slow, state))
    assert isinstance(state.error(), ProgramAbortedError)


def test_leaving_text_async_iter_aborts_the_run(slow):
    state = two_gens.run(backend=slow, stream=True)

    async def read_two():
        async for i, _ in _enumerate(state.text_async_iter("a")):
            if i == 1:
                break

    asyncio.run(read_two())  # the loop closes the async generator at the latest when it shuts down
    wait_until(lambda: ended(slow, state))
    assert isinstance(state.error(), ProgramAbortedError) and slow.calls_of("abort_program")


async def _enumerate(aiter):
    i = 0
    async for item in aiter:
        yield i, item
        i += 1


def test_state_abort_stops_a_streaming_run(slow):
    state = two_gens.run(backend=slow, stream=True)
    wait_until(lambda: "w3" in state._executor.text)
    started = time.monotonic()
    assert state.abort() is True and state.abort() is False  # once
    wait_until(lambda: ended(slow, state))
    assert time.monotonic() - started < 1  # the call in flight ended at its next token
    assert isinstance(state.error(), ProgramAbortedError) and "state.abort()" in str(state.error())
    with pytest.raises(ProgramAbortedError):
        list(state.text_iter())
    assert len(slow.calls_of("stream")) == 1


def test_abort_inside_the_program_and_after_the_end(mock):
    @pl.function
    def stops_itself(s):
        s += pl.gen("a", max_tokens=2)
        if s["a"]:
            s.abort()
        s += pl.gen("b", max_tokens=2)

    with pytest.raises(ProgramAbortedError, match="state.abort"):
        stops_itself.run(backend=mock)
    assert len(mock.calls_of("generate")) == 1
    state = two_gens.run(backend=mock)
    assert state.abort() is False and state.error() is None  # the run had ended


def test_run_timeout_aborts_the_call_in_flight(slow):
    started = time.monotonic()
    with pytest.raises(ProgramTimeoutError, match=r"program 'two_gens' did not finish within timeout=0.2 s") as info:
        two_gens.run(backend=slow, timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 1.5  # 200 tokens would take 2 s
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, ProgramAbortedError)
    [pid] = slow.calls_of("abort_program")
    wait_until(lambda: ("end_program", pid) in slow.calls)


def test_run_timeout_with_stream(slow):
    state = two_gens.run(backend=slow, stream=True, timeout=0.2)
    with pytest.raises(ProgramTimeoutError):
        "".join(state.text_iter())
    assert isinstance(state.error(), ProgramTimeoutError)


def test_a_run_within_its_timeout_is_untouched(mock):
    state = two_gens.run(backend=mock, timeout=30)
    assert state["a"] and mock.calls_of("abort_program") == []
    timer = state._executor.run.deadline
    timer.join(2)  # cancelled when the run ended, not left waiting 30 s
    assert not timer.is_alive()


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "1", True])
def test_bad_timeouts(mock, timeout):
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        two_gens.run(backend=mock, timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be"):
        two_gens.run_batch([{}], backend=mock, timeout=timeout)


def test_run_batch_timeout_aborts_what_is_left(slow):
    fast_and_slow = MockBackend({"quick": "done"}, default=LONG, token_delay_s=0.01)

    @pl.function
    def answer(s, q):
        s += q + ":" + pl.gen("a", max_tokens=200)

    items = [{"q": "quick"}, {"q": "slow"}, {"q": "slow too"}]
    started = time.monotonic()
    with pytest.raises(ProgramTimeoutError, match="2 of 3 runs did not finish") as info:
        answer.run_batch(items, backend=fast_and_slow, num_threads=2, timeout=0.3)
    assert time.monotonic() - started < 2
    states, errors = info.value.states, info.value.errors
    assert states[0]["a"] == "done" and sorted(errors) == [1, 2]
    assert all(isinstance(e, ProgramTimeoutError) for e in errors.values())
    states = answer.run_batch(items, backend=fast_and_slow, num_threads=1, timeout=0.3, raise_on_error=False)
    assert states[0].error() is None and isinstance(states[2].error(), ProgramTimeoutError)
    assert len(fast_and_slow.calls_of("generate")) == 3 + 2  # the third item of the 1-thread batch never started


class _FailsInBranch(MockBackend):
    """A backend whose calls fail when the prompt contains "boom"."""

    def generate(self, call):
        if "boom" in call.prompt:
            raise RuntimeError("backend failed in a branch")
        return super().generate(call)

    def stream(self, call):
        if "boom" in call.prompt:
            raise RuntimeError("backend failed in a branch")
        yield from super().stream(call)


def test_a_failed_branch_raised_by_join_reaches_the_stream_reader():
    """The root executor finishes before the program function's error (a branch's, raised by join())
    is recorded; the reader must get the error, never a quiet end (it was lost in 18 of 20 runs)."""

    @pl.function
    def prog(s):
        s += "start "
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += ("boom " if i == 1 else "fine ") + pl.gen("x", max_tokens=3)
        forks.join()
        s += pl.gen("y", max_tokens=3)

    for _ in range(20):
        state = prog.run(backend=_FailsInBranch(default=" ok"), stream=True)
        with pytest.raises(RuntimeError, match="failed in a branch"):
            for _ in state.text_iter():
                pass
