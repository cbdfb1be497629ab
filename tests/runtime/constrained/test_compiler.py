"""Compiler: caching and sharing, backend fallback, a missing package, timeouts; the spec; jump-forward."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time

import pytest

from plait.runtime.constrained import (
    ConstraintError,
    ConstraintKind,
    ConstraintSpec,
    GrammarCompiler,
    spec_from_params,
)
from plait.runtime.constrained.backends.base import CompiledGrammar, GrammarBackend
from plait.runtime.constrained.jump_forward import canonical_forced_tokens
from plait.sampling import SamplingParams

pytestmark = pytest.mark.model  # the bundled model's tokenizer

MINIMUM = ConstraintSpec(ConstraintKind.JSON_SCHEMA, '{"type":"integer","minimum":3}')


def test_same_spec_compiles_once_and_is_shared(compilers):
    spec = ConstraintSpec(ConstraintKind.REGEX, r"[a-c]{2}\d")
    futures = [compilers["auto"].submit(spec) for _ in range(4)]
    assert len({id(f) for f in futures}) == 1
    assert compilers["auto"].compile(spec) is futures[0].result()


def test_fallback_to_outlines_when_llguidance_is_missing(tokenizer_info, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    compiler = GrammarCompiler(tokenizer_info)
    try:
        grammar = compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "(yes|no)"))
        assert grammar.backend_name == "outlines"
        with pytest.raises(ConstraintError, match="llguidance package is not installed.*minimum"):
            compiler.compile(MINIMUM)  # outlines would drop "minimum": refused, naming it
    finally:
        compiler.shutdown()


def test_an_outlines_grammar_loads_without_building_the_vocabulary(tokenizer_info, monkeypatch):
    """Loading a worker's outlines-core index needs only the end-of-sequence id, not the Vocabulary
    (a walk of every token, seconds on a large tokenizer) that compiling it needed in the worker."""
    from plait.runtime.constrained.backends.outlines_backend import OutlinesBackend

    spec = ConstraintSpec(ConstraintKind.REGEX, "(yes|no)!")
    payload = OutlinesBackend().prepare(spec, tokenizer_info)
    loader = OutlinesBackend()  # this process's: nothing built yet
    monkeypatch.setattr(loader, "vocabulary_for", lambda info: pytest.fail("the Vocabulary was built to load"))
    loaded = loader.load(spec, payload, tokenizer_info)
    compiled = OutlinesBackend().compile(spec, tokenizer_info)
    assert loaded._eos == compiled._eos
    for grammar in (loaded, compiled):
        matcher = grammar.new_matcher()
        assert all(matcher.consume(t) for t in tokenizer_info.tokenizer.encode("yes!", add_special_tokens=False))
        assert matcher.can_terminate()


def test_a_refusal_by_the_installed_backend_is_final(tokenizer_info, monkeypatch):
    """llguidance refuses a lookahead: outlines-core (next in DEFAULT_BACKENDS) is not asked, since a
    second opinion rescued nothing on MaskBench and can take seconds; the error is llguidance's."""
    from plait.runtime.constrained.backends.outlines_backend import OutlinesBackend

    asked = []
    monkeypatch.setattr(OutlinesBackend, "compile", lambda self, spec, info: asked.append(spec))
    compiler = GrammarCompiler(tokenizer_info)
    try:
        with pytest.raises(ConstraintError, match="(?s)llguidance.*not supported"):
            compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "a(?=b)"))
        assert asked == []
    finally:
        compiler.shutdown()


def test_failed_compilation_is_not_cached(compilers):
    bad = ConstraintSpec(ConstraintKind.GRAMMAR, "start: undefined_rule")
    for _ in range(2):
        with pytest.raises(ConstraintError):
            compilers["llguidance"].compile(bad)
    assert bad not in compilers["llguidance"]._cache


