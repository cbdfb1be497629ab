"""Grammar compilation cannot take the engine down or stall it: limits checked before compiling, compile
worker processes that crash or hang alone (and are replaced), a byte-bounded cache, and an engine whose
submissions never wait for a compile."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from plait.runtime.constrained import ConstraintError, ConstraintKind, ConstraintSpec, GrammarCompiler, spec_from_params
from plait.runtime.constrained.limits import GrammarLimits
from plait.sampling import SamplingParams

pytestmark = pytest.mark.model  # the bundled model's tokenizer

TIMEOUT_S = 3.0


def misbehave(spec: ConstraintSpec) -> None:
    """Worker hook: a regex naming CRASH kills the worker like a native stack overflow; HANG never returns."""
    if spec.source == "CRASH":
        os.kill(os.getpid(), signal.SIGSEGV)
    if spec.source == "HANG":
        time.sleep(3600)


def chained_lark(rules: int) -> str:
    return "start: r0\n" + "".join(f'r{i}: "a" r{i + 1}\n' for i in range(rules)) + f'r{rules}: "b"\n'


def chained_ebnf(rules: int) -> str:
    return "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(rules)) + f'r{rules} ::= "b"\n'


@pytest.fixture(scope="module")
def isolated(tokenizer_info):
    """One compiler with two worker processes (started once for the module)."""
    compiler = GrammarCompiler(
        tokenizer_info, timeout_s=TIMEOUT_S, max_workers=2, worker_hook=misbehave, isolate=True)
    assert compiler.workers.wait_ready(120)
    yield compiler
    compiler.shutdown()


def regex(text: str) -> ConstraintSpec:
    return ConstraintSpec(ConstraintKind.REGEX, text)


def test_a_crashing_compile_fails_that_request_only_and_the_worker_is_replaced(isolated):
    before = set(isolated.workers.pids)
    others = [isolated.submit(regex(f"ok{i}[0-9]")) for i in range(3)]
    with pytest.raises(ConstraintError, match="crashed.*signal 11"):
        isolated.compile(regex("CRASH"))
    assert [f.result(TIMEOUT_S + 5).backend_name for f in others] == ["llguidance"] * 3
    assert set(isolated.workers.pids) != before and isolated.workers.restarts >= 1
    assert isolated.compile(regex("after-crash")).new_matcher() is not None


def test_workers_build_the_tokenizer_before_taking_jobs(isolated):
    """Every worker, the one replaced after the crash above too, builds llguidance's tokenizer before it
    says ready: a fresh worker's first compile is not charged a second or more of it inside its timeout
    (on a slow machine that once timed a 3 s compile out)."""
    assert isolated.workers.wait_ready(120)
    assert all("llguidance" in warmed for warmed in isolated.workers.warmed), isolated.workers.warmed


def test_a_hanging_compile_is_killed_at_the_timeout(isolated):
    assert isolated.workers.wait_ready(120)  # the worker replaced above has started
    start = time.perf_counter()
    with pytest.raises(ConstraintError, match="longer than 3 s.*stopped"):
        isolated.compile(regex("HANG"))
    assert time.perf_counter() - start < TIMEOUT_S + 10  # killed, not left to sleep for an hour
    hung = [pid for pid in isolated.workers.pids]
    assert all(os.path.exists(f"/proc/{pid}") for pid in hung)  # only live, fresh workers remain
    assert isolated.compile(regex("after-hang")).backend_name == "llguidance"


def test_a_real_stack_overflow_in_the_grammar_library_costs_one_request(isolated):
    assert isolated.workers.wait_ready(120)
    # 3000 chained rules overflow llguidance's stack (SIGSEGV): in the engine process this killed every request
    spec = ConstraintSpec(ConstraintKind.GRAMMAR, chained_lark(3000))
    with pytest.raises(ConstraintError, match="crashed"):
        isolated.compile(spec)
    assert isolated.compile(ConstraintSpec(ConstraintKind.GRAMMAR, chained_lark(50))).backend_name == "llguidance"


def test_limits_are_checked_before_compiling():
    with pytest.raises(ConstraintError, match="5002 rules.*grammar_max_rules"):
        spec_from_params(SamplingParams(ebnf=chained_ebnf(5000)))  # the issue's 5000-rule chained EBNF
    with pytest.raises(ConstraintError, match="grammar_max_bytes"):
        spec_from_params(SamplingParams(regex="a" * 300_000))
    with pytest.raises(ConstraintError, match="nests deeper than 64 levels"):
        spec_from_params(SamplingParams(regex="(" * 5000 + "a" + ")" * 5000))  # RecursionError in re before
    with pytest.raises(ConstraintError, match="nests deeper"):
        spec_from_params(SamplingParams(ebnf='root ::= ' + "(" * 500 + '"a"' + ")" * 500))
    small = GrammarLimits(max_bytes=100, max_depth=2, max_rules=1)
    with pytest.raises(ConstraintError, match="2 rules"):
        spec_from_params(SamplingParams(ebnf='root ::= a\na ::= "x"'), small)
    assert spec_from_params(SamplingParams(regex="[(((]x"), small) is not None  # brackets in a class are literal


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_deeply_nested_schemas_are_refused_up_front():
    with pytest.raises(ConstraintError, match="json_schema nests deeper than 64"):
        spec_from_params(SamplingParams(json_schema=json.dumps(deep_schema(40))))
    with pytest.raises(ConstraintError, match="nests deeper"):
        spec_from_params(SamplingParams(json_schema="[" * 100_000))  # json.loads: RecursionError before
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema=deep_schema(5000))  # json.dumps: RecursionError before
    assert spec_from_params(SamplingParams(json_schema=deep_schema(20))) is not None


def test_json_nesting_ignores_brackets_in_strings_and_counts_past_a_broken_string():
    """The scan that bounds json.loads' recursion: brackets inside string literals (escaped quotes
    included) do not count; an unterminated string's brackets do (it is not JSON anyway)."""
    limits = GrammarLimits(max_depth=3)
    inside = json.dumps({"a": {"pattern": '[[[[{{{{\\"[[[[', "enum": ["]]]]", "\\"]}})
    assert spec_from_params(SamplingParams(json_schema=inside), limits) is not None
    with pytest.raises(ConstraintError, match="nests deeper than 3"):
        spec_from_params(SamplingParams(json_schema='{"a": {"b": {"c": {}}}}'), limits)
    with pytest.raises(ConstraintError, match="nests deeper than 3"):
        spec_from_params(SamplingParams(json_schema='{"a": "unterminated [[[[[['), limits)
    with pytest.raises(ConstraintError, match="not valid JSON"):  # closers first do not hide openers' depth
        spec_from_params(SamplingParams(json_schema="]]]]" + "[" * 3 + "]" * 3), limits)


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"allOf": [{"$ref": "#"}]},
    {"anyOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#"}}},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}},
])
def test_cyclic_refs_are_refused_up_front(schema):
    with pytest.raises(ConstraintError, match="cyclic"):
        spec_from_params(SamplingParams(json_schema=schema))


