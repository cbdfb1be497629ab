"""llguidance backend: JSON schema, Lark/GBNF grammars, regex and choices (an Earley parser over a
lazily built token trie; masks are computed per step, compilation is near-instant)."""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import threading
from typing import Any

import torch

from plait.runtime.constrained.backends.base import (
    BackendUnavailable,
    CompiledGrammar,
    GrammarBackend,
    TokenMatcher,
    UnsupportedConstraint,
)
from plait.runtime.constrained.spec import ConstraintKind, ConstraintSpec
from plait.runtime.constrained.vocab import TokenizerInfo

logger = logging.getLogger(__name__)

# json.dumps' separators (", " and ": ", the format models see most) and at most one more space at each
# boundary between JSON tokens: whitespace can never run away. The optional space is what keeps every
# json.dumps document tokenizable: where bytes are forced, llguidance's mask allows only the forced
# bytes' own canonical tokenization, and with no free whitespace ("whitespace_flexible": False) a
# forced stretch runs across token boundaries (`"` + `}`, `": "` + a pattern's first characters), so
# a document whose tokens merge the end of that stretch with the next bytes was refused (`{"p": "#!"}`
# under pattern "^#!"). A possible space ends each forced stretch where a JSON token ends, as in
# llguidance's default whitespace. Separators and keys are still forced once they have begun.
WHITESPACE_PATTERN = "[ ]?"
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_pattern": WHITESPACE_PATTERN}
# The options as the schema's own "x-guidance" member, spliced into the schema text (llguidance reads it
# there; passing ``overrides`` makes it parse and rewrite the whole schema: 0.07 ms against 0.01 for a
# 3.6 KB schema). It goes last, where ``overrides`` puts it: the member's place matters to llguidance
# (spliced first, it refused valid documents of 3 MaskBench schemas that it accepts with the options
# last, all draft-04, one a "$ref" with sibling keywords).
_OPTIONS_MEMBER = '"x-guidance":' + json.dumps(JSON_OPTIONS, separators=(",", ":"))


def json_schema_grammar(llg: Any, schema_text: str) -> str:
    """llguidance's grammar for a JSON schema (text) under ``JSON_OPTIONS``. The options go in as the
    schema's last member when the text is an object without its own ``x-guidance`` (whose options
    the overrides must win over: then, and for ``true``, through ``overrides``): the same schema as
    ``overrides`` gives llguidance (checked on all 11,305 MaskBench schemas), without its rewrite."""
    body = schema_text.strip()
    if body.startswith("{") and body.endswith("}") and '"x-guidance"' not in body:
        head = body[:-1].rstrip()
        spliced = head + ("" if head == "{" else ",") + _OPTIONS_MEMBER + "}"
        return llg.LLMatcher.grammar_from_json_schema(spliced)
    return llg.LLMatcher.grammar_from_json_schema(schema_text, overrides=JSON_OPTIONS)


MIN_VERSION = "1.7"  # LLTokenizer(eos_token=[...]) and LLTokenizer.eos_tokens


def _import() -> Any:
    try:
        import llguidance
    except ImportError:
        raise BackendUnavailable(f"the llguidance package is not installed (pip install 'llguidance>={MIN_VERSION}')") from None
    if not hasattr(llguidance.LLTokenizer, "eos_tokens"):  # 1.6 and older: one int end id, no eos_tokens
        version = getattr(llguidance, "__version__", "older than 1.7")
        raise BackendUnavailable(f"llguidance {version} is too old: plait needs llguidance>={MIN_VERSION} "
                                 f"(several end ids per tokenizer); pip install -U 'llguidance>={MIN_VERSION}'")
    return llguidance


def lark_from_ebnf(text: str) -> str:
    """A Lark grammar from Lark text or from GBNF/EBNF (``root ::= ...``, as llama.cpp / xgrammar)."""
    if "::=" not in text:
        return text
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(text)
    except Exception as exc:  # noqa: BLE001 -- the converter raises several types for syntax errors
        raise UnsupportedConstraint(f"cannot read the EBNF grammar: {exc}") from None