class _SlowBackend(GrammarBackend):
    name = "slow"

    def __init__(self, release: threading.Event):
        self.release = release

    def prepare(self, spec, info):
        self.release.wait(5)
        raise AssertionError("not reached in time")

    def load(self, spec, payload, info) -> CompiledGrammar:
        raise AssertionError("not reached")


def test_timeout_fails_only_that_compilation(tokenizer_info):
    release = threading.Event()
    compiler = GrammarCompiler(tokenizer_info, backend="llguidance", timeout_s=0.2)
    compiler._backends["llguidance"] = _SlowBackend(release)
    try:
        start = time.perf_counter()
        with pytest.raises(ConstraintError, match="longer than 0.2 s"):
            compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "a"))
        assert time.perf_counter() - start < 2
    finally:
        release.set()
        compiler.shutdown()


class _Grammar(CompiledGrammar):
    backend_name = "bounded"

    def __init__(self, spec):
        self.spec = spec

    def new_matcher(self):
        raise AssertionError("not used")


class _BoundedBackend(GrammarBackend):
    """A backend that says it bounds its own compile work (as llguidance does); each compile records
    its thread, waits for ``release`` and then returns a grammar (or raises ``fail``)."""

    name = "bounded"
    compile_bounded = True

    def __init__(self, release: threading.Event | None = None, fail: BaseException | None = None):
        self.release, self.fail = release, fail
        self.threads: list[threading.Thread] = []
        self.started = threading.Event()

    def prepare(self, spec, info):
        self.threads.append(threading.current_thread())
        self.started.set()
        if self.release is not None:
            assert self.release.wait(5)
        if self.fail is not None:
            raise self.fail
        return None

    def load(self, spec, payload, info) -> CompiledGrammar:
        return _Grammar(spec)


def _bounded_compiler(tokenizer_info, backend: _BoundedBackend, timeout_s: float = 30.0) -> GrammarCompiler:
    compiler = GrammarCompiler(tokenizer_info, backend="llguidance", timeout_s=timeout_s)
    compiler._backends["llguidance"] = backend
    return compiler


def test_a_bounded_backend_compiles_on_the_callers_thread(tokenizer_info):
    """Without isolation, compile() runs a compile_bounded backend on the calling thread (no compiler
    thread to hand over to and wake up from); the result is cached like any other."""
    backend = _BoundedBackend()
    compiler = _bounded_compiler(tokenizer_info, backend)
    spec = ConstraintSpec(ConstraintKind.REGEX, "a")
    try:
        grammar = compiler.compile(spec)
        assert backend.threads == [threading.current_thread()]
        assert compiler.compile(spec) is grammar and compiler.submit(spec).result() is grammar
        assert len(backend.threads) == 1
    finally:
        compiler.shutdown()


def test_llguidance_compiles_on_the_callers_thread(tokenizer_info, llguidance_compile_threads):
    threads = llguidance_compile_threads
    compiler = GrammarCompiler(tokenizer_info, backend="llguidance")
    try:
        assert compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "(yes|no)")).backend_name == "llguidance"
        assert threads == [threading.current_thread()]
    finally:
        compiler.shutdown()


def test_callers_of_a_spec_being_compiled_inline_share_it(tokenizer_info):
    """While one caller compiles a spec on its thread, another compile() of it waits for that compile
    (bounded by its timeout) and submit() returns the same future without blocking."""
    release = threading.Event()
    backend = _BoundedBackend(release)
    compiler = _bounded_compiler(tokenizer_info, backend)
    spec = ConstraintSpec(ConstraintKind.REGEX, "a")
    results: dict[str, object] = {}
    first = threading.Thread(target=lambda: results.update(first=compiler.compile(spec)))
    second = threading.Thread(target=lambda: results.update(second=compiler.compile(spec)))
    try:
        first.start()
        assert backend.started.wait(5)
        future = compiler.submit(spec)
        assert not future.done()
        second.start()
        with pytest.raises(ConstraintError, match="longer than 0.1 s"):
            compiler.compile(spec, timeout_s=0.1)  # waiting for another caller's compile: bounded
        release.set()
        first.join(5)
        second.join(5)
        assert results["first"] is results["second"] is future.result(timeout=5)
        assert backend.threads == [first]
    finally:
        release.set()
        compiler.shutdown()


