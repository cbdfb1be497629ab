"""Token healing at the prompt boundary for constrained requests.

A prompt that ends mid-word (``"The capital of France is Par"``) or right before the constrained text
(``"Answer as JSON: "``) ends with a token the model would rarely have produced there: the tokenizer cut
the text where the prompt stops, not where the model would have. Healing (as in guidance) backs off the
last prompt token(s) whose text is a prefix of other vocabulary tokens and constrains the generation to
start with exactly that text, so the model can pick a token that spans the boundary (``" Paris"``).

- ``choose_backoff`` / ``backoff_candidates``: how many trailing prompt tokens may be healed (at most
  ``max_tokens``, 1 by default). Never a special token, never the whole prompt, and only when the text is
  whole UTF-8 characters and some other vocabulary token starts with it.
- ``compile_healed``: the request's grammar with the healed text as a literal prefix, compiled by the
  backend that compiled the original (llguidance: prefixed regex, or a Lark grammar ``start: /prefix/
  @body`` referencing the original grammar; outlines-core: the escaped text prepended to its regex).
  A backend that cannot combine them gives no healing for that request, never a looser constraint.
- ``TokenHealer``: the engine's switch (``enabled``, ``max_tokens``) and cache. A back-off is used only if
  the healed grammar allows at least one token spanning the boundary; otherwise it would change nothing.
- ``HealedDetokenizer``: output text without the healed text (the caller has it in its prompt).

See docs/constrained.md ("Token healing") for what ``meta_info`` reports.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plait.runtime.constrained.backends.base import (
    BackendUnavailable,
    CompiledGrammar,
    UnsupportedConstraint,
)
from plait.runtime.constrained.spec import ConstraintKind
from plait.runtime.constrained.vocab import TokenizerInfo
from plait.runtime.tokenizer import IncrementalDetokenizer

__all__ = [
    "HealedDetokenizer",
    "Healing",
    "TokenHealer",
    "VocabPrefixIndex",
    "backoff_candidates",
    "choose_backoff",
    "compile_healed",
    "escape_regex_literal",
    "new_detokenizer",
]

logger = logging.getLogger(__name__)

_BODY_GRAMMAR = "healed_body"  # the name the original grammar gets inside a healed llguidance grammar


class VocabPrefixIndex:
    """The vocabulary's token bytes, sorted, to find every token that starts with given bytes."""

    def __init__(self, info: TokenizerInfo) -> None:
        pairs = sorted((b, i) for i, b in enumerate(info.token_bytes) if b)
        self._bytes = [b for b, _ in pairs]
        self._ids = [i for _, i in pairs]

    def extensions(self, prefix: bytes) -> list[int]:
        """Ids of the tokens whose bytes start with ``prefix`` and are longer than it."""
        if not prefix:
            return []
        lo = bisect.bisect_right(self._bytes, prefix)  # skips tokens equal to prefix
        out = []
        for k in range(lo, len(self._bytes)):
            if not self._bytes[k].startswith(prefix):
                break
            out.append(self._ids[k])
        return out

    def has_extension(self, prefix: bytes) -> bool:
        lo = bisect.bisect_right(self._bytes, prefix)
        return bool(prefix) and lo < len(self._bytes) and self._bytes[lo].startswith(prefix)


def backoff_candidates(
    info: TokenizerInfo, index: VocabPrefixIndex, prompt_ids: Sequence[int], max_tokens: int = 1
) -> list[int]:
    """Numbers of trailing prompt tokens that could be healed, largest first (empty: none).

    ``k`` qualifies when the last ``k`` tokens are ordinary tokens (no special token), at least one prompt
    token stays, their bytes are whole UTF-8 characters, and another vocabulary token starts with them.
    """
    out: list[int] = []
    tail = b""
    for k in range(1, min(max_tokens, len(prompt_ids) - 1) + 1):
        token = prompt_ids[-k]
        piece = info.token_bytes[token] if 0 <= token < info.vocab_size else None
        if piece is None:  # a special token (or padding id): never healed, nor anything before it
            break
        tail = piece + tail
        try:
            tail.decode("utf-8")
        except UnicodeDecodeError:
            continue  # mid-character: the grammar prefix must be text
        if index.has_extension(tail):
            out.append(k)
    return out[::-1]


def choose_backoff(
    info: TokenizerInfo, index: VocabPrefixIndex, prompt_ids: Sequence[int], max_tokens: int = 1
) -> int:
    """How many trailing prompt tokens to heal by the vocabulary alone (0: none); see ``backoff_candidates``."""
    candidates = backoff_candidates(info, index, prompt_ids, max_tokens)
    return candidates[0] if candidates else 0