class _Vocabulary:
    """A tokenizer as llguidance's ``TokenizerWrapper`` reads it: every token's bytes (special tokens as
    ``0xff`` + name, ids past the tokenizer empty), the special and end ids, and ``__call__`` encoding.

    The fallback for tokenizers llguidance cannot read natively: llguidance calls ``__call__`` back
    (holding the GIL) whenever it tokenizes text, mask computation included."""

    def __init__(self, info: TokenizerInfo):
        hf = info.tokenizer.hf
        names = hf.convert_ids_to_tokens(list(range(min(len(hf), info.vocab_size))))
        self.tokens: list[bytes] = []
        for i in range(info.vocab_size):
            data = info.token_bytes[i]
            if data is None:
                name = names[i] if i < len(names) else None
                data = b"\xff" + name.encode("utf-8") if name else b""
            self.tokens.append(data)
        self.eos_token_id = min(info.stop_ids) if info.stop_ids else None
        self.bos_token_id = info.tokenizer.bos_token_id
        self.special_token_ids = sorted(info.special_ids)
        self._encode = info.encode

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # llguidance probes for byte input: say no
            raise TypeError("text must be str")
        return self._encode(text)


# Texts whose tokenization the native tokenizer must reproduce exactly before it replaces the wrapper:
# merges across spaces, newlines, digits, JSON punctuation, multi-byte characters and special-token text.
_ENCODE_PROBES = ("Hello world", ' {"name": "Zoë", "age": 42}\n', "日本語 text\n\n  \t", "3.14159e-10",
                  "<|im_end|>x </s>", "ééé ♥ 🙂", "  leading and trailing  ")


def _native_mismatch(native: Any, vocab: _Vocabulary, info: TokenizerInfo) -> str | None:
    """Why the natively built ``native`` LLTokenizer would behave differently from the ``vocab`` wrapper
    (the first difference found), or None when they agree on every id's bytes and specialness, the end
    ids, the vocabulary width and the encoding of the probe texts."""
    if native.vocab_size != info.vocab_size:
        return f"vocab_size {native.vocab_size} != {info.vocab_size}"
    if not info.stop_ids:  # llguidance would take the JSON's end token, the wrapper has none
        return "no end ids"
    if sorted(native.eos_tokens) != sorted(info.stop_ids):
        return f"end ids {sorted(native.eos_tokens)} != {sorted(info.stop_ids)}"
    for i, data in enumerate(vocab.tokens):
        special = bool(native.is_special_token(i))
        got = native.decode_bytes([i])
        if data[:1] == b"\xff":  # a special token: llguidance decodes it to its name
            ok = special and got == data[1:]
        elif not data:  # never allowed: past the tokenizer (llguidance names these "<[id]>") or unnamed
            ok = special and got == f"<[{i}]>".encode()
        else:
            ok = not special and got == data
        if not ok:
            return f"token {i}: {got!r} (special={special}) != {data!r}"
    for text in _ENCODE_PROBES:
        if list(native.tokenize_str(text)) != vocab(text):
            return f"encoding of {text!r} differs"
    return None


def build_lltokenizer(llg: Any, info: TokenizerInfo, native: bool = True) -> tuple[Any, str]:
    """The LLTokenizer of ``info`` and how it was built: ``"native"`` or ``"wrapper"``.

    ``native``: from the Hugging Face *fast* tokenizer's JSON, read by llguidance's Rust side, so that
    tokenizing text during mask computation never calls back into Python. It is used only when it
    matches plait's own token-bytes table id for id (bytes, special tokens, ids past the tokenizer), the
    end ids and the canonical encoding of probe texts. Otherwise -- a slow tokenizer, or a JSON whose
    decoder llguidance reads differently (transformers 5.17's GGUF import of SmolLM2: ByteFallback +
    ByteLevel decoders made it read byte-level tokens wrongly) -- the ``_Vocabulary`` wrapper built from
    that table is used. ``native=False`` forces the wrapper."""
    vocab = _Vocabulary(info)
    eos = sorted(info.stop_ids) or None
    backend_tokenizer = getattr(info.tokenizer.hf, "backend_tokenizer", None)
    if native and backend_tokenizer is not None:
        try:
            copied = copy.copy(backend_tokenizer)  # padding and truncation off, as llguidance.hf does
            copied.no_padding()
            copied.no_truncation()
            tok = llg.LLTokenizer(copied.to_str(), n_vocab=info.vocab_size, eos_token=eos)
        except Exception as exc:  # noqa: BLE001 -- llguidance raises several types for unreadable JSON
            logger.info("llguidance cannot read the tokenizer natively (%s); using the Python wrapper", exc)
        else:
            why = _native_mismatch(tok, vocab, info)
            if why is None:
                return tok, "native"
            logger.info("llguidance reads the tokenizer differently (%s); using the Python wrapper", why)
    tok = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=info.vocab_size, eos_token=eos)
    return tok, "wrapper"