def test_where_to_compile_is_decided_once_per_backend_choice_and_kind(tokenizer_info, monkeypatch):
    """compile() asks which backend serves a kind (and whether it bounds its compiles) once, not per
    compile; another backend choice is asked again."""
    backend = _BoundedBackend()
    compiler = _bounded_compiler(tokenizer_info, backend)
    asked = []
    real = compiler.backend_named
    monkeypatch.setattr(compiler, "backend_named", lambda name: asked.append(name) or real(name))
    try:
        for i in range(3):
            compiler.compile(ConstraintSpec(ConstraintKind.REGEX, f"a{i}"))
        assert len(asked) == 1 + 3  # the decision once, then each compile's own backend
        compiler.backend = "outlines"
        assert compiler._compiles_inline(ConstraintSpec(ConstraintKind.REGEX, "b")) is False
    finally:
        compiler.shutdown()


def test_submit_never_compiles_on_the_callers_thread(tokenizer_info):
    release = threading.Event()
    backend = _BoundedBackend(release)
    compiler = _bounded_compiler(tokenizer_info, backend)
    try:
        future = compiler.submit(ConstraintSpec(ConstraintKind.REGEX, "a"))
        assert backend.started.wait(5) and not future.done()
        release.set()
        assert future.result(timeout=5).spec.source == "a"
        assert backend.threads[0] is not threading.current_thread()
    finally:
        release.set()
        compiler.shutdown()


def test_an_inline_failure_or_interrupt_is_not_cached(tokenizer_info):
    from plait.runtime.constrained.backends.base import UnsupportedConstraint

    spec = ConstraintSpec(ConstraintKind.REGEX, "a")
    backend = _BoundedBackend(fail=UnsupportedConstraint("no such feature"))
    compiler = _bounded_compiler(tokenizer_info, backend)
    try:
        with pytest.raises(ConstraintError, match="no such feature"):
            compiler.compile(spec)
        assert spec not in compiler._cache
        backend.fail = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):  # goes on up the compiling thread
            compiler.compile(spec)
        assert spec not in compiler._cache
        backend.fail = None
        assert compiler.compile(spec).spec is spec and len(backend.threads) == 3
    finally:
        compiler.shutdown()


def test_compiling_into_a_full_cache_does_not_pass_over_it(tokenizer_info, monkeypatch):
    """Evicting the least recently used grammar looks at the first finished entry only: a pass over the
    cache (an OrderedDict hashes every key it iterates over) cost ~0.1 ms per compile at 256 entries."""
    compiler = _bounded_compiler(tokenizer_info, _BoundedBackend())
    compiler.cache_size = 64
    try:
        for i in range(80):
            compiler.compile(ConstraintSpec(ConstraintKind.REGEX, f"a{i}"))
        hashed = []
        original = ConstraintSpec.__hash__
        monkeypatch.setattr(ConstraintSpec, "__hash__", lambda self: hashed.append(self) or original(self))
        compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "new"))
        assert len(compiler._cache) == 64 and len(hashed) < 10
    finally:
        compiler.shutdown()


def test_an_evicted_grammar_is_freed_outside_the_compilers_lock(tokenizer_info):
    """Freeing a used grammar takes a while (llguidance: 0.05-0.25 ms): not while submit() waits."""
    locked_when_freed = []

    class _Freed(_Grammar):
        def __del__(self):
            locked_when_freed.append(compiler._lock.locked())

    class _Backend(_BoundedBackend):
        def load(self, spec, payload, info):
            return _Freed(spec)

    compiler = _bounded_compiler(tokenizer_info, _Backend())
    compiler.cache_size = 2
    try:
        for i in range(5):
            compiler.compile(ConstraintSpec(ConstraintKind.REGEX, f"a{i}"))
        assert compiler.reclaimer.drain(timeout_s=5)
        assert locked_when_freed == [False, False, False]
    finally:
        compiler.shutdown()