def escape_regex_literal(text: str) -> str:
    """A regex (Rust ``regex`` syntax, as llguidance and outlines-core use) matching exactly ``text``.

    ASCII letters, digits and ``_`` stay; every other character becomes ``\\x{HEX}``, which also keeps
    ``/`` out of Lark's ``/.../``."""
    return "".join(c if (c.isascii() and (c.isalnum() or c == "_")) else f"\\x{{{ord(c):x}}}" for c in text)


# ---------------------------------------------------------------------- healed grammars per backend
def _llguidance_healed(backend: Any, grammar: CompiledGrammar, info: TokenizerInfo, prefix: str) -> CompiledGrammar:
    import llguidance as llg  # installed: this backend compiled the original grammar

    from plait.runtime.constrained.backends.llguidance_backend import (
        LLGuidanceGrammar,
        lark_from_ebnf,
    )

    spec = grammar.spec
    literal = escape_regex_literal(prefix)
    if spec.kind in (ConstraintKind.REGEX, ConstraintKind.CHOICES):
        text = llg.LLMatcher.grammar_from_regex(f"{literal}(?:{spec.as_regex()})")
    else:
        # The original grammar becomes a named sub-grammar after the literal prefix.
        text = getattr(grammar, "grammar_text", None)  # the compiled grammar's own text: no conversion again
        if text and spec.kind is ConstraintKind.GRAMMAR and not text.lstrip().startswith("{"):
            body = {"lark_grammar": text}  # (EBNF's conversion is slow: thousands of rules take seconds)
        elif spec.kind is ConstraintKind.JSON_SCHEMA:
            body = json.loads(backend.grammar_text(spec))["grammars"][0]
        else:
            body = {"lark_grammar": lark_from_ebnf(spec.source)}
        body["name"] = _BODY_GRAMMAR
        text = json.dumps({"grammars": [{"lark_grammar": f"start: /{literal}/ @{_BODY_GRAMMAR}"}, body]})
    tok = backend.tokenizer_for(info)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, tok)
    if is_error:
        raise UnsupportedConstraint(f"llguidance: {messages[0] if messages else 'invalid healed grammar'}")
    try:
        prototype = llg.LLMatcher(tok, text, log_level=0)
    except ValueError as exc:  # validation above should have caught it; never heal on a doubt
        raise UnsupportedConstraint(f"llguidance: {exc}") from None
    if prototype.is_error():
        raise UnsupportedConstraint(f"llguidance: {prototype.get_error()}")
    return LLGuidanceGrammar(spec, prototype)


def _outlines_healed(backend: Any, grammar: CompiledGrammar, info: TokenizerInfo, prefix: str) -> CompiledGrammar:
    import outlines_core  # installed: this backend compiled the original grammar

    from plait.runtime.constrained.backends.outlines_backend import OutlinesGrammar

    regex = f"{escape_regex_literal(prefix)}(?:{backend.regex_for(grammar.spec)})"
    vocab, eos = backend.vocabulary_for(info)
    try:
        index = outlines_core.Index(regex, vocab)
    except Exception as exc:  # noqa: BLE001 -- outlines raises several types for unsupported regexes
        raise UnsupportedConstraint(f"outlines-core: {exc}") from None
    return OutlinesGrammar(grammar.spec, index, info, eos)


_HEALED_BUILDERS = {"llguidance": _llguidance_healed, "outlines": _outlines_healed}


def compile_healed(compiler: Any, grammar: CompiledGrammar, prefix: str) -> CompiledGrammar:
    """``grammar``'s constraint with ``prefix`` as a literal start, compiled by the same backend.

    Raises ``UnsupportedConstraint`` when that backend cannot combine them (the caller does not heal).
    """
    build = _HEALED_BUILDERS.get(grammar.backend_name)
    if build is None:
        raise UnsupportedConstraint(f"the {grammar.backend_name} backend cannot prefix a grammar")
    return build(compiler.backend_named(grammar.backend_name), grammar, compiler.info, prefix)


# ---------------------------------------------------------------------- per-request decision
@dataclass(frozen=True)
class Healing:
    """What healing did to one prompt: the prompt the model sees, the grammar to generate under, how many
    prompt tokens were removed and their text (the output starts with it; the returned text does not)."""

    prompt_ids: list[int]
    grammar: CompiledGrammar | None
    tokens: int = 0
    text: str = ""


