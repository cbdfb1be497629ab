"""The tokenizer as grammar backends see it: the bytes of every token, which ids never belong to a
grammar (special tokens), and canonical encoding of text (for jump-forward).

Built once per engine. Byte-level BPE vocabularies (GPT-2 style ``Ġ`` forms) and SentencePiece ones
(``▁`` and ``<0xNN>`` byte tokens) are both decoded to the exact bytes each token stands for.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TokenizerInfo"]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte map (the inverse of its ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(hf_tokenizer: Any) -> bool:
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def _token_bytes(token: str, byte_level: bool) -> bytes | None:
    """The bytes a vocabulary string stands for; None if it cannot be decoded."""
    if byte_level:
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in token)
        except KeyError:
            return None
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass
class TokenizerInfo:
    """Token bytes and special ids of one tokenizer, with ``vocab_size`` = the width of the logits.

    ``token_bytes[i]`` is None for special tokens and ids past the tokenizer (padding in the logits):
    grammars never allow them. ``stop_ids`` are the tokenizer's end-of-sequence ids.
    """

    tokenizer: Any  # plait.runtime.tokenizer.Tokenizer
    vocab_size: int
    token_bytes: list[bytes | None]
    special_ids: frozenset[int]
    stop_ids: frozenset[int]
    _single_byte: dict[int, int] = field(default_factory=dict, repr=False)
    # jump-forward's canonical tokens per (forced text, previous token) (``jump_forward.py``), bounded
    forced_cache: dict[tuple[str, int | None], tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> TokenizerInfo:
        """Build from a ``plait.runtime.tokenizer.Tokenizer``; ``vocab_size`` defaults to the tokenizer's."""
        hf = tokenizer.hf
        n_tok = len(hf)
        vocab_size = n_tok if vocab_size is None else vocab_size
        byte_level = _is_byte_level(hf)
        special = frozenset(int(i) for i in tokenizer.all_special_ids) | frozenset(tokenizer.eos_token_ids)
        added = getattr(hf, "added_tokens_decoder", {}) or {}
        special |= frozenset(int(i) for i, tok in added.items() if getattr(tok, "special", False))
        strings = hf.convert_ids_to_tokens(list(range(min(n_tok, vocab_size))))
        token_bytes: list[bytes | None] = [None] * vocab_size
        for i, s in enumerate(strings):
            if i not in special and s is not None:
                token_bytes[i] = _token_bytes(s, byte_level)
        single = {b[0]: i for i, b in enumerate(token_bytes) if b is not None and len(b) == 1}
        return cls(tokenizer, vocab_size, token_bytes, special, frozenset(tokenizer.eos_token_ids), single)

    @property
    def bitmask_words(self) -> int:
        """int32 words per bitmask row: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    def single_byte_token(self, byte: int) -> int | None:
        """The id of the token that is exactly this one byte, if the vocabulary has one."""
        return self._single_byte.get(byte)

    def bytes_of(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def encode(self, text: str) -> list[int]:
        """Canonical token ids of ``text`` (what the tokenizer produces, no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)
