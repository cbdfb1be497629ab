"""Reclaimer: evicted grammars freed off the caller's thread, bounded, drained at close, thread-safe."""

from __future__ import annotations

import threading

import pytest

from plait.runtime.constrained.reclaim import Reclaimer


class _Freed:
    """Records the thread that freed it; its free blocks until ``release`` is set (when given)."""

    def __init__(self, log: list, release: threading.Event | None = None, started: threading.Event | None = None):
        self.log, self.release, self.started = log, release, started

    def __del__(self):
        if self.started is not None:
            self.started.set()
        if self.release is not None:
            self.release.wait(10)
        self.log.append(threading.current_thread())


def test_put_returns_before_a_slow_free_and_frees_on_the_reclaimer_thread():
    log: list = []
    release, started = threading.Event(), threading.Event()
    reclaimer = Reclaimer(wake_at=1)
    try:
        items = [_Freed(log, release, started)]
        reclaimer.put(items)
        assert items == []  # taken over: the caller holds no reference
        assert started.wait(5)  # being freed, on another thread, while this one goes on
        assert log == [] and not reclaimer.drain(timeout_s=0.05)
        release.set()
        assert reclaimer.drain(timeout_s=5)
        assert len(log) == 1 and log[0] is not threading.current_thread()
    finally:
        release.set()
        reclaimer.close()


def test_a_full_queue_frees_on_the_callers_thread():
    log: list = []
    release, started = threading.Event(), threading.Event()
    reclaimer = Reclaimer(capacity=2, wake_at=1)
    try:
        reclaimer.put([_Freed(log, release, started)])
        assert started.wait(5)  # the thread is busy with it: what comes next waits in the queue
        reclaimer.put([_Freed(log), _Freed(log)])
        assert len(reclaimer) == 2 and log == []
        reclaimer.put([_Freed(log)])  # past the capacity: freed here, before put returns
        assert log == [threading.current_thread()]
        release.set()
        assert reclaimer.drain(timeout_s=5)
        assert len(log) == 4 and all(t is not threading.current_thread() for t in log[1:])
    finally:
        release.set()
        reclaimer.close()


def _wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        deadline.wait(0.01)
    return condition()


def test_objects_wait_for_linger_s_and_drain_or_close_free_the_rest():
    log: list = []
    reclaimer = Reclaimer(capacity=8, linger_s=60)  # would gather for a minute
    try:
        reclaimer.put([_Freed(log)])
        reclaimer.put([_Freed(log)])
        assert not _wait_for(lambda: log, 0.2) and len(reclaimer) == 2
        assert reclaimer.drain(timeout_s=5) and len(log) == 2  # drain does not wait for the linger
        assert all(t is not threading.current_thread() for t in log)
        for _ in range(3):
            reclaimer.put([_Freed(log)])
    finally:
        reclaimer.close()
    assert len(log) == 5  # close leaves nothing behind
    reclaimer.put([_Freed(log)])  # after close: freed inline
    assert log[-1] is threading.current_thread() and len(log) == 6


def test_objects_are_freed_after_linger_s_even_after_a_quiet_spell():
    log: list = []
    reclaimer = Reclaimer(linger_s=0.05)
    try:
        reclaimer.put([_Freed(log)])
        assert _wait_for(lambda: len(log) == 1, 5)
        assert _wait_for(lambda: reclaimer._idle, 5)  # nothing for a while: asleep until a put
        reclaimer.put([_Freed(log)])
        assert _wait_for(lambda: len(log) == 2, 5)
    finally:
        reclaimer.close()


def test_the_queue_reaching_wake_at_wakes_a_lingering_thread():
    log: list = []
    reclaimer = Reclaimer(capacity=8, linger_s=60, wake_at=3)
    try:
        for _ in range(3):
            reclaimer.put([_Freed(log)])
        assert _wait_for(lambda: len(log) == 3, 5)  # freed well before the minute's linger
    finally:
        reclaimer.close()


def test_concurrent_puts_free_everything_once():
    log: list = []
    reclaimer = Reclaimer(capacity=16, linger_s=0.01)
    barrier = threading.Barrier(4)

    def producer():
        barrier.wait()
        for _ in range(250):
            reclaimer.put([_Freed(log)])

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    reclaimer.close()
    assert len(log) == 1000 and len(reclaimer) == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        Reclaimer(capacity=-1)
    with pytest.raises(ValueError, match="linger_s"):
        Reclaimer(linger_s=0)
