"""GrammarState.fill_bitmask's own bits on top of the backend's mask: the request's stop tokens set
exactly where the grammar may end, other end and special tokens always cleared, every other bit as the
backend wrote it -- including bit 31 of a word (the int32 sign) and several ids sharing one word."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.constrained.backends.base import CompiledGrammar, TokenMatcher
from plait.runtime.constrained.matcher import GrammarState
from plait.runtime.constrained.vocab import TokenizerInfo

VOCAB = 100


class _Matcher(TokenMatcher):
    def __init__(self, fill: int, accepting: bool):
        self.fill, self.accepting = fill, accepting

    def consume(self, token: int) -> bool:
        return True

    def fill_bitmask(self, row: torch.Tensor) -> None:
        row.fill_(self.fill)

    def can_terminate(self) -> bool:
        return self.accepting

    def is_terminated(self) -> bool:
        return False

    def rollback(self, num_tokens: int) -> None:
        pass

    def forced_bytes(self) -> bytes:
        return b""


class _Grammar(CompiledGrammar):
    backend_name = "test"

    def __init__(self, fill: int, accepting: bool):
        self.fill, self.accepting = fill, accepting

    def new_matcher(self) -> TokenMatcher:
        return _Matcher(self.fill, self.accepting)


def _bits(row: torch.Tensor) -> set[int]:
    words = [w & 0xFFFFFFFF for w in row.tolist()]
    return {i for i in range(VOCAB) if (words[i >> 5] >> (i & 31)) & 1}


@pytest.mark.parametrize("fill", [0, -1, 0x55555555])
@pytest.mark.parametrize("accepting", [True, False])
def test_stop_and_never_bits(fill, accepting):
    info = TokenizerInfo(None, VOCAB, [b"x"] * VOCAB, special_ids=frozenset({0, 31, 63, 64}),
                         stop_ids=frozenset({31, 95}))
    stop = frozenset({95, 30, 62, 999})  # 999: past the logits, ignored
    state = GrammarState(_Grammar(fill, accepting), info, stop)
    row = torch.full(((VOCAB + 31) // 32,), 12345, dtype=torch.int32)
    state.fill_bitmask(row)
    backend = {i for i in range(VOCAB) if ((fill & 0xFFFFFFFF) >> (i & 31)) & 1}
    never = {0, 31, 63, 64}
    expected = (backend - never - {95, 30, 62}) | ({95, 30, 62} if accepting else set())
    assert _bits(row) == expected


@pytest.mark.parametrize("row", [torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int32),
                                 torch.zeros(8, dtype=torch.int32)[::2]])
def test_a_row_of_the_wrong_kind_is_refused(row):
    info = TokenizerInfo(None, VOCAB, [b"x"] * VOCAB, special_ids=frozenset({99}), stop_ids=frozenset({99}))
    with pytest.raises(ValueError, match="contiguous int32 CPU tensor of at least 4 words"):
        GrammarState(_Grammar(-1, True), info, frozenset({98})).fill_bitmask(row)


class _PtrMatcher(_Matcher):
    """A matcher with the fast paths: writes ``fill`` through ``fill_ptr``; ``can_terminate`` must not be
    asked when the backend's own end bits are exact."""

    def __init__(self, fill: int, accepting: bool, error: bool = False):
        super().__init__(fill, accepting)
        self.error_state, self.asked = error, 0
        self.fill_ptr = self._fill_ptr
        self.has_error = lambda: self.error_state

    def _fill_ptr(self, address: int, nbytes: int) -> None:
        import ctypes

        words = (ctypes.c_int32 * (nbytes // 4)).from_address(address)
        for i in range(nbytes // 4):
            words[i] = self.fill

    def can_terminate(self) -> bool:
        self.asked += 1
        return self.accepting


class _PtrGrammar(_Grammar):
    def __init__(self, fill: int, accepting: bool, end_ids: frozenset[int] | None, error: bool = False):
        super().__init__(fill, accepting)
        self.mask_end_ids, self.error = end_ids, error

    def new_matcher(self) -> TokenMatcher:
        return _PtrMatcher(self.fill, self.accepting, self.error)


def test_backend_end_bits_taken_as_they_are_when_they_are_the_requests_stop_tokens():
    info = TokenizerInfo(None, VOCAB, [b"x"] * VOCAB, special_ids=frozenset({0, 31}), stop_ids=frozenset({31}))
    state = GrammarState(_PtrGrammar(0x55555555, False, frozenset({31})), info, frozenset({31}))
    row = torch.zeros((VOCAB + 31) // 32, dtype=torch.int32)
    state.fill_bitmask(row)
    assert state.matcher.asked == 0  # no bit fixing: the backend's mask is written and left alone
    assert _bits(row) == {i for i in range(VOCAB) if i % 2 == 0}  # bit 0 (special) too: the backend's word


@pytest.mark.parametrize("end_ids, error", [(frozenset({31, 95}), False), (None, False), (frozenset({31}), True)])
def test_bits_fixed_when_the_backend_end_bits_are_not_the_requests(end_ids, error):
    """Other end ids than the request's stop tokens (ignore_eos, stop_token_ids), none declared, or an
    error state (llguidance then allows its end tokens): fixed as without the fast path."""
    info = TokenizerInfo(None, VOCAB, [b"x"] * VOCAB, special_ids=frozenset({0, 31}), stop_ids=frozenset({31}))
    state = GrammarState(_PtrGrammar(-1, False, end_ids, error), info, frozenset({31}))
    row = torch.zeros((VOCAB + 31) // 32, dtype=torch.int32)
    state.fill_bitmask(row)
    assert state.matcher.asked == 1
    assert _bits(row) == set(range(VOCAB)) - {0, 31}


class _CountingPtrGrammar(_PtrGrammar):
    """``_PtrGrammar`` whose compile left a start mask of ``start`` words; its matchers count their fills."""

    def __init__(self, fill: int, start: int, end_ids: frozenset[int] | None):
        super().__init__(fill, False, end_ids)
        self.start_mask = torch.full(((VOCAB + 31) // 32,), start, dtype=torch.int32).numpy().tobytes()

    def new_matcher(self) -> TokenMatcher:
        matcher = _PtrMatcher(self.fill, self.accepting)
        matcher.fills = 0
        inner = matcher.fill_ptr

        def counted(address: int, nbytes: int) -> None:
            matcher.fills += 1
            inner(address, nbytes)

        matcher.fill_ptr = counted
        return matcher


@pytest.mark.parametrize("end_ids", [frozenset({31}), None])  # the request's own end bits, or fixed on top
def test_the_first_mask_is_the_grammars_start_mask_not_computed_again(end_ids):
    info = TokenizerInfo(None, VOCAB, [b"x"] * VOCAB, special_ids=frozenset({0, 31}), stop_ids=frozenset({31}))
    state = GrammarState(_CountingPtrGrammar(-1, 0x0F0F0F0F, end_ids), info, frozenset({31}))
    row = torch.zeros((VOCAB + 31) // 32, dtype=torch.int32)
    state.fill_bitmask(row)
    assert state.matcher.fills == 0
    assert _bits(row) == {i for i in range(VOCAB) if i % 8 < 4} - ({0} if end_ids is None else set())
    state.fill_bitmask(row)  # once only: a state's later masks are the matcher's
    assert state.matcher.fills == 1
    assert _bits(row) == set(range(VOCAB)) - ({0, 31} if end_ids is None else set())


def test_the_start_mask_is_not_used_past_the_start_or_for_another_row_size():
    info = TokenizerInfo(None, VOCAB, [b"x"] * VOCAB, special_ids=frozenset({31}), stop_ids=frozenset({31}))
    grammar = _CountingPtrGrammar(-1, 0x0F0F0F0F, frozenset({31}))
    moved = GrammarState(grammar, info, frozenset({31}))
    assert moved.accept_token(5) is None  # a token before any mask (jump-forward at the start)
    row = torch.zeros((VOCAB + 31) // 32, dtype=torch.int32)
    moved.fill_bitmask(row)
    assert moved.matcher.fills == 1 and _bits(row) == set(range(VOCAB))
    wider = GrammarState(grammar, info, frozenset({31}))
    row = torch.zeros((VOCAB + 31) // 32 + 1, dtype=torch.int32)
    wider.fill_bitmask(row)
    assert wider.matcher.fills == 1 and row.tolist() == [-1] * row.numel()
