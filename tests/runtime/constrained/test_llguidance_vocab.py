"""llguidance's native vocabulary (read from the fast tokenizer's JSON) against the Python wrapper.

The native LLTokenizer never calls back into Python to tokenize; it must behave exactly like the
``_Vocabulary`` wrapper built from plait's own token table: the same bytes and specialness for every id
(ids past the tokenizer included), the same masks, forced bytes and acceptance on JSON schema, regex
and Lark grammars. Tokenizers llguidance reads differently fall back to the wrapper
(test_vocab_sources.py covers the fallback on a real decoder llguidance misreads).
"""

from __future__ import annotations

import json

import pytest
import torch

from plait.runtime.constrained import TokenizerInfo
from plait.runtime.constrained.backends import llguidance_backend
from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend
from plait.runtime.constrained.spec import ConstraintKind, ConstraintSpec
from tests.runtime.constrained.schema_corpus import CASES

pytestmark = pytest.mark.model  # the bundled model's tokenizer

PAD = 17  # logits wider than the tokenizer, as many models have


@pytest.fixture(scope="module")
def padded_info(bundled_model_dir) -> TokenizerInfo:
    from plait.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundled_model_dir)
    return TokenizerInfo.from_tokenizer(tok, vocab_size=len(tok.hf) + PAD)


@pytest.fixture(scope="module")
def backends(padded_info):
    native, wrapper = LLGuidanceBackend(), LLGuidanceBackend()
    wrapper.native_vocabulary = False
    assert native.vocabulary_kind(padded_info) == "native"
    assert wrapper.vocabulary_kind(padded_info) == "wrapper"
    return native, wrapper


def test_native_vocabulary_is_used_for_the_bundled_fast_tokenizer(tokenizer_info):
    assert LLGuidanceBackend().vocabulary_kind(tokenizer_info) == "native"


def test_every_token_has_the_same_bytes_and_specialness(backends, padded_info):
    native, wrapper = (b.tokenizer_for(padded_info) for b in backends)
    assert native.vocab_size == wrapper.vocab_size == padded_info.vocab_size
    assert native.eos_tokens == wrapper.eos_tokens == sorted(padded_info.stop_ids)
    n_tok = len(padded_info.tokenizer.hf)
    for i in range(padded_info.vocab_size):
        assert native.decode_bytes([i]) == wrapper.decode_bytes([i]), i
        if i < n_tok:
            assert native.is_special_token(i) == wrapper.is_special_token(i) == (i in padded_info.special_ids), i
    for text in ["Hello world", '{"a": [1, 2.5e-3, "Zoë"]}\n', "日本語  \t<|im_end|>"]:
        assert native.tokenize_str(text) == wrapper.tokenize_str(text) == padded_info.encode(text)


def _specs() -> list[tuple[ConstraintSpec, list[str]]]:
    specs = []
    for case in CASES[::6]:
        docs = [json.dumps(d, ensure_ascii=False) for d in case.valid[:2]]
        specs.append((ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(case.schema)), docs))
    specs += [
        (ConstraintSpec(ConstraintKind.REGEX, r"\(\d{3}\) \d{3}-\d{4}"), ["(555) 123-4567"]),
        (ConstraintSpec(ConstraintKind.REGEX, r"[a-z]+@[a-z]+\.(com|org)"), ["jane@example.org"]),
        (ConstraintSpec(ConstraintKind.CHOICES, json.dumps(["yes", "no", "maybe so"])), ["maybe so"]),
        (ConstraintSpec(ConstraintKind.GRAMMAR, 'start: "Answer: " NUM " " WORD\nNUM: /[0-9]+/\nWORD: /[a-zé]+/'),
         ["Answer: 42 café"]),
        (ConstraintSpec(ConstraintKind.GRAMMAR,
                        'root ::= "[" item ("," item)* "]"\nitem ::= [0-9]+ | "\\"" [a-z]* "\\""'),
         ['[1,"ab",23]']),
        # special tokens and an id past the tokenizer, named in the grammar
        (ConstraintSpec(ConstraintKind.GRAMMAR, 'start: "x" (<|im_start|> | <[49160]>) "y"'), ["xy"]),
    ]
    return specs


def _walk(backend: LLGuidanceBackend, info: TokenizerInfo, spec: ConstraintSpec, tokens: list[int]) -> list:
    """Every observable of a matcher along ``tokens``: mask words, forced bytes, accepting, accepted."""
    matcher = backend.load(spec, backend.prepare(spec, info), info).new_matcher()
    row = torch.zeros(info.bitmask_words, dtype=torch.int32)
    trace = []
    for token in tokens:
        matcher.fill_bitmask(row)
        trace.append((row.tolist(), matcher.forced_bytes(), matcher.can_terminate()))
        if not matcher.consume(token):
            trace.append(("refused", token, (matcher.error() or "").split("\n")[0]))  # no timings
            return trace
    matcher.fill_bitmask(row)
    trace.append((row.tolist(), matcher.forced_bytes(), matcher.can_terminate(), matcher.is_terminated()))
    return trace


