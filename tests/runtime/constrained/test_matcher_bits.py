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
