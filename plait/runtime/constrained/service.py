"""ConstrainedDecoding: what the engine holds for constrained requests (one per engine).

It owns the tokenizer's grammar view and the compiler (both built on the first constrained request),
turns a request's ``SamplingParams`` into a compiled grammar (``grammar_for``: cached, compiled off the
engine loop, ``ConstraintError`` on failure or timeout) and gives each request its ``GrammarState``.

Settings (attributes, change them before submitting requests): ``jump_forward`` (append forced tokens
without sampling them; default on), ``compiler.backend`` / ``compiler.timeout_s`` (see compiler.py).
"""

from __future__ import annotations

import threading
from typing import Any

from plait.runtime.constrained.backends.base import CompiledGrammar
from plait.runtime.constrained.compiler import DEFAULT_TIMEOUT_S, GrammarCompiler
from plait.runtime.constrained.matcher import GrammarState
from plait.runtime.constrained.spec import ConstraintError, spec_from_params
from plait.runtime.constrained.vocab import TokenizerInfo
from plait.sampling import SamplingParams

__all__ = ["ConstrainedDecoding"]


class ConstrainedDecoding:
    """Grammar compilation and per-request grammar state for one engine (thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._backend = backend
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._compiler: GrammarCompiler | None = None
        self.jump_forward = True

    @property
    def compiler(self) -> GrammarCompiler:
        """The grammar compiler (built, with the tokenizer's grammar view, on first use)."""
        with self._lock:
            if self._compiler is None:
                if self._tokenizer is None:
                    raise ConstraintError("constrained decoding needs a tokenizer; this model has none")
                info = TokenizerInfo.from_tokenizer(self._tokenizer, self._vocab_size)
                self._compiler = GrammarCompiler(info, backend=self._backend, timeout_s=self._timeout_s)
            return self._compiler

    def grammar_for(self, params: SamplingParams) -> CompiledGrammar | None:
        """The compiled grammar of ``params``' constraint (None if unconstrained). Blocks up to the
        compiler's timeout; raises ``ConstraintError`` (a ValueError) when it cannot be served."""
        spec = spec_from_params(params)
        if spec is None:
            return None
        return self.compiler.compile(spec)

    def new_state(self, grammar: CompiledGrammar, stop_ids: frozenset[int]) -> GrammarState:
        """A fresh per-request state; ``stop_ids`` are the request's EOS and stop_token_ids."""
        return GrammarState(grammar, self.compiler.info, stop_ids, jump_forward=self.jump_forward)

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