@pytest.mark.parametrize("text", ['{"\\u0024ref": "#"}', '{"allOf": [{"$\\u0072ef": "#"}]}'])
def test_cyclic_refs_written_with_escapes_are_refused(text):
    """The cycle check runs only for a text that names "$ref" or has \\u escapes; escaped keys are caught."""
    with pytest.raises(ConstraintError, match="cyclic"):
        spec_from_params(SamplingParams(json_schema=text))


def test_the_cycle_walk_resolves_each_ref_once_and_finds_cycles_anywhere(monkeypatch):
    """A schema that refers to one definition many times resolves it once; a cycle deep in the
    document, behind nodes without alias keys, is still found."""
    from plait.runtime.constrained import limits as limits_module

    resolved = []
    real = limits_module._resolve
    monkeypatch.setattr(limits_module, "_resolve", lambda root, ref: resolved.append(ref) or real(root, ref))
    item = {"$ref": "#/$defs/item"}
    schema = {"$defs": {"item": {"type": "string"}},
              "properties": {f"p{i}": {"allOf": [item]} for i in range(20)}}
    limits_module.check_ref_cycles(json.loads(json.dumps(schema)))
    assert resolved == ["#/$defs/item"]
    deep = {"properties": {"a": {"items": [{"type": "string"}, {"properties": {"b": {"$ref": "#/$defs/c"}}}]}},
            "$defs": {"c": {"allOf": [{"$ref": "#/$defs/d"}]}, "d": {"anyOf": [{"$ref": "#/$defs/c"}]}}}
    with pytest.raises(ValueError, match="cyclic"):
        limits_module.check_ref_cycles(deep)


def test_the_size_limit_counts_utf8_bytes():
    """ASCII text is measured by its length (no encoding); any other text by its UTF-8 bytes."""
    limits = GrammarLimits(max_bytes=10)
    assert spec_from_params(SamplingParams(regex="a" * 10), limits) is not None
    with pytest.raises(ConstraintError, match="11 bytes"):
        spec_from_params(SamplingParams(regex="a" * 11), limits)
    with pytest.raises(ConstraintError, match="12 bytes"):
        spec_from_params(SamplingParams(regex="é" * 6), limits)  # 6 characters, 12 bytes
    with pytest.raises(ConstraintError, match="12 bytes"):
        spec_from_params(SamplingParams(regex="\ud800" * 4), limits)  # lone surrogates: 3 bytes each


