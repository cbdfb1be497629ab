"""GrammarCompiler: spec -> compiled grammar, cached per (spec, tokenizer), off the scheduler loop.

Where compiling runs: with ``isolate`` (the engine's default) in compile worker processes
(``compile_worker.py``: a crash or a runaway compile costs only that request; a timed-out compile is
killed). Without it (tests, tools, ``grammar_compile_workers=0``), in this process: ``compile`` runs
it on the caller's thread when the serving backend bounds its own compile work
(``GrammarBackend.compile_bounded``: llguidance), else on a small thread pool, where a timed-out
compile goes on in the background and cannot be stopped; ``submit`` always uses the pool (it never
blocks).

The cache holds futures, so concurrent requests with the same spec wait for one compilation; it is
bounded by the estimated bytes of the compiled grammars (``cache_bytes``, least recently used dropped
first) and by their count (``cache_size``). A failed compilation is not cached (so a fixed backend or
a retry can succeed).

Backend choice: ``DEFAULT_BACKENDS`` (measured; see docs/constrained.md) gives the order per kind;
the first backend that is installed serves the kind, and its refusal of a spec (a feature it lacks)
is final: trying the next one rescued nothing on MaskBench (``prepare_first``). A JSON schema refused
only for relaxable keywords is compiled relaxed (``relax.py``; the grammar's ``relaxation`` says so;
see ``prepare_relaxing``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from plait.runtime.constrained.backends.base import (
    BackendUnavailable,
    CompiledGrammar,
    GrammarBackend,
)
from plait.runtime.constrained.compile_worker import CompileWorkerPool, prepare_relaxing
from plait.runtime.constrained.reclaim import Reclaimer
from plait.runtime.constrained.relax import Relaxation
from plait.runtime.constrained.spec import (
    ConstraintError,
    ConstraintKind,
    ConstraintSpec,
)
from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = ["BACKEND_NAMES", "DEFAULT_BACKENDS", "GrammarCompiler", "load_backend"]

BACKEND_NAMES = ("llguidance", "outlines")
# Backends per kind of spec, in order of preference: the first installed one serves (benchmarks/constrained.py
# measured the order; benchmarks/outlines_fallback.py that a second opinion after a refusal does not help).
DEFAULT_BACKENDS: dict[ConstraintKind, tuple[str, ...]] = {
    ConstraintKind.JSON_SCHEMA: ("llguidance", "outlines"),
    ConstraintKind.REGEX: ("llguidance", "outlines"),
    ConstraintKind.CHOICES: ("llguidance", "outlines"),
    ConstraintKind.GRAMMAR: ("llguidance",),
}
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CACHE_BYTES = 512 * 2**20
_GRACE_S = 5.0  # compile() waits this much past the workers' own deadline


def load_backend(name: str) -> GrammarBackend:
    """Instantiate a backend by name; ``BackendUnavailable`` if its package is missing."""
    if name == "llguidance":
        from plait.runtime.constrained.backends.llguidance_backend import (
            LLGuidanceBackend,
        )

        return LLGuidanceBackend()
    if name == "outlines":
        from plait.runtime.constrained.backends.outlines_backend import OutlinesBackend

        return OutlinesBackend()
    raise ValueError(f"unknown grammar backend {name!r}; known: {', '.join(BACKEND_NAMES)}")


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer. Thread-safe.

    Args:
        info: the tokenizer's view for grammars (``TokenizerInfo``).
        backend: ``"auto"`` (the first installed backend of ``DEFAULT_BACKENDS``) or one backend name.
        timeout_s: how long ``compile`` waits for a compilation (in workers: it is then killed; on the
            caller's thread it does not apply: see ``compile``).
        cache_size: compiled grammars kept at most.
        max_workers: compile threads, or worker processes with ``isolate``.
        cache_bytes: estimated bytes of compiled grammars kept at most.
        isolate: compile in worker processes (compile_worker.py) rather than threads of this process.
        max_queued: compilations waiting for a worker process beyond this are refused.
        worker_hook: called in each worker before each compile (tests simulate crashes and hangs).
    """

    def __init__(
        self,
        info: TokenizerInfo,
        backend: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        cache_size: int = 256,
        max_workers: int = 2,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        isolate: bool = False,
        max_queued: int = 64,
        worker_hook: Callable[[ConstraintSpec], None] | None = None,
    ) -> None:
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"unknown grammar backend {backend!r}; use 'auto' or one of {', '.join(BACKEND_NAMES)}")
        self.info = info
        self.backend = backend
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[ConstraintSpec, Future] = OrderedDict()
        self._cached_bytes = 0
        self._sizes: dict[ConstraintSpec, int] = {}
        self._backends: dict[str, GrammarBackend | BackendUnavailable] = {}
        self._inline: dict[tuple[str, ConstraintKind], bool] = {}  # _compiles_inline's answers
        # evicted grammars are freed on its thread, not inside the compile that evicted them
        self.reclaimer = Reclaimer()
        self.workers: CompileWorkerPool | None = None
        self._pool: ThreadPoolExecutor | None = None
        if isolate:
            self.workers = CompileWorkerPool(info, self._load, max_workers, timeout_s, max_queued, worker_hook,
                                             warm=self._order(ConstraintKind.JSON_SCHEMA))
        else:
            self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="plait-grammar")

    # ------------------------------------------------------------------ public
    def submit(self, spec: ConstraintSpec) -> Future:
        """A future of the compiled grammar (shared with every other request for the same spec). Never
        blocks on a compilation."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:
                self._cache.move_to_end(spec)
                return fut
            if self.workers is not None:
                fut = self.workers.submit(spec, self._order(spec.kind))
            else:
                fut = self._pool.submit(self._compile_now, spec)
            self._cache[spec] = fut
        fut.add_done_callback(lambda f, s=spec: self._settle(s, f))
        return fut

    def compile(self, spec: ConstraintSpec, timeout_s: float | None = None) -> CompiledGrammar:
        """Compile (or fetch) ``spec`` and wait for it; raises ``ConstraintError`` if it fails or times out.

        Where the compile runs and what ``timeout_s`` (default: the compiler's) bounds:

        - ``isolate``: in a worker process, killed at the timeout (this call waits a few seconds more
          for the worker's own verdict, and, while no worker has started yet, for the start: a worker
          that does not start in time fails the compile with ``WorkerStartError``).
        - no ``isolate``, and the backend that serves ``spec`` bounds its own compile work
          (``GrammarBackend.compile_bounded``; llguidance): on this thread, now. No handing over to
          a compiler thread and back (about 0.3 ms of thread wake-ups per new spec); the timeout then
          bounds only waiting for a compile of the same spec already under way (started by another
          caller or by ``submit``): this thread's own compile is bounded by the backend's limits, not
          by the clock. Call it where blocking for a compile is fine (never an event loop or the
          engine's loop: those use ``submit``).
        - no ``isolate``, another backend (outlines-core: no bound of its own): on a compiler thread;
          at the timeout this call raises, and the compile goes on in the background.

        A spec compiled, or being compiled, is shared (one compile however many callers ask); a
        failure is not cached."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if self.workers is None and self._compiles_inline(spec):
            fut, mine = self._claim(spec)
            if mine:
                self._fulfil(fut, spec)
        else:
            fut = self.submit(spec)
        wait = timeout
        if self.workers is not None:  # plus the start-up a worker may still need (the pool bounds it)
            wait += _GRACE_S + self.workers.start_wait_s()
        try:
            return fut.result(timeout=wait)
        except FutureTimeout:
            raise ConstraintError(
                f"compiling the {spec.describe()} constraint took longer than {timeout:g} s; simplify it "
                "(fewer alternatives, smaller bounded repetitions) or retry"
            ) from None

    @property
    def cached_bytes(self) -> int:
        """Estimated bytes held by the cached compiled grammars."""
        return self._cached_bytes

    def shutdown(self) -> None:
        """Stop the compile workers or threads, and free the evicted grammars still waiting for the
        reclaimer (``reclaim.py``)."""
        if self.workers is not None:
            self.workers.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.reclaimer.close()

    # ------------------------------------------------------------------ internals
    def _compiles_inline(self, spec: ConstraintSpec) -> bool:
        """Whether the backend that would serve ``spec`` (the first installed one of its order) bounds
        its own compile work; True when none is installed (the compile fails at once). Known once per
        backend choice and kind (backends are created once; a package does not appear later)."""
        key = (self.backend, spec.kind)
        inline = self._inline.get(key)
        if inline is None:
            inline = True
            for name in self._order(spec.kind):
                try:
                    inline = bool(self.backend_named(name).compile_bounded)
                    break
                except BackendUnavailable:
                    continue
            self._inline[key] = inline
        return inline

    def _claim(self, spec: ConstraintSpec) -> tuple[Future, bool]:
        """(the cached future of ``spec``, False), or (a new running future now in the cache, True):
        then the caller compiles ``spec`` and must ``_fulfil`` it (other callers wait on it)."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:
                self._cache.move_to_end(spec)
                return fut, False
            fut = Future()
            fut.set_running_or_notify_cancel()  # running: cancel() cannot take it from under the compile
            self._cache[spec] = fut
        return fut, True  # settled by ``_fulfil`` itself (no done-callback: it knows the outcome)

    def _fulfil(self, fut: Future, spec: ConstraintSpec) -> None:
        """Compile ``spec`` on this thread into ``fut``: its result or its exception reaches every
        waiter. An interrupt (``KeyboardInterrupt``, ``SystemExit``) fails the other waiters with a
        ``ConstraintError`` and goes on up this thread."""
        try:
            grammar = self._compile_now(spec)
        except Exception as exc:
            self._account(spec, fut, None)
            fut.set_exception(exc)
        except BaseException:
            self._account(spec, fut, None)
            fut.set_exception(ConstraintError(f"compiling the {spec.describe()} constraint was interrupted; retry"))
            raise
        else:
            self._account(spec, fut, grammar)
            fut.set_result(grammar)

    def _settle(self, spec: ConstraintSpec, fut: Future) -> None:
        """A compilation ended (the done-callback of a pool's or worker's future)."""
        failed = fut.cancelled() or fut.exception() is not None
        self._account(spec, fut, None if failed else fut.result())

    def _account(self, spec: ConstraintSpec, fut: Future, grammar: CompiledGrammar | None) -> None:
        """``spec``'s compile ended with ``grammar`` (None: it failed): forget a failure; account a
        success and evict past the bounds."""
        failed = grammar is None
        with self._lock:
            if self._cache.get(spec) is not fut:
                return
            if failed:
                del self._cache[spec]
                return
            self._sizes[spec] = max(0, int(getattr(grammar, "nbytes", 0)))
            self._cached_bytes += self._sizes[spec]
            evicted = self._evict()
        # Freed past the lock (submit() from other threads waits on it) and off this thread: freeing a
        # used llguidance grammar takes 0.05-0.25 ms, inside the compile of the spec that evicted it.
        self.reclaimer.put(evicted)

    def _evict(self) -> list[Future]:
        """Drop finished entries, least recently used first, while over ``cache_bytes`` or ``cache_size``;
        returns them (the caller frees them once the lock is released). Each search stops at the first
        finished entry (usually the first one): no pass over the cache. (Freed by ``reclaimer``.)"""
        evicted = []
        while self._cached_bytes > self.cache_bytes or len(self._cache) > self.cache_size:
            # finished entries only (in-flight compilations stay: requests wait on them)
            key = next((key for key in self._cache if key in self._sizes), None)
            if key is None:
                break
            evicted.append(self._cache.pop(key))
            self._cached_bytes -= self._sizes.pop(key)
        return evicted

    def _load(self, spec: ConstraintSpec, name: str, payload: Any,
              relaxed: tuple[str, list[str]] | None = None) -> CompiledGrammar:
        """A worker's result as this process's compiled grammar (of the relaxed schema, when relaxed)."""
        if relaxed is None:
            return self.backend_named(name).load(spec, payload, self.info)
        relaxed_spec = ConstraintSpec(ConstraintKind.JSON_SCHEMA, relaxed[0])
        return _with_relaxation(self.backend_named(name).load(relaxed_spec, payload, self.info), spec, relaxed)

    def backend_named(self, name: str) -> GrammarBackend:
        """The backend instance named ``name`` (created once); ``BackendUnavailable`` if not installed."""
        with self._lock:
            backend = self._backends.get(name)
            if backend is None:
                try:
                    backend = load_backend(name)
                except BackendUnavailable as exc:
                    backend = exc
                self._backends[name] = backend
        if isinstance(backend, BackendUnavailable):
            raise backend
        return backend

    def warm_up_backends(self) -> None:
        """Build each backend's per-tokenizer state in this process now (``GrammarBackend.warm_up``): the
        backends a JSON schema tries, those not installed skipped."""
        for name in self._order(ConstraintKind.JSON_SCHEMA):
            try:
                self.backend_named(name).warm_up(self.info)
            except BackendUnavailable:
                continue

    def _order(self, kind: ConstraintKind) -> tuple[str, ...]:
        return (self.backend,) if self.backend != "auto" else DEFAULT_BACKENDS[kind]

    def _compile_now(self, spec: ConstraintSpec) -> CompiledGrammar:
        _, grammar, relaxed = prepare_relaxing(spec, self._order(spec.kind),
                                               lambda s, n: self.backend_named(n).compile(s, self.info))
        return grammar if relaxed is None else _with_relaxation(grammar, spec, relaxed)


def _with_relaxation(grammar: CompiledGrammar, spec: ConstraintSpec, relaxed: tuple[str, list[str]]) -> CompiledGrammar:
    """``grammar`` (compiled from the relaxed schema: its ``spec`` is the relaxed one) marked with the
    original schema and the keywords relaxed (``relax.Relaxation``)."""
    grammar.relaxation = Relaxation(spec.schema, relaxed[1], relaxed[0])
    return grammar
