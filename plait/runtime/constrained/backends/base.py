"""The contract between the constrained-decoding core and a grammar library.

A ``GrammarBackend`` compiles a ``ConstraintSpec`` into an immutable ``CompiledGrammar`` (expensive,
cached and shared); each request gets its own ``TokenMatcher`` from it (cheap). Compiling is split in
two so that the expensive, crash-prone half can run in a compile worker process: ``prepare`` (in the
worker: compile and validate everything, return a picklable payload) and ``load`` (in the engine:
rebuild the grammar from the payload, cheaply). Matchers never see
end-of-sequence tokens: the request decides which stop tokens are allowed where the grammar may end
(``GrammarState`` in ``matcher.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from plait.runtime.constrained.spec import ConstraintSpec
from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = ["BackendUnavailable", "CompiledGrammar", "GrammarBackend", "TokenMatcher", "UnsupportedConstraint"]


class BackendUnavailable(RuntimeError):
    """The backend's Python package is not installed."""


class UnsupportedConstraint(Exception):
    """This backend cannot compile this spec (a feature it lacks, or an error in the spec);
    the message names the feature. The compiler may try another backend."""


class TokenMatcher(ABC):
    """One request's position in a compiled grammar.

    Optional fast paths for ``GrammarState`` (per token, a Python call less each), both set or both None:
    ``fill_ptr(address, nbytes)`` writes what ``fill_bitmask`` writes, at a raw address of ``nbytes``
    writable bytes; ``has_error()`` says whether ``error()`` would return a message."""

    fill_ptr: Callable[[int, int], Any] | None = None
    has_error: Callable[[], bool] | None = None
    # Optional: many matchers' masks in one call, in parallel (a static method of the backend's matcher
    # class): ``fill_many([(matcher, row index), ...], address, row_bytes, rows)`` writes what each one's
    # ``fill_bitmask`` writes into row ``index`` of a buffer of ``rows`` rows of ``row_bytes`` bytes.
    fill_many: Callable[[list[tuple["TokenMatcher", int]], int, int, int], None] | None = None
    # Optional: ``try_consume_tokens(tokens)`` consumes the longest prefix of ``tokens`` the grammar allows
    # (as ``consume`` of each would, never entering an error state) and returns its length. Without it,
    # a caller checks each token against a mask before consuming it (``budget._ends_with``).
    try_consume_tokens: Callable[[list[int]], int] | None = None

    @abstractmethod
    def consume(self, token: int) -> bool:
        """Advance by one (non-EOS) token; False if the grammar does not allow it (state unchanged)."""

    @abstractmethod
    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (int32 [ceil(V / 32)], CPU, contiguous): bit set =
        allowed. End-of-sequence bits are not meaningful (the caller overwrites them)."""

    @abstractmethod
    def can_terminate(self) -> bool:
        """Whether the text so far is a complete match (generation may stop here)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether the match is complete and no further token is possible."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` consumed tokens."""

    @abstractmethod
    def forced_bytes(self) -> bytes:
        """The bytes every continuation starts with (empty when the grammar allows a choice here)."""

    def error(self) -> str | None:
        """A message if the matcher hit an internal limit and cannot go on; None normally."""
        return None


class CompiledGrammar(ABC):
    """The immutable result of compiling one spec for one tokenizer; shared by concurrent requests."""

    backend_name: str
    spec: ConstraintSpec
    nbytes: int = 0  # estimated memory held (the compiler's cache is bounded by the sum)
    # set when compiled from a relaxed JSON schema (relax.Relaxation: the original schema, the keywords
    # relaxed, its validator); ``spec`` is then the relaxed schema's. None: the spec is enforced exactly.
    relaxation: Any = None
    # The token ids the matchers' own masks set exactly where ``can_terminate()`` (outside an error
    # state), never setting any other special or end-of-sequence id; None when not known. A request whose
    # stop tokens are exactly these needs no bit fixing on top of the backend's mask (``GrammarState``).
    mask_end_ids: frozenset[int] | None = None
    # The bytes ``fill_bitmask`` writes for a fresh matcher (its mask at the grammar's start, exactly
    # ``TokenizerInfo.bitmask_words`` words), when compiling computed it anyway (llguidance's check that
    # the grammar allows some output); None when not known. ``GrammarState`` copies it into its first
    # row instead of computing the same mask again.
    start_mask: bytes | None = None

    @abstractmethod
    def new_matcher(self) -> TokenMatcher:
        """A fresh matcher at the start of the grammar."""


class GrammarBackend(ABC):
    """Compiles specs of the kinds it supports.

    ``compile_bounded``: whether the library bounds its own compile work (llguidance: its parser limits
    on grammar size and lexer fuel), so that a compile in this process may run on the caller's thread,
    where no clock can stop it (``GrammarCompiler.compile`` without ``isolate``). False: the compile runs
    on a compiler thread, and the caller stops waiting for it at the timeout."""

    name: str
    compile_bounded: bool = False

    @abstractmethod
    def prepare(self, spec: ConstraintSpec, info: TokenizerInfo) -> Any:
        """Compile and validate ``spec`` fully; return what ``load`` needs (picklable: it crosses a
        process boundary). Raises ``UnsupportedConstraint`` naming what it cannot do."""

    @abstractmethod
    def load(self, spec: ConstraintSpec, payload: Any, info: TokenizerInfo) -> CompiledGrammar:
        """The compiled grammar from ``prepare``'s payload (cheap next to ``prepare``)."""

    def compile(self, spec: ConstraintSpec, info: TokenizerInfo) -> CompiledGrammar:
        """``prepare`` and ``load`` in this process; raises ``UnsupportedConstraint``."""
        return self.load(spec, self.prepare(spec, info), info)

    def warm_up(self, info: TokenizerInfo) -> None:
        """Build now what ``load`` needs once per tokenizer (a server calls this at start, off its serving
        threads: built at the first load, it held the GIL beside the engine loop for a second or more)."""