_executor: Any = None
_executor_lock = threading.Lock()


def _parallel_executor() -> Any:
    """llguidance's ``LLExecutor`` (a pool of native threads, 80% of the CPUs up to 32), made once."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = _import().LLExecutor()
        return _executor


class LLGuidanceMatcher(TokenMatcher):
    def __init__(self, matcher: Any):
        self._m = matcher
        self.fill_ptr = matcher.unsafe_compute_mask_ptr  # (address, nbytes): the mask written in place
        self.has_error = matcher.is_error
        self.try_consume_tokens = matcher.try_consume_tokens  # a token at a time, no mask: ~2.5x faster

    @staticmethod
    def fill_many(matchers: list[tuple[TokenMatcher, int]], address: int, row_bytes: int, rows: int) -> None:
        """The masks of many matchers at once, on llguidance's threads (the GIL is released)."""
        _parallel_executor().unsafe_compute_mask_ptr([(m._m, index) for m, index in matchers], address,
                                                     row_bytes, rows)

    def consume(self, token: int) -> bool:
        return bool(self._m.consume_token(token))

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def can_terminate(self) -> bool:
        return bool(self._m.is_accepting())

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and not self._m.rollback(num_tokens):
            raise RuntimeError(f"llguidance could not roll back {num_tokens} tokens: {self._m.get_error()}")

    def forced_bytes(self) -> bytes:
        return bytes(self._m.compute_ff_bytes())

    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class LLGuidanceGrammar(CompiledGrammar):
    backend_name = "llguidance"

    def __init__(self, spec: ConstraintSpec, prototype: Any, grammar_text: str | None = None,
                 end_ids: frozenset[int] | None = None, start_mask: bytes | None = None):
        self.spec = spec
        self.start_mask = start_mask  # ``prototype``'s mask (CompiledGrammar.start_mask), when computed
        self._prototype = prototype
        self.grammar_text = grammar_text  # llguidance's grammar (JSON text), when known
        # ``end_ids``: what llguidance's mask sets where the grammar can end (``LLGuidanceBackend.end_ids``).
        # No other special token can be allowed by a JSON schema, regex or choice list: llguidance gives
        # special tokens bytes that start with 0xff, never valid UTF-8, and refuses regexes that could
        # match invalid UTF-8. A Lark grammar can name special tokens (``<|...|>``): not claimed there.
        if spec.kind in (ConstraintKind.JSON_SCHEMA, ConstraintKind.REGEX, ConstraintKind.CHOICES):
            self.mask_end_ids = end_ids
        # measured: ~130 KB per compiled JSON schema of a few fields; the text's size stands for the rest
        self.nbytes = 128 * 1024 + 16 * len(grammar_text or "") + len(start_mask or b"")

    def new_matcher(self) -> TokenMatcher:
        return LLGuidanceMatcher(self._prototype.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"
    # Compile work is bounded by llguidance's own parser limits (its default ``LLParserLimits``: at most
    # 500,000 grammar symbols, 1,000,000 lexer fuel to build the lexer's regexes, ~20 ms) on top of
    # plait's ``GrammarLimits`` on the source; the lexer and the Earley sets are built lazily, a mask at
    # a time, under per-step fuel. So a compile may run on the caller's thread (``GrammarCompiler``).
    compile_bounded = True
    # False: always the Python wrapper vocabulary (for comparisons: benchmarks/llguidance_overhead.py)
    native_vocabulary = True

    def __init__(self) -> None:
        self._llg = _import()
        self._lock = threading.Lock()
        self._tokenizers: dict[int, Any] = {}
        self._kinds: dict[int, str] = {}
        self._end_ids: dict[int, frozenset[int] | None] = {}

    def tokenizer_for(self, info: TokenizerInfo) -> Any:
        """The LLTokenizer of ``info`` (about 0.5 s to build; once per tokenizer): native when llguidance
        reads the tokenizer exactly as plait's token table says, else the Python wrapper
        (``build_lltokenizer``); ``vocabulary_kind`` says which, ``end_ids`` which ids its masks set
        where a grammar can end."""
        with self._lock:
            tok = self._tokenizers.get(id(info))
            if tok is None:
                tok, kind = build_lltokenizer(self._llg, info, native=self.native_vocabulary)
                self._end_ids[id(info)] = self._probe_end_ids(tok, info)
                self._tokenizers[id(info)] = tok
                self._kinds[id(info)] = kind
            return tok

    def warm_up(self, info: TokenizerInfo) -> None:
        self.tokenizer_for(info)

    def end_ids(self, info: TokenizerInfo) -> frozenset[int] | None:
        """The ids llguidance's mask sets where a grammar can end (probed with the tokenizer: ``_probe_end_ids``)."""
        self.tokenizer_for(info)
        return self._end_ids[id(info)]

    def _probe_end_ids(self, tok: Any, info: TokenizerInfo) -> frozenset[int] | None:
        """The bits of the empty regex's mask (it allows nothing but ending): llguidance sets every
        end-of-sequence id of its tokenizer there, which ``build_lltokenizer`` makes ``info.stop_ids``;
        None when the probe finds anything else."""
        matcher = self._llg.LLMatcher(tok, self._llg.LLMatcher.grammar_from_regex(""), log_level=0)
        row = torch.zeros(info.bitmask_words, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        words = [w & 0xFFFFFFFF for w in row.tolist()]
        ids = frozenset(32 * i + b for i, w in enumerate(words) if w for b in range(32) if w >> b & 1)
        return ids if ids and ids == info.stop_ids and matcher.is_accepting() else None

    def vocabulary_kind(self, info: TokenizerInfo) -> str:
        """``"native"`` or ``"wrapper"``: how ``tokenizer_for(info)`` was built (building it if needed)."""
        self.tokenizer_for(info)
        return self._kinds[id(info)]

    def grammar_text(self, spec: ConstraintSpec) -> str:
        """The llguidance grammar (JSON text) for ``spec``."""
        matcher_cls = self._llg.LLMatcher
        if spec.kind is ConstraintKind.JSON_SCHEMA:
            try:
                return json_schema_grammar(self._llg, spec.source)
            except ValueError as exc:
                raise UnsupportedConstraint(str(exc)) from None
        if spec.kind in (ConstraintKind.REGEX, ConstraintKind.CHOICES):
            return matcher_cls.grammar_from_regex(spec.as_regex())
        return matcher_cls.grammar_from_lark(lark_from_ebnf(spec.source))

    def prepare(self, spec: ConstraintSpec, info: TokenizerInfo) -> str:
        """The validated llguidance grammar text of ``spec`` (the slow part: EBNF conversion, JSON
        schema translation, the grammar's compilation), after checking that it allows some output.
        The grammar is compiled once: building the matcher is the validation."""
        return self._checked(spec, info)[0]

    def load(self, spec: ConstraintSpec, payload: str, info: TokenizerInfo) -> CompiledGrammar:
        return LLGuidanceGrammar(spec, self._matcher(self.tokenizer_for(info), payload), payload, self.end_ids(info))

    def compile(self, spec: ConstraintSpec, info: TokenizerInfo) -> CompiledGrammar:
        """In this process: the matcher that validated the grammar becomes the compiled grammar's
        prototype (one compilation, not ``prepare``'s and then ``load``'s), and the mask computed to
        validate it is the grammar's ``start_mask`` (a request's first mask is then not computed again)."""
        grammar, matcher, mask = self._checked(spec, info)
        return LLGuidanceGrammar(spec, matcher, grammar, self.end_ids(info), bytes(mask))

    def _checked(self, spec: ConstraintSpec, info: TokenizerInfo) -> tuple[str, Any, bytearray]:
        """(grammar text, its matcher at the start, that matcher's mask) once the matcher built without
        error and its first mask allows some token or the empty output."""
        grammar = self.grammar_text(spec)
        matcher = self._matcher(self.tokenizer_for(info), grammar)
        # The mask in a bytearray, checked by one comparison: torch.zeros and Tensor.any cost ~35 us each
        # here (cold after the matcher's construction), ~5% of a small schema's whole compile.
        nbytes = 4 * info.bitmask_words
        row = bytearray(nbytes)
        matcher.unsafe_compute_mask_ptr(ctypes.addressof((ctypes.c_char * nbytes).from_buffer(row)), nbytes)
        if matcher.is_error() or (row == bytes(nbytes) and not matcher.is_accepting()):
            raise UnsupportedConstraint("llguidance: the constraint matches no output at all")
        return grammar, matcher, row

    def _matcher(self, tok: Any, grammar: str) -> Any:
        try:
            matcher = self._llg.LLMatcher(tok, grammar, log_level=0)
        except ValueError as exc:
            raise UnsupportedConstraint(f"llguidance: {exc}") from None
        if matcher.is_error():
            raise UnsupportedConstraint(f"llguidance: {matcher.get_error()}")
        return matcher
