"""Reclaimer: frees evicted grammars on a thread of its own, off the compiling request's path.

Freeing a compiled grammar that requests have used is not free: llguidance's matcher drops its lexer
and parser caches (grown by every mask computed from it or its copies), 0.08 ms at the median and
0.23 ms at p90 on MaskBench schemas, ~7% of a typical schema's compile. The compiler's cache evicts a
grammar when it inserts a new one, i.e. inside the compile that a request is waiting for; a server
frees it elsewhere. ``Reclaimer.put`` hands the objects over to a daemon thread that drops them.

When: the drop of a native object holds the GIL (its deallocation runs under it), so a free on
another thread costs this process's other Python threads about as long as it lasts; what moves is
*when*, not between a compile's start and its result. The thread frees what waits ``linger_s`` after
the first of it came (or once ``wake_at`` objects wait), in batches, yielding the GIL between frees.
A ``put`` does not wake the thread while it waits with that timeout (waking a thread is a system
call, ~10 us of the ``put`` on a VM, an eighth of the free it saves); only after a whole ``linger_s``
with nothing to free does the thread sleep until the next ``put`` wakes it. (Freeing at the start
of the next compile, while llguidance builds its matcher without the GIL, was measured too: the
compile ran slower by more than the free, probably the two threads contending in the allocator.)

Bounded: at most ``capacity`` objects wait; past that ``put`` frees them on the calling thread (no
memory grows when frees cannot keep up). ``close`` (the compiler's ``shutdown``) stops the thread and
frees whatever still waits, so nothing is left behind; ``put`` after ``close`` frees inline.
Thread-safe: any thread may ``put`` (the compiler's callers and its compile threads do).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["Reclaimer"]

DEFAULT_CAPACITY = 64
DEFAULT_LINGER_S = 1.0


class Reclaimer:
    """Drops references on a background thread (started on the first ``put``).

    Args:
        capacity: objects waiting at most; a ``put`` past it frees on the caller's thread.
        linger_s: how long the thread gathers objects before it frees them (a ``put`` in that time
            does not wake it).
        wake_at: objects waiting that wake the thread at once (default: half the capacity).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, linger_s: float = DEFAULT_LINGER_S,
                 wake_at: int | None = None, name: str = "plait-grammar-reclaim"):
        if capacity < 0:
            raise ValueError(f"reclaimer capacity must be >= 0, got {capacity}")
        if linger_s <= 0:
            raise ValueError(f"reclaimer linger_s must be > 0, got {linger_s}")
        self.capacity = capacity
        self.linger_s = linger_s
        self.wake_at = max(1, capacity // 2) if wake_at is None else max(1, wake_at)
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[Any] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._idle = False  # the thread sleeps without a timeout: the next put must wake it
        self._busy = False  # the thread holds objects it is dropping (``drain`` waits for them)
        self._flush = False  # ``drain`` asked: free what waits now

    def put(self, items: list[Any]) -> None:
        """Free the objects of ``items`` off this thread: queued for the reclaimer thread, or (the queue
        full, or closed) dropped here. Takes them over: ``items`` is emptied. The caller must hold no
        other reference to them for the free to happen on the reclaimer thread."""
        batch = items[:]
        items.clear()
        if not batch:
            return
        with self._cond:
            if not self._closed and len(self._items) + len(batch) <= self.capacity:
                self._items.extend(batch)
                batch.clear()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
                elif self._idle or len(self._items) >= self.wake_at:
                    self._cond.notify()
        del batch  # full or closed: freed here, outside the lock

    def __len__(self) -> int:
        """Objects waiting to be freed."""
        return len(self._items)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Free every object put so far and wait for it; False if ``timeout_s`` passed first."""
        with self._cond:
            if self._items:
                self._flush = True
                self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout_s)

    def close(self) -> None:
        """Stop the thread and free what still waits (on the reclaimer thread if it runs, else here).
        Later ``put`` calls free inline. Idempotent."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            left = list(self._items)
            self._items.clear()
        del left

    def _next_batch(self) -> list[Any] | None:
        """Wait for objects to free (None: closed, nothing left). Called with the lock held."""
        quiet = False  # a whole linger_s passed with nothing to free
        while True:
            if self._items and (self._closed or self._flush or len(self._items) >= self.wake_at):
                break
            if self._closed:
                return None
            if quiet and not self._items:
                self._idle = True  # nothing for a while: sleep until a put
                self._cond.wait()
                self._idle = quiet = False
                continue
            pending = bool(self._items)
            if not self._cond.wait(self.linger_s):  # timed out
                if pending or self._items:
                    break  # gathered for linger_s: free them
                quiet = True
        batch = list(self._items)
        self._items.clear()
        self._flush = False
        self._busy = True
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                while batch:  # one at a time, outside the lock (put() never waits for a free)
                    batch.pop()
                    time.sleep(0)  # let other threads have the GIL between frees (each drop holds it)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