def test_masks_and_acceptance_are_identical(backends, padded_info):
    native, wrapper = backends
    n_tok = len(padded_info.tokenizer.hf)
    walked, named = 0, set()
    for spec, docs in _specs():
        for doc in docs:
            for tokens in (padded_info.encode(doc), padded_info.encode(doc[:-1] + "!")):  # valid, then not
                a = _walk(native, padded_info, spec, tokens)
                assert a == _walk(wrapper, padded_info, spec, tokens), (spec, doc)
                for step in a:
                    if step[0] != "refused" and "<[" not in spec.source:  # ids past the tokenizer: never allowed
                        words = step[0]
                        assert not any((words[i >> 5] >> (i & 31)) & 1 for i in range(n_tok, padded_info.vocab_size))
                    elif step[0] != "refused":  # unless the grammar names one
                        named.add(bool((step[0][49160 >> 5] >> (49160 & 31)) & 1))
                walked += 1
    assert walked >= 20
    assert named == {True, False}  # <[49160]> allowed after "x" only


def test_native_tokenizer_never_calls_python(backends, padded_info, monkeypatch):
    """The wrapper's encoder is called back during mask computation; the native tokenizer's never is."""
    calls = []
    original = llguidance_backend._Vocabulary.__call__
    monkeypatch.setattr(llguidance_backend._Vocabulary, "__call__",
                        lambda self, text: calls.append(text) or original(self, text))
    counts = []
    for backend in backends:  # native, then wrapper
        calls.clear()
        for case in CASES[:6]:
            spec = ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(case.schema))
            for doc in case.valid:
                _walk(backend, padded_info, spec, padded_info.encode(json.dumps(doc, ensure_ascii=False)))
        backend.tokenizer_for(padded_info).tokenize_str("some text")
        counts.append(len(calls))
    assert counts[0] == 0 and counts[1] > 0, counts


def test_a_tokenizer_llguidance_reads_differently_falls_back(padded_info, monkeypatch):
    """A native table that disagrees with plait's token bytes is refused for the wrapper."""
    vocab = llguidance_backend._Vocabulary(padded_info)
    llg = llguidance_backend._import()
    backend = LLGuidanceBackend()
    native = backend.tokenizer_for(padded_info)
    assert llguidance_backend._native_mismatch(native, vocab, padded_info) is None
    vocab.tokens[300] = b"\xc2" + vocab.tokens[300]  # as if llguidance misread one byte-level token
    assert "token 300" in llguidance_backend._native_mismatch(native, vocab, padded_info)
    no_end = TokenizerInfo(padded_info.tokenizer, padded_info.vocab_size, padded_info.token_bytes,
                           padded_info.special_ids, frozenset())
    assert llguidance_backend._native_mismatch(native, vocab, no_end) == "no end ids"
    monkeypatch.setattr(llguidance_backend, "_native_mismatch", lambda *a: "differs")
    assert llguidance_backend.build_lltokenizer(llg, padded_info)[1] == "wrapper"


def test_an_llguidance_older_than_1_7_is_refused_with_its_reason(padded_info, monkeypatch):
    """llguidance 1.6 and older take one int ``eos_token`` and have no ``eos_tokens``: building a
    tokenizer failed every constrained request with a TypeError. Such a release is now unavailable with
    its reason (the engine then uses outlines-core where installed); the current one takes every end id."""
    import sys
    import types

    from plait.runtime.constrained.backends.base import BackendUnavailable

    llg = llguidance_backend._import()
    three_ends = TokenizerInfo(padded_info.tokenizer, padded_info.vocab_size, padded_info.token_bytes,
                               padded_info.special_ids, frozenset({2, 0, 1}))
    current, kind = llguidance_backend.build_lltokenizer(llg, three_ends)
    assert kind == "native" and sorted(current.eos_tokens) == [0, 1, 2]
    old = types.SimpleNamespace(LLTokenizer=type("LLTokenizer", (), {}), __version__="1.6.1")
    monkeypatch.setitem(sys.modules, "llguidance", old)
    with pytest.raises(BackendUnavailable, match=r"llguidance 1.6.1 is too old: plait needs llguidance>=1.7"):
        llguidance_backend._import()
