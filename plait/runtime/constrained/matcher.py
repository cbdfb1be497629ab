"""GrammarState: one request's constraint while it generates.

Wraps a backend ``TokenMatcher`` with what the engine needs: the request's own stop tokens allowed
exactly where the grammar may end, a finish reason when the grammar is complete or a token is refused,
jump-forward (forced tokens, see ``jump_forward.py``) and the ending forced when the token budget runs
out (``budget.py``).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from plait.runtime.constrained.backends.base import CompiledGrammar
from plait.runtime.constrained.budget import BudgetSteering, SearchLimits
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
        budget_margin: end within the token budget (``BudgetSteering``) with this margin; None: never
            steer (the output is cut where the budget runs out).
        budget_limits: the bounds of each search for an ending (``SearchLimits``; default 200 states, 50 ms).
    """

    def __init__(self, grammar: CompiledGrammar, info: TokenizerInfo, stop_ids: frozenset[int],
                 jump_forward: bool = True, budget_margin: int | None = 1, budget_limits: SearchLimits | None = None):
        self.grammar = grammar
        self.info = info
        self.matcher = grammar.new_matcher()
        self.jump_forward = jump_forward
        self.forced_count = 0  # tokens appended by jump-forward (reported in meta_info)
        self.closing_count = 0  # tokens appended to end within the budget (reported in meta_info)
        stop = sorted(t for t in stop_ids if 0 <= t < info.vocab_size)
        ends = [t for t in stop if t in info.stop_ids] or stop  # the ending's stop token: an EOS if allowed
        self.steering = None if budget_margin is None else BudgetSteering(
            info, ends[0] if ends else None, budget_margin, limits=budget_limits, grammar=grammar)
        self.closing = False  # the last forced_tokens() were an ending for the budget, not jump-forward
        never = sorted((info.stop_ids | info.special_ids) - set(stop))
        self._when_accepting, self._when_not = self._word_masks(stop, [t for t in never if t < info.vocab_size])
        touched = [w for w, *_ in self._when_accepting]
        # a ctypes view of the row's first words, up to the last one edited (no copy, no numpy array)
        self._words_type = ctypes.c_int32 * (max(touched) + 1) if touched else None
        self._min_words = max(touched) + 1 if touched else 0
        # The backend's own fast paths (TokenMatcher.fill_ptr / has_error), and whether its mask already
        # has this request's stop bits right (the stop tokens are exactly CompiledGrammar.mask_end_ids):
        # then nothing is edited, except in an error state (where llguidance allows its end tokens).
        self._fill_ptr = self.matcher.fill_ptr if self.matcher.has_error is not None else None
        self._has_error = self.matcher.has_error
        self._exact = self._fill_ptr is not None and grammar.mask_end_ids is not None and set(stop) == grammar.mask_end_ids
        # The backend's mask at the grammar's start, computed when the grammar was compiled
        # (CompiledGrammar.start_mask): copied into the first row instead of computed again, if no token
        # was accepted before it. Code that moves ``self.matcher`` itself must restore it (as
        # BudgetSteering's searches do: consume, then roll back) or set this to None.
        self._start_mask = grammar.start_mask

    @staticmethod
    def _word_masks(stop: list[int], never: list[int]) -> tuple[tuple, tuple]:
        """The bitmask words ``fill_bitmask`` edits on top of the backend's mask, per grammar state:
        ``((word, keep, add), ...)`` where the grammar can end (``never`` ids cleared, ``stop`` ids set)
        and ``((word, keep), ...)`` where it cannot (both cleared); the masks as signed 32-bit ints. A few
        words (usually one), edited one by one: ``np.bitwise_or.at`` cost microseconds per call."""
        stop_bits: dict[int, int] = {}
        never_bits: dict[int, int] = {}
        for ids, bits in ((stop, stop_bits), (never, never_bits)):
            for t in ids:
                bits[t >> 5] = bits.get(t >> 5, 0) | (1 << (t & 31))

        def i32(value: int) -> int:
            value &= 0xFFFFFFFF
            return value - (1 << 32) if value >= 1 << 31 else value

        words = sorted(set(stop_bits) | set(never_bits))
        accepting = tuple((w, i32(~never_bits.get(w, 0)), i32(stop_bits.get(w, 0))) for w in words)
        not_accepting = tuple((w, i32(~(never_bits.get(w, 0) | stop_bits.get(w, 0)))) for w in words)
        return accepting, not_accepting

    @property
    def backend(self) -> str:
        return self.grammar.backend_name

    @property
    def complete(self) -> bool:
        """Whether the output so far is a complete match."""
        return self.matcher.can_terminate()

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write this request's allowed next tokens into ``row`` (int32 [ceil(V / 32)], CPU, contiguous)."""
        if not (row.dtype is torch.int32 and row.is_cpu and row.is_contiguous() and row.numel() >= self._min_words):
            raise ValueError(f"a bitmask row must be a contiguous int32 CPU tensor of at least {self._min_words} "
                             f"words, not {row.dtype} {tuple(row.shape)} on {row.device}")
        if self._start_mask is None or not self._fill_start(row):
            if self._fill_ptr is None:
                self.matcher.fill_bitmask(row)
            else:
                self._fill_ptr(row.data_ptr(), row.numel() << 2)
        self.edit_bitmask(row)

    def batch_matcher(self, words: int) -> Any:
        """The backend matcher whose mask ``build_batch_bitmask`` may compute together with others'
        (``TokenMatcher.fill_many``) for a row of ``words`` int32 words, then finish with
        ``edit_bitmask``; None when this state's mask must come from ``fill_bitmask`` (its start mask
        is pending, or the backend has no batch path)."""
        if self._start_mask is not None or type(self.matcher).fill_many is None or words < self._min_words:
            return None
        return self.matcher

    def edit_bitmask(self, row: torch.Tensor) -> None:
        """On top of the backend's mask in ``row``: this request's stop tokens where the grammar may end,
        and never the other end-of-sequence and special tokens."""
        self.edit_bitmask_at(row.data_ptr())

    def edit_bitmask_at(self, address: int) -> None:
        """``edit_bitmask`` on the row at ``address`` (a batch bitmask's row: no tensor view per row)."""
        if self._exact and not self._has_error():
            return
        if self._words_type is None:
            return
        words = self._words_type.from_address(address)
        if self.matcher.can_terminate():
            for w, keep, add in self._when_accepting:
                words[w] = (words[w] & keep) | add
        else:
            for w, keep in self._when_not:
                words[w] &= keep

    def _fill_start(self, row: torch.Tensor) -> bool:
        """Copy the grammar's start mask into ``row`` (once: the state moves on after its first mask);
        False, copying nothing, when the row's size is not the mask's."""
        mask, self._start_mask = self._start_mask, None
        if len(mask) != row.numel() << 2:
            return False
        ctypes.memmove(row.data_ptr(), mask, len(mask))
        return True

    def ending_instead_of(self, token: int, budget: int) -> list[int] | None:
        """Before a sampled (non-stop) ``token`` is appended with ``budget`` tokens left: None to append
        it, or the tokens to append instead (an ending that fits the budget, the last one possibly a
        stop token) when no ending would fit after it (``BudgetSteering.vet``)."""
        if self.steering is None:
            return None
        ending = self.steering.vet(self.matcher, token, budget)
        if ending is not None:
            self.closing = True
        return ending

    def accept_token(self, token: int) -> dict[str, Any] | None:
        """Advance by a generated (non-stop) token. Returns a finish reason: ``stop`` when the grammar is
        complete and allows nothing more, ``abort`` when the token is refused; None to go on."""
        self._start_mask = None  # past the grammar's start (a forced token may come before any mask)
        if self.steering is not None:
            self.steering.consumed(token)
        if not self.matcher.consume(token):
            detail = self.matcher.error() or f"token {token} is not allowed here"
            return {"type": "abort", "message": f"constrained decoding ({self.backend}): {detail}"}
        error = self.matcher.error()
        if error:
            return {"type": "abort", "message": f"constrained decoding ({self.backend}): {error}"}
        if self.matcher.is_terminated():
            return {"type": "stop", "matched": None}
        return None

    def forced_tokens(self, prev_token: int | None, budget: int, jump: bool = True) -> list[int]:
        """Tokens to append next without sampling, with ``budget`` tokens left to the request: an ending
        that fits the budget when it is about to run out (``closing`` is then True; the last token may
        be a stop token), else (``jump``) the canonical tokens the grammar forces next (empty when
        jump-forward is off or nothing is forced)."""
        self.closing = False
        if budget <= 0:
            return []
        if self.steering is not None:
            ending = self.steering.closing_tokens(self.matcher, budget)
            if ending:
                self.closing = True
                return ending
        if not (jump and self.jump_forward):
            return []
        return canonical_forced_tokens(self.info, self.matcher.forced_bytes(), prev_token, budget)

    @property
    def budget_closed(self) -> bool:
        """Whether tokens were appended to end within the token budget."""
        return self.closing_count > 0
