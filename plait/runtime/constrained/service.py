"""ConstrainedDecoding: what the engine holds for constrained requests (one per engine).

It owns the tokenizer's grammar view and the compiler (both built on the first constrained request;
with ``workers >= 1`` the compiler runs in worker processes, see
compile_worker.py), turns a request's ``SamplingParams`` into a compiled grammar (``grammar_future``:
never blocks; ``grammar_for``: waits; both cached, ``ConstraintError`` on failure, timeout or a limit)
and gives each request its ``GrammarState``.

Settings (attributes, change them before submitting requests): ``jump_forward`` (append forced tokens
without sampling them; default on), ``budget_margin`` (end valid within ``max_new_tokens``, see
budget.py: the margin in tokens, default 1; None turns it off), ``budget_limits`` (the bounds of one
search for an ending: ``budget.SearchLimits``), ``compiler.backend`` (see compiler.py). The rest are engine
settings (``EngineConfig.grammar_*``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

from plait.runtime.constrained.backends.base import CompiledGrammar
from plait.runtime.constrained.budget import BudgetSteering, SearchLimits, candidates_for
from plait.runtime.constrained.compiler import DEFAULT_CACHE_BYTES, DEFAULT_TIMEOUT_S, GrammarCompiler
from plait.runtime.constrained.limits import GrammarLimits
from plait.runtime.constrained.matcher import GrammarState
from plait.runtime.constrained.spec import ConstraintError, spec_from_params
from plait.runtime.constrained.vocab import TokenizerInfo
from plait.sampling import SamplingParams

__all__ = ["ConstrainedDecoding"]

logger = logging.getLogger(__name__)


class ConstrainedDecoding:
    """Grammar compilation and per-request grammar state for one engine (thread-safe)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        backend: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        workers: int = 2,
        max_queued: int = 64,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        limits: GrammarLimits | None = None,
    ):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._backend = backend
        self._timeout_s = timeout_s
        self._isolate = workers > 0
        self._workers = max(workers, 1)
        self._max_queued = max_queued
        self._cache_bytes = cache_bytes
        self.limits = limits or GrammarLimits()
        self._lock = threading.Lock()
        self._compiler: GrammarCompiler | None = None
        self._closed = False
        self.jump_forward = True
        self.budget_margin: int | None = 1
        self.budget_limits = SearchLimits()

    @property
    def compiler(self) -> GrammarCompiler:
        """The grammar compiler (built, with the tokenizer's grammar view, on first use)."""
        with self._lock:
            if self._closed:
                raise ConstraintError("constrained decoding is shut down (the engine is stopping)")
            if self._compiler is None:
                if self._tokenizer is None:
                    raise ConstraintError("constrained decoding needs a tokenizer; this model has none")
                info = TokenizerInfo.from_tokenizer(self._tokenizer, self._vocab_size)
                candidates_for(info)  # the budget search's candidate tokens (~30 ms): now, not mid-step
                self._compiler = GrammarCompiler(
                    info, backend=self._backend, timeout_s=self._timeout_s, max_workers=self._workers,
                    cache_bytes=self._cache_bytes, isolate=self._isolate, max_queued=self._max_queued)
            return self._compiler

    def warm_up(self) -> threading.Thread | None:
        """Build the compiler (and start its worker processes) and the backends' per-tokenizer state
        (``GrammarCompiler.warm_up_backends``) on a background thread, so that the first
        constrained request does not pay for it (servers call this at start; in-process engines build it
        on first use). Returns the thread, or None without a tokenizer. A failure here is logged by the
        thread and raised again, clearly, by the first constrained request."""
        if self._tokenizer is None:
            return None

        def build() -> None:
            try:
                self.compiler.warm_up_backends()
            except Exception:  # the first constrained request raises it again with its context
                logger.exception("starting the grammar compiler failed")

        thread = threading.Thread(target=build, name="plait-grammar-warm-up", daemon=True)
        thread.start()
        return thread

    def grammar_for(self, params: SamplingParams) -> CompiledGrammar | None:
        """The compiled grammar of ``params``' constraint (None if unconstrained). Blocks up to the
        compiler's timeout; raises ``ConstraintError`` (a ValueError) when it cannot be served."""
        spec = spec_from_params(params, self.limits)
        if spec is None:
            return None
        return self.compiler.compile(spec)

    def grammar_future(self, params: SamplingParams) -> Future | None:
        """A future of the compiled grammar of ``params``' constraint (None if unconstrained); never
        blocks on a compilation. A constraint that is malformed or past the limits raises
        ``ConstraintError`` at once; a failed or timed-out compilation is the future's exception."""
        spec = spec_from_params(params, self.limits)
        if spec is None:
            return None
        return self.compiler.submit(spec)

    def new_state(self, grammar: CompiledGrammar, stop_ids: frozenset[int],
                  max_new_tokens: int | None = None, plan_search: bool = True) -> GrammarState:
        """A fresh per-request state; ``stop_ids`` are the request's EOS and stop_token_ids. With
        ``max_new_tokens`` (the request's budget) and budget steering on, the ending of the grammar's
        start state is planned now, on the caller's thread (``BudgetSteering.prepare``: searched once
        per grammar, then cached), so that the engine's loop does not search for it at token 0.
        ``plan_search=False`` (a caller that must not block: a server's command loop) plans only from
        endings already cached (``start_plan_pending`` says when to plan elsewhere first)."""
        state = GrammarState(grammar, self.compiler.info, stop_ids, jump_forward=self.jump_forward,
                             budget_margin=self.budget_margin, budget_limits=self.budget_limits)
        if state.steering is not None and max_new_tokens is not None:
            state.steering.prepare(grammar, max_new_tokens, search=plan_search)
        return state

    def start_plan_pending(self, params: SamplingParams) -> bool:
        """Whether a request with ``params`` would make ``new_state`` search for its start plan: budget
        steering on, a budget tight from the first token, its grammar compiled, and a start ending that
        ``BudgetSteering.prepare`` would look at not cached yet. Never searches or blocks
        (a compile still pending is False here: the caller waits for it anyway)."""
        if self.budget_margin is None or not BudgetSteering.needs_start_plan(params.max_new_tokens):
            return False
        future = self.grammar_future(params)
        if future is None or not future.done() or future.exception() is not None:
            return False
        steering = BudgetSteering(self.compiler.info, None, self.budget_margin, limits=self.budget_limits)
        return not steering.start_plan_cached(future.result(), params.max_new_tokens)

    def shutdown(self) -> None:
        """Stop the compiler's workers. A compiler still being built (``warm_up``) is waited for and
        stopped too: its worker processes, started after a shutdown that missed them, would outlive the
        engine's exit (which waits for them while they wait for it to end)."""
        with self._lock:  # held by a build in progress
            self._closed = True
            compiler = self._compiler
        if compiler is not None:
            compiler.shutdown()