def test_an_evicted_grammar_is_freed_off_the_compiling_thread(tokenizer_info):
    """The compile that evicts a grammar returns before that grammar is freed (a slow free blocks until
    released), the free runs on the reclaimer's thread, and shutdown frees what still waits."""
    release, started = threading.Event(), threading.Event()
    freed_on: list[threading.Thread] = []

    class _SlowToFree(_Grammar):
        def __del__(self):
            started.set()
            release.wait(10)
            freed_on.append(threading.current_thread())

    class _Backend(_BoundedBackend):
        def load(self, spec, payload, info):
            return _SlowToFree(spec) if spec.source == "slow" else _Grammar(spec)

    compiler = _bounded_compiler(tokenizer_info, _Backend())
    compiler.cache_size = 1
    try:
        compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "slow"))
        compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "next"))  # evicts "slow": returns at once
        assert freed_on == []
        assert started.wait(5) and freed_on == []  # being freed on the reclaimer's thread
        release.set()
        assert compiler.reclaimer.drain(timeout_s=5)
        assert freed_on and freed_on[0] is not threading.current_thread()
        for i in range(3):  # evicted while the reclaimer lingers: freed by shutdown at the latest
            compiler.compile(ConstraintSpec(ConstraintKind.REGEX, f"b{i}"))
    finally:
        release.set()
        compiler.shutdown()
    assert len(compiler.reclaimer) == 0


def test_a_spec_hashes_once_and_pickles_without_its_hash(monkeypatch):
    import os
    import pickle
    import subprocess

    calls = []
    monkeypatch.setattr(ConstraintKind, "__hash__", lambda self: calls.append(self) or hash(self.value))
    spec = ConstraintSpec(ConstraintKind.REGEX, "a+b")
    assert {spec: 1}[ConstraintSpec(ConstraintKind.REGEX, "a+b")] == 1 and hash(spec) == hash(spec)
    assert len(calls) == 2  # once per spec made, never per lookup
    monkeypatch.undo()
    spec = ConstraintSpec(ConstraintKind.JSON_SCHEMA, '{"type":"string"}')
    # another process (compile workers) hashes strings differently: the unpickled spec takes its hash there
    code = ("import pickle, sys; from plait.runtime.constrained.spec import ConstraintSpec, ConstraintKind; "
            "s = pickle.loads(sys.stdin.buffer.read()); "
            "assert {s: 1}[ConstraintSpec(ConstraintKind.JSON_SCHEMA, s.source)] == 1")
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(spec), check=True, timeout=60,
                   env={**os.environ, "PYTHONHASHSEED": "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"})


def test_spec_from_params_normalizes_and_rejects():
    assert spec_from_params(SamplingParams()) is None
    spec = spec_from_params(SamplingParams(json_schema={"type": "object", "properties": {"b": {}, "a": {}}}))
    assert spec.source == '{"type":"object","properties":{"b":{},"a":{}}}'  # key order kept: it is generation order
    assert spec_from_params(SamplingParams(choices=["a.b", "c"])).as_regex() == r"(a\.b|c)"
    assert spec_from_params(SamplingParams(json_schema=True)).source == "{}"
    with pytest.raises(ConstraintError, match="not valid JSON"):
        spec_from_params(SamplingParams(json_schema="{"))
    with pytest.raises(ConstraintError, match="not a valid regex"):
        spec_from_params(SamplingParams(regex="a("))


def test_pydantic_model_class_becomes_its_schema():
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        y: int

    params = SamplingParams(json_schema=Point)
    assert spec_from_params(params).schema["required"] == ["x", "y"]