def test_schemas_without_refs_skip_the_cycle_walk(monkeypatch):
    from plait.runtime.constrained import spec as spec_module

    monkeypatch.setattr(spec_module, "_SPECS", spec_module._SpecCache())  # checked afresh, not from the cache

    def walk(schema):
        raise AssertionError("walked")

    monkeypatch.setattr(spec_module, "check_ref_cycles", walk)
    schema = {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"allOf": [{"type": "string"}]}]}}}
    assert spec_from_params(SamplingParams(json_schema=schema)) is not None
    with pytest.raises(AssertionError, match="walked"):
        spec_from_params(SamplingParams(json_schema={"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"}))


def test_json_nesting_scan_skipped_when_the_brackets_are_too_few(monkeypatch):
    """At most max_depth opening brackets cannot nest deeper: no scan; one more and the scan decides."""
    from plait.runtime.constrained import limits as limits_module
    from plait.runtime.constrained import spec as spec_module

    limits = GrammarLimits(max_depth=3)
    scans = []
    real = limits_module._JSON_STRING
    monkeypatch.setattr(spec_module, "_SPECS", spec_module._SpecCache())
    monkeypatch.setattr(limits_module, "_JSON_STRING", SimpleNamespace(sub=lambda *a: scans.append(1) or real.sub(*a)))
    assert spec_from_params(SamplingParams(json_schema='{"a": [{"b": 1}]}'), limits) is not None
    assert not scans
    with pytest.raises(ConstraintError, match="nests deeper than 3"):
        spec_from_params(SamplingParams(json_schema='{"a": [{"b": [1]}]}'), limits)
    assert scans == [1]
    assert spec_from_params(SamplingParams(json_schema='{"a": [{"b": 1}], "c": "[[["}'), limits) is not None


def test_checked_specs_are_cached_per_text_and_limits(monkeypatch):
    """A constraint seen before is not checked again (same text, same limits); other limits, another
    text or a refusal are. The cache is bounded by count (and by the texts' length)."""
    from plait.runtime.constrained import spec as spec_module

    cache = spec_module._SpecCache(max_entries=2)
    monkeypatch.setattr(spec_module, "_SPECS", cache)
    checks = []
    real = spec_module._checked_spec
    monkeypatch.setattr(spec_module, "_checked_spec", lambda *a: checks.append(a[1]) or real(*a))
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    first = spec_from_params(SamplingParams(json_schema=schema))
    assert spec_from_params(SamplingParams(json_schema=schema)) is first and len(checks) == 1
    assert first.source == '{"type":"object","properties":{"a":{"type":"integer"}}}'
    spec_from_params(SamplingParams(json_schema=schema), GrammarLimits(max_depth=5))
    assert len(checks) == 2  # other limits: checked against them
    for _ in range(2):
        with pytest.raises(ConstraintError, match="nests deeper than 1"):
            spec_from_params(SamplingParams(json_schema=schema), GrammarLimits(max_depth=1))
    assert len(checks) == 4  # refusals are not kept
    spec_from_params(SamplingParams(regex="a+"))
    assert len(cache) == 2 and spec_from_params(SamplingParams(json_schema=schema)) is not first  # dropped
    small = spec_module._SpecCache(max_chars=10)
    small.put(("regex", "a" * 20, GrammarLimits()), spec_from_params(SamplingParams(regex="b")))
    assert len(small) == 0  # longer than the whole cache: not kept


def test_recursive_schemas_that_produce_output_are_fine(compilers):
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    either = {"anyOf": [{"$ref": "#"}, {"type": "integer"}]}
    for schema in (tree, either):
        assert compilers["llguidance"].compile(spec_from_params(SamplingParams(json_schema=schema)))


def test_the_cache_is_bounded_by_bytes(tokenizer_info):
    compiler = GrammarCompiler(tokenizer_info, backend="llguidance", cache_bytes=400 * 1024)
    try:
        specs = [regex(f"byte{i}[a-z]+") for i in range(6)]
        sizes = [compiler.compile(s).nbytes for s in specs]
        assert 0 < compiler.cached_bytes <= 400 * 1024 < sum(sizes)
        assert specs[-1] in compiler._cache and specs[0] not in compiler._cache  # least recently used went first
    finally:
        compiler.shutdown()


# ---------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine(bundled_model_dir):
    from plait.runtime.engine import Engine

    eng = Engine(grammar_compile_workers=1, grammar_compile_timeout_s=TIMEOUT_S, max_total_tokens=2048)
    constrained = eng.constrained
    info = constrained.compiler.info
    constrained.compiler.shutdown()  # the same settings plus the misbehaving hook
    constrained._compiler = GrammarCompiler(
        info, timeout_s=TIMEOUT_S, max_workers=1, worker_hook=misbehave, isolate=True)
    assert constrained.compiler.workers.wait_ready(120)
    yield eng
    eng.shutdown()


