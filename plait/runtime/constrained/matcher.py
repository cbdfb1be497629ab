"""GrammarState: one request's constraint while it generates.

Wraps a backend ``TokenMatcher`` with what the engine needs: the request's own stop tokens allowed
exactly where the grammar may end, a finish reason when the grammar is complete or a token is refused,
and jump-forward (forced tokens, see ``jump_forward.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from plait.runtime.constrained.backends.base import CompiledGrammar
from plait.runtime.constrained.jump_forward import canonical_forced_tokens
from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = ["GrammarState"]


class GrammarState:
    """Per-request constraint state.

    Args:
        grammar: the compiled grammar (shared).
        info: the tokenizer's view for grammars.
        stop_ids: the request's stop tokens (EOS unless ``ignore_eos``, plus ``stop_token_ids``); they
            are allowed only where the grammar can end. Other end-of-sequence tokens never are.
        jump_forward: append forced tokens without sampling them.
    """

    def __init__(self, grammar: CompiledGrammar, info: TokenizerInfo, stop_ids: frozenset[int], jump_forward: bool = True):
        self.grammar = grammar
        self.info = info
        self.matcher = grammar.new_matcher()
        self.jump_forward = jump_forward
        self.forced_count = 0  # tokens appended by jump-forward (reported in meta_info)
        stop = sorted(t for t in stop_ids if 0 <= t < info.vocab_size)
        never = sorted((info.stop_ids | info.special_ids) - set(stop))
        self._stop = self._split(stop)
        self._never = self._split([t for t in never if t < info.vocab_size])

    @staticmethod
    def _split(ids: list[int]) -> tuple[tuple[int, np.int32, np.int32], ...]:
        """``(word, bits, ~bits)`` for each int32 word of a bitmask row that holds any of ``ids``, the
        masks as int32 scalars (bit 31 is the sign), so that ``fill_bitmask`` sets or clears a word in
        one numpy operation: a few words each (usually one), where ``np.bitwise_or.at`` cost
        microseconds per call."""
        words: dict[int, int] = {}
        for t in ids:
            words[t >> 5] = words.get(t >> 5, 0) | (1 << (t & 31))

        def signed(value: int) -> np.int32:
            return np.int32(value - (1 << 32) if value >= 1 << 31 else value)

        return tuple((w, signed(bits), signed(~bits & 0xFFFFFFFF)) for w, bits in sorted(words.items()))

    @property
    def backend(self) -> str:
        return self.grammar.backend_name

    @property
    def complete(self) -> bool:
        """Whether the output so far is a complete match."""
        return self.matcher.can_terminate()

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write this request's allowed next tokens into ``row`` (int32 [ceil(V / 32)], CPU)."""
        self.matcher.fill_bitmask(row)
        words = row.numpy()
        for w, _, clear in self._never:
            words[w] &= clear
        if self.matcher.can_terminate():
            for w, bits, _ in self._stop:
                words[w] |= bits
        else:
            for w, _, clear in self._stop:
                words[w] &= clear

    def accept_token(self, token: int) -> dict[str, Any] | None:
        """Advance by a generated (non-stop) token. Returns a finish reason: ``stop`` when the grammar is
        complete and allows nothing more, ``abort`` when the token is refused; None to go on."""
        if not self.matcher.consume(token):
            detail = self.matcher.error() or f"token {token} is not allowed here"
            return {"type": "abort", "message": f"constrained decoding ({self.backend}): {detail}"}
        error = self.matcher.error()
        if error:
            return {"type": "abort", "message": f"constrained decoding ({self.backend}): {error}"}
        if self.matcher.is_terminated():
            return {"type": "stop", "matched": None}
        return None

    def forced_tokens(self, prev_token: int | None, budget: int) -> list[int]:
        """Canonical tokens the grammar forces next (empty when jump-forward is off or nothing is forced)."""
        if not self.jump_forward or budget <= 0:
            return []
        return canonical_forced_tokens(self.info, self.matcher.forced_bytes(), prev_token, budget)