class TokenHealer:
    """Token healing for one engine's constrained requests. Thread-safe.

    Attributes (change them before submitting requests): ``enabled`` (default True) and ``max_tokens``
    (how many trailing prompt tokens may be backed off; default 1).
    """

    def __init__(self, constrained: Any, max_tokens: int = 1, cache_size: int = 256) -> None:
        self._constrained = constrained  # ConstrainedDecoding: its compiler holds the tokenizer's view
        self.enabled = True
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._index: VocabPrefixIndex | None = None
        self._cache: OrderedDict[tuple[Any, str, bytes], CompiledGrammar | None] = OrderedDict()

    def index(self) -> VocabPrefixIndex:
        """The vocabulary prefix index (built on first use)."""
        with self._lock:
            if self._index is None:
                self._index = VocabPrefixIndex(self._constrained.compiler.info)
            return self._index

    def heal(
        self, prompt_ids: Sequence[int], grammar: CompiledGrammar | None, *, max_new_tokens: int = 1,
        prompt_logprobs: bool = False,
    ) -> Healing:
        """Heal ``prompt_ids`` for a request constrained by ``grammar``.

        Nothing is healed for unconstrained requests, when disabled, for requests that generate nothing
        (``max_new_tokens == 0``) or ask for prompt logprobs (their positions are the prompt as given),
        and when no back-off lets the model pick a token spanning the boundary.
        """
        unchanged = Healing(list(prompt_ids), grammar)
        if grammar is None or not self.enabled or self.max_tokens < 1 or max_new_tokens == 0 or prompt_logprobs:
            return unchanged
        info = self._constrained.compiler.info
        index = self.index()
        for k in backoff_candidates(info, index, prompt_ids, self.max_tokens):
            tail = info.bytes_of(prompt_ids[-k:])
            healed = self._healed_grammar(grammar, tail)
            if healed is not None:
                return Healing(list(prompt_ids[:-k]), healed, k, tail.decode("utf-8"))
        return unchanged

    def _healed_grammar(self, grammar: CompiledGrammar, tail: bytes) -> CompiledGrammar | None:
        """The healed grammar, or None when it cannot be built or allows no token spanning the boundary.
        Cached per (spec, backend, healed bytes)."""
        key = (grammar.spec, grammar.backend_name, tail)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        healed = None
        spanning = self._spanning_candidates(grammar, tail)
        if spanning:
            try:
                healed = compile_healed(self._constrained.compiler, grammar, tail.decode("utf-8"))
            except (UnsupportedConstraint, BackendUnavailable) as exc:
                logger.debug("no token healing for the %s constraint: %s", grammar.spec.describe(), exc)
            if healed is not None and not self._allows_any(healed, spanning):
                healed = None
        with self._lock:
            self._cache[key] = healed
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return healed

    def _allowed_at_start(self, grammar: CompiledGrammar) -> np.ndarray:
        """The start state's mask of ``grammar`` as uint32 words."""
        row = torch.zeros(self._constrained.compiler.info.bitmask_words, dtype=torch.int32)
        grammar.new_matcher().fill_bitmask(row)
        return row.numpy().view(np.uint32)

    def _allows_any(self, grammar: CompiledGrammar, ids: list[int]) -> bool:
        words = self._allowed_at_start(grammar)
        arr = np.asarray(ids, dtype=np.int64)
        return bool(((words[arr >> 5] >> (arr & 31).astype(np.uint32)) & 1).any())

    def _spanning_candidates(self, grammar: CompiledGrammar, tail: bytes) -> list[int]:
        """Tokens that start with ``tail``, go beyond it, and whose next byte the original grammar may
        start with (a cheap filter before compiling the healed grammar; that one decides exactly)."""
        spanning = self.index().extensions(tail)
        if not spanning:
            return []
        info = self._constrained.compiler.info
        words = self._allowed_at_start(grammar)
        ids = np.nonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))[0]
        first = {info.token_bytes[i][0] for i in ids.tolist() if i < info.vocab_size and info.token_bytes[i]}
        return [t for t in spanning if info.token_bytes[t][len(tail)] in first]


# ---------------------------------------------------------------------- output text
class HealedDetokenizer(IncrementalDetokenizer):
    """An ``IncrementalDetokenizer`` whose output starts after ``healed_text``.

    The first generated tokens spell the healed text (then more); the caller already has it, so it is
    treated as decoding context: it is never emitted and never searched for stop strings.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), *, healed_text: str = "", **kwargs: Any):
        super().__init__(tokenizer, prompt_ids, **kwargs)
        self.healed_text = healed_text
        # The base class emits decode(context + output)[len(prefix text):]; extending the prefix text
        # by the healed text drops it from the output. Until the output covers it, nothing is emitted.
        # (With a decode stream the committed text starts with the healed text: its characters are hidden.)
        self._prefix_text += healed_text
        self._hidden = len(healed_text)


def new_detokenizer(tokenizer: Any, prompt_ids: Sequence[int], healed_text: str, **kwargs: Any) -> IncrementalDetokenizer:
    """An ``IncrementalDetokenizer`` for a request (``kwargs``: its stop settings); a ``HealedDetokenizer``
    when its prompt was healed."""
    if healed_text:
        return HealedDetokenizer(tokenizer, prompt_ids, healed_text=healed_text, **kwargs)
    return IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