def test_forced_tokens_are_canonical_at_both_boundaries(tokenizer_info):
    info = tokenizer_info
    text = '{"name": "'
    forced = canonical_forced_tokens(info, text.encode(), None, budget=10)
    assert forced == info.encode(text)[:-1]  # the last token could merge with what follows
    # after a token that would merge with the forced text, nothing is forced
    quote = info.encode('"')[0]
    merged = info.encode('"name')
    if len(merged) == 1:  # '"name' is one token here: forcing "name" after '"' would not be canonical
        assert canonical_forced_tokens(info, b'name": 1', quote, budget=10) == []
    assert canonical_forced_tokens(info, text.encode(), None, budget=1) == forced[:1]
    assert canonical_forced_tokens(info, "é".encode()[:1], None, budget=10) == []  # half a character


def test_forced_tokens_are_remembered_per_text_and_previous_token(tokenizer_info, monkeypatch):
    info = dataclasses.replace(tokenizer_info, forced_cache={})
    text = b'", "email": "'
    first = canonical_forced_tokens(info, text, None, budget=10)
    calls = []
    monkeypatch.setattr(info, "encode", lambda s: calls.append(s) or tokenizer_info.encode(s))
    assert canonical_forced_tokens(info, text, None, budget=10) == first and calls == []  # remembered
    assert canonical_forced_tokens(info, text, None, budget=2) == first[:2] and calls == []
    letter = tokenizer_info.encode("a")[0]
    canonical_forced_tokens(info, text, letter, budget=10)  # another previous token: worked out again
    assert calls


def test_json_options_spliced_into_the_schema_equal_the_overrides():
    """The options go into the schema text as its ``x-guidance`` member (no parse and rewrite of the
    schema): the same grammar as llguidance's ``overrides``; a schema with its own member still gets
    the overrides' precedence."""
    import json

    llguidance = pytest.importorskip("llguidance")
    from plait.runtime.constrained.backends.llguidance_backend import JSON_OPTIONS, json_schema_grammar

    def schema_of(grammar: str) -> dict:
        return json.loads(grammar)["grammars"][0]["json_schema"]

    for text in ('{}', ' {"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}',
                 '{"x-guidance":{"whitespace_flexible":true,"item_separator":","},"type":"array"}'):
        ours = schema_of(json_schema_grammar(llguidance, text))
        theirs = schema_of(llguidance.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS))
        assert ours == theirs and list(ours.get("properties", {})) == list(theirs.get("properties", {}))
        assert list(ours) == list(theirs)  # the member's place too: it matters to llguidance (below)
        assert ours["x-guidance"]["item_separator"] == ", "


def test_draft_04_ref_with_sibling_keywords(compilers, tokenizer_info):
    """A draft-04 schema whose "$ref" has sibling keywords (MaskBench's Github_medium---o77739): its valid
    document is accepted (with the options member spliced first, llguidance refused it)."""
    from plait.runtime.constrained import GrammarState
    from tests.runtime.constrained.conftest import walk

    draft = "http://json-schema.org/draft-04/schema#"
    schema = {
        "$schema": draft,
        "definitions": {
            "insurance": {"$schema": draft, "type": "object", "properties": {"company": {"type": "string"}},
                          "required": ["company"]},
            "car": {"$schema": draft, "type": "object", "$ref": "#/definitions/vehicle",
                    "properties": {"insurance": {"$ref": "#/definitions/insurance"},
                                   "four_wheel_drive": {"type": "boolean"}}},
            "vehicle": {"$schema": draft, "type": "object", "properties": {"reg_number": {"type": "string"}},
                        "required": ["reg_number"]},
        },
        "type": "object", "$ref": "#/definitions/car", "properties": {"track": {"type": "string"}},
    }
    grammar = compilers["llguidance"].compile(spec_from_params(SamplingParams(json_schema=schema)))
    state = GrammarState(grammar, tokenizer_info, frozenset({2}), jump_forward=False)
    document = {"reg_number": "ABC123", "insurance": {"company": "Allstate"}, "four_wheel_drive": True,
                "track": "Nurburgring"}
    assert walk(state, tokenizer_info, json.dumps(document)) == (True, True)
