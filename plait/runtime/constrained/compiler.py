"""GrammarCompiler: spec -> compiled grammar, cached per (spec, tokenizer), off the scheduler loop.

Compilations run on a small thread pool (both libraries release the GIL while they build). The cache
holds futures, so concurrent requests with the same spec wait for one compilation. A failed
compilation is not cached (so a fixed backend or a retry can succeed). ``compile`` waits at most
``timeout_s``; a compilation that takes longer fails that request only (``ConstraintError``) and goes
on in the background: when it finishes, it lands in the cache for the next request.

Backend choice: ``DEFAULT_BACKENDS`` (measured; see docs/constrained.md) gives the order per kind;
when the first backend refuses a spec (a feature it lacks) the next one is tried, and if every
backend refuses, the error lists every reason.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from plait.runtime.constrained.backends.base import (
    BackendUnavailable,
    CompiledGrammar,
    GrammarBackend,
    UnsupportedConstraint,
)
from plait.runtime.constrained.spec import (
    ConstraintError,
    ConstraintKind,
    ConstraintSpec,
)
from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = ["BACKEND_NAMES", "DEFAULT_BACKENDS", "GrammarCompiler", "load_backend"]

BACKEND_NAMES = ("llguidance", "outlines")
# Order in which backends are tried per kind of spec (benchmarks/constrained.py measured it).
DEFAULT_BACKENDS: dict[ConstraintKind, tuple[str, ...]] = {
    ConstraintKind.JSON_SCHEMA: ("llguidance", "outlines"),
    ConstraintKind.REGEX: ("llguidance", "outlines"),
    ConstraintKind.CHOICES: ("llguidance", "outlines"),
    ConstraintKind.GRAMMAR: ("llguidance",),
}
DEFAULT_TIMEOUT_S = 30.0


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
        backend: ``"auto"`` (``DEFAULT_BACKENDS`` with fallback) or one backend name (no fallback).
        timeout_s: how long ``compile`` waits for one compilation.
        cache_size: compiled grammars kept (least recently used are dropped).
    """

    def __init__(
        self,
        info: TokenizerInfo,
        backend: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        cache_size: int = 256,
        max_workers: int = 2,
    ) -> None:
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"unknown grammar backend {backend!r}; use 'auto' or one of {', '.join(BACKEND_NAMES)}")
        self.info = info
        self.backend = backend
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="plait-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[ConstraintSpec, Future] = OrderedDict()
        self._backends: dict[str, GrammarBackend | BackendUnavailable] = {}
        self.compile_seconds: dict[ConstraintSpec, float] = {}

    # ------------------------------------------------------------------ public
    def submit(self, spec: ConstraintSpec) -> Future:
        """A future of the compiled grammar (shared with every other request for the same spec)."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:
                self._cache.move_to_end(spec)
                return fut
            fut = self._pool.submit(self._compile_now, spec)
            self._cache[spec] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        fut.add_done_callback(lambda f, s=spec: self._forget_failure(s, f))
        return fut

    def compile(self, spec: ConstraintSpec, timeout_s: float | None = None) -> CompiledGrammar:
        """Compile (or fetch) ``spec``; raises ``ConstraintError`` if it fails or takes longer than the timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self.submit(spec).result(timeout=timeout)
        except FutureTimeout:
            raise ConstraintError(
                f"compiling the {spec.describe()} constraint took longer than {timeout:g} s; simplify it "
                "(fewer alternatives, smaller bounded repetitions) or retry: it keeps compiling in the background"
            ) from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ internals
    def _forget_failure(self, spec: ConstraintSpec, fut: Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            with self._lock:
                if self._cache.get(spec) is fut:
                    del self._cache[spec]

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

    def _order(self, kind: ConstraintKind) -> tuple[str, ...]:
        return (self.backend,) if self.backend != "auto" else DEFAULT_BACKENDS[kind]

    def _compile_now(self, spec: ConstraintSpec) -> CompiledGrammar:
        reasons: list[str] = []
        for name in self._order(spec.kind):
            try:
                backend = self.backend_named(name)
            except BackendUnavailable as exc:
                reasons.append(str(exc))
                continue
            start = time.perf_counter()
            try:
                grammar = backend.compile(spec, self.info)
            except UnsupportedConstraint as exc:
                reasons.append(str(exc))
                continue
            self.compile_seconds[spec] = time.perf_counter() - start
            return grammar
        raise ConstraintError(f"cannot serve the {spec.describe()} constraint: " + "; ".join(reasons))