def test_engine_submissions_never_wait_for_a_compile(engine):
    admitted: list[Exception | None] = []
    got = threading.Event()

    def on_admitted(error):
        admitted.append(error)
        got.set()

    start = time.perf_counter()
    engine.submit("Hi", {"regex": "HANG", "max_new_tokens": 4}, on_output=lambda i, e: None,
                  on_admitted=on_admitted, rid="hangs")
    assert time.perf_counter() - start < 0.5  # returned while the worker hangs
    out = engine.generate("Say hi", {"max_new_tokens": 4, "temperature": 0})  # others are served meanwhile
    assert len(out["output_ids"]) == 4 and not got.is_set()
    stats_start = time.perf_counter()
    engine.stats()
    assert time.perf_counter() - stats_start < 0.5
    assert got.wait(TIMEOUT_S * 2 + 5)
    assert isinstance(admitted[0], ConstraintError) and "longer than" in str(admitted[0])
    # the replaced worker serves the next constrained request, whose output matches
    done = threading.Event()
    outputs: list[dict] = []

    def on_output(index, event):
        if event["finished"]:
            outputs.append(event["output"])
            done.set()

    engine.submit("Pick:", {"regex": "(yes|no)", "max_new_tokens": 4}, on_output=on_output,
                  on_admitted=admitted.append, rid="after")
    assert done.wait(60) and admitted[-1] is None
    assert re.fullmatch("(yes|no)", outputs[0]["text"])
    assert engine.flush_cache() and engine.stats()["kv_slots_used"] == 0  # no leak


def test_engine_crash_in_compile_is_a_clear_error(engine):
    errors: list[Exception | None] = []
    got = threading.Event()
    engine.submit("Hi", {"regex": "CRASH"}, on_output=lambda i, e: None,
                  on_admitted=lambda e: (errors.append(e), got.set()), rid="crashes")
    assert got.wait(30)
    assert isinstance(errors[0], ConstraintError) and "crashed" in str(errors[0])
    with pytest.raises(ConstraintError, match="cyclic"):  # malformed: raised at once, nothing queued
        engine.submit("Hi", {"json_schema": {"$ref": "#"}}, on_output=lambda i, e: None, on_admitted=errors.append)
    assert engine.generate("Hi", {"max_new_tokens": 2})["meta_info"]["finish_reason"]["type"] == "length"


def test_warm_up_starts_the_compiler_before_the_first_request(bundled_model_dir, monkeypatch):
    """Servers call warm_up at start: the compiler and its workers exist before any constrained request,
    and so does this process's llguidance tokenizer, which loading a worker's grammar needs (built at the
    first load, it held the GIL beside the engine loop for a second or more): loads build none."""
    from plait.runtime.constrained import ConstrainedDecoding
    from plait.runtime.constrained.backends import llguidance_backend
    from plait.runtime.tokenizer import Tokenizer

    builds = []
    plain_build = llguidance_backend.build_lltokenizer
    monkeypatch.setattr(llguidance_backend, "build_lltokenizer", lambda *a, **k: builds.append(1) or plain_build(*a, **k))
    tokenizer = Tokenizer.from_dir(bundled_model_dir)
    service = ConstrainedDecoding(tokenizer, 49152, workers=1)
    assert service._compiler is None
    thread = service.warm_up()
    thread.join(120)
    try:
        assert service._compiler is not None and service._compiler.workers.wait_ready(120)
        assert len(builds) == 1  # this process's, at warm-up
        grammar = service.compiler.compile(regex("warm[0-9]+"))  # compiled in a worker, loaded here
        assert len(builds) == 1 and grammar.new_matcher().consume(tokenizer.encode("warm", add_special_tokens=False)[0])
    finally:
        service._compiler.shutdown()
    assert ConstrainedDecoding(None, 10).warm_up() is None  # no tokenizer: nothing to start


def test_shutdown_during_warm_up_stops_the_workers_it_starts(bundled_model_dir):
    """A server stopped right after it started: shutdown waits for the compiler being built and stops
    it (its workers would otherwise outlive the engine, whose exit waits for them: plait serve hung on
    SIGTERM); afterwards no compiler can be built."""
    from plait.runtime.constrained import ConstrainedDecoding
    from plait.runtime.tokenizer import Tokenizer

    service = ConstrainedDecoding(Tokenizer.from_dir(bundled_model_dir), 49152, workers=1)
    thread = service.warm_up()
    time.sleep(0.05)  # the build has begun (it holds the service's lock) and has not finished
    service.shutdown()
    thread.join(120)
    # stopped once built, or (had shutdown come first) never built
    assert service._compiler is None or service._compiler.workers._closed
    with pytest.raises(ConstraintError, match="shut down"):
        service.compiler

