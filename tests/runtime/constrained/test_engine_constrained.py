"""Constrained generation on the bundled model: regex, choices, grammars and JSON schemas give valid
output; jump-forward, cuts by max_new_tokens, errors and overlap scheduling behave."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import threading

import jsonschema
import pytest
import torch

import plait.runtime.engine as engine_module
from plait.runtime.constrained import ConstraintError, GrammarState
from plait.runtime.constrained.budget import START_LIMITS, SearchLimits, shortest_completion, start_ending
from plait.runtime.engine import Engine
from plait.sampling import JSON_OBJECT, SamplingParams
from tests.runtime.constrained.schema_corpus import CASES
from tests.runtime.engine_helpers import assert_no_leak

pytestmark = pytest.mark.model

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
# A sample of the corpus generated on the model (all of it is walked through the matchers in test_corpus.py).
GENERATED = ["fmt_date", "enum_in_object", "nested_1", "array_1_3", "anyof_nullable", "ref_linked_list",
             "pat_phone", "num_int_range", "addprops_typed", "required_some", "const_in_object", "json_object"]


@pytest.fixture(scope="module")
def engine(bundled_model_dir):
    # bounded, so a second engine fits on a GPU; float32, so greedy tokens do not depend on batch shape there
    eng = Engine(model=str(bundled_model_dir), max_total_tokens=8192, dtype="float32")
    yield eng
    eng.shutdown()


def _chat(engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_regex_choices_and_grammar_outputs_match(engine):
    prompt = _chat(engine, "Give me a phone number, then a city, then yes or no.")
    params = [
        {"regex": r"\(\d{3}\) \d{3}-\d{4}"},
        {"choices": ["Paris", "London", "New York"]},
        {"ebnf": 'root ::= answer "."\nanswer ::= "yes" | "no"'},
        {"ebnf": 'start: WORD (" " WORD)*\nWORD: /[a-z]{1,8}/', "max_new_tokens": 12},
    ]
    outs = engine.generate([prompt] * len(params), [{"temperature": 0.8, "seed": 3, "max_new_tokens": 32, **p} for p in params])
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", outs[0]["text"])
    assert outs[1]["text"] in ("Paris", "London", "New York")
    assert outs[2]["text"] in ("yes.", "no.")
    assert re.fullmatch(r"[a-z]{1,8}( [a-z]{1,8})*", outs[3]["text"])
    for out in outs[:3]:
        assert out["meta_info"]["finish_reason"]["type"] == "stop" and out["meta_info"]["incomplete"] is False
    assert_no_leak(engine)


def test_json_schema_sample_validates(engine):
    cases = [c for c in CASES if c.name in GENERATED]
    assert len(cases) == len(GENERATED)
    prompts = [_chat(engine, f"Reply with JSON matching this schema: {json.dumps(c.schema)}") for c in cases]
    params = [{"temperature": 0.7, "seed": i, "max_new_tokens": 64, "json_schema": c.schema} for i, c in enumerate(cases)]
    for case, out in zip(cases, engine.generate(prompts, params)):
        meta = out["meta_info"]
        if meta["finish_reason"]["type"] == "length":
            assert meta["incomplete"] is True, case.name  # cut mid-structure: reported, not passed off as valid
            continue
        assert meta["finish_reason"]["type"] == "stop" and meta["incomplete"] is False, (case.name, meta)
        jsonschema.validate(json.loads(out["text"]), case.schema)
    assert_no_leak(engine)


def test_jump_forward_forces_fixed_keys_and_keeps_tokens_canonical(engine):
    prompt = _chat(engine, "Describe a person as JSON.")
    params = {"temperature": 0, "max_new_tokens": 48, "json_schema": PERSON}
    fast = engine.generate(prompt, params)
    engine.constrained.jump_forward = False
    try:
        slow = engine.generate(prompt, params)
    finally:
        engine.constrained.jump_forward = True
    assert fast["meta_info"]["forced_tokens"] > 0 and slow["meta_info"]["forced_tokens"] == 0
    for out in (fast, slow):
        jsonschema.validate(json.loads(out["text"]), PERSON)
    # forced tokens (the rest of each key once its quote is out) are the tokenizer's own tokenization
    assert fast["output_ids"] == engine.tokenizer.encode(fast["text"], add_special_tokens=False)
    assert fast["text"] == slow["text"]  # greedy: forcing what the grammar fixes changes nothing here


def test_cut_by_max_tokens_is_length_and_incomplete(engine):
    out = engine.generate(_chat(engine, "JSON please."), {"temperature": 0, "max_new_tokens": 6, "json_schema": PERSON})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert out["meta_info"]["incomplete"] is True
    assert len(out["output_ids"]) == 6
    assert out["meta_info"]["budget_closed"] is False  # no ending of PERSON fits in 6 tokens: cut as before


def test_any_json_object_and_stop_tokens(engine):
    out = engine.generate(_chat(engine, "Give me a JSON object with two keys."),
                          {"temperature": 0, "max_new_tokens": 80, "json_schema": JSON_OBJECT})
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        assert isinstance(json.loads(out["text"]), dict)
    else:
        assert out["meta_info"]["incomplete"] is True


def test_bad_constraints_are_value_errors_and_engine_keeps_serving(engine):
    with pytest.raises(ConstraintError, match="disjoint"):  # refused by every backend, not relaxable
        engine.generate("x", {"json_schema": {"type": "object", "patternProperties": {"a": {}, "b": {}},
                                              "additionalProperties": False}})
    with pytest.raises(ValueError, match="regex"):
        engine.generate("x", {"regex": "(unclosed"})
    with pytest.raises(ValueError, match="json_schema"):
        engine.generate("x", {"json_schema": "{not json"})
    with pytest.raises(ValueError, match="EBNF|grammar|llguidance"):
        engine.generate("x", {"ebnf": "root ::= ("})
    ok = engine.generate("x", {"max_new_tokens": 2, "choices": ["a", "b"]})
    assert ok["text"] in ("a", "b")


def test_mixed_batch_leaves_unconstrained_rows_alone(engine):
    prompt = "The capital of France is"
    plain = {"temperature": 0, "max_new_tokens": 8}
    alone = engine.generate(prompt, plain)
    mixed = engine.generate([prompt, prompt], [plain, {**plain, "regex": "[0-9]+"}])
    assert mixed[0]["output_ids"] == alone["output_ids"]
    assert "incomplete" not in mixed[0]["meta_info"]
    assert re.fullmatch("[0-9]+", mixed[1]["text"])


def test_overlap_scheduling_gives_the_same_constrained_output(bundled_model_dir, engine, monkeypatch):
    """Constrained rows overlap too (the previous step is settled before their masks are built): the same
    tokens as the sync path, with jump-forward (the row of a request that jumped is dropped), budget
    endings appended instead of a sampled token (the KV computed from that token is rewound), and forced
    tokens computed in one extend or one a step inside the decode batch."""
    prompts = [_chat(engine, "A person as JSON."), _chat(engine, "Count to three."), "Name a colour:"]
    params = [{"temperature": 0, "max_new_tokens": 40, "json_schema": PERSON}, {"temperature": 0, "max_new_tokens": 12},
              {"temperature": 0, "max_new_tokens": 6, "choices": ["red", "green", "blue"]}]
    # a long literal after the choice: runs of forced tokens that outlast a step
    reason = r"Answer: (yes|no)\. The reason, in one short sentence that follows: [a-z ]{3,30}\."
    prompts += [_chat(engine, "Is the sky blue?")] * 3
    params += [{"temperature": 0.8, "seed": seed, "max_new_tokens": 60, "regex": reason} for seed in range(3)]
    ref = engine.generate(prompts, params)
    assert all(o["meta_info"]["forced_tokens"] > 8 for o in ref[3:])
    ref_tight = _tight_batch(engine, 1)
    # the other scheduling mode than the module's engine (sync on the CPU, overlapped on a GPU)
    with Engine(model=str(bundled_model_dir), enable_overlap=not engine.overlap, max_total_tokens=8192,
                dtype="float32") as other:
        assert other.overlap != engine.overlap
        overlapped = other if other.overlap else engine
        rewinds = []
        rewind = overlapped.scheduler.rewind

        def counted(req, length):
            rewinds.append(req.computed_len > length)
            rewind(req, length)

        monkeypatch.setattr(overlapped.scheduler, "rewind", counted)
        # the unconstrained rows of a step are settled after the next step's sampling is launched
        events = []
        launch, apply_tokens = engine_module.launch_sampling, overlapped._apply_tokens

        def launching(*args, **kwargs):
            events.append("launch")
            return launch(*args, **kwargs)

        def applying(pairs):
            pairs = list(pairs)
            events.append(("apply", frozenset(req.grammar is not None for req, _ in pairs)))
            apply_tokens(pairs)

        monkeypatch.setattr(engine_module, "launch_sampling", launching)
        monkeypatch.setattr(overlapped, "_apply_tokens", applying)
        for forced_in_decode in (None, 1):  # forced tokens in one extend, then one a step in the decode batch
            other.scheduler.forced_in_decode_min_batch = forced_in_decode
            if forced_in_decode:  # decode steps as CUDA graphs run them: every row's logits
                monkeypatch.setattr(other.runner, "cuda_graphs", AllRowsGraphs(other.runner))
            steps = other.stats()["steps"], other.stats()["overlapped_steps"]
            ours = other.generate(prompts, params)
            tight = _tight_batch(other, 1)
            assert [o["output_ids"] for o in ours] == [o["output_ids"] for o in ref]
            assert [o["output_ids"] for o in tight] == [o["output_ids"] for o in ref_tight]
            assert [o["meta_info"]["budget_closed"] for o in tight] == [o["meta_info"]["budget_closed"] for o in ref_tight]
            if other.overlap:  # every step overlapped: nothing here needs its results at once
                stats = other.stats()
                assert stats["overlapped_steps"] - steps[1] == stats["steps"] - steps[0] > 0
            assert_no_leak(other)
        assert other.runner.cuda_graphs.replays > 0
        assert ("apply", frozenset({True})) in events
        assert any(a == "launch" and b == ("apply", frozenset({False})) for a, b in zip(events, events[1:]))
        monkeypatch.setattr(other.runner, "cuda_graphs", None)
        # an ending appended instead of a sampled token whose KV the next step computed already
        replaced_ref = _replaced_by_ending_batch(engine, monkeypatch)
        replaced = _replaced_by_ending_batch(other, monkeypatch)
        assert [o["output_ids"] for o in replaced] == [o["output_ids"] for o in replaced_ref]
        assert all(o["meta_info"]["budget_closed"] and re.fullmatch(EMAIL, o["text"]) for o in replaced)
        # what the overlapped engine cached for them is the KV of their tokens: continuing them from the
        # cache gives the same tokens and logprobs
        prompt_ids = engine.tokenizer.encode(_chat(engine, "Write an email address."))
        again = [prompt_ids + o["output_ids"][:-1] for o in replaced]  # (without the stop token)
        plain = {"temperature": 0, "max_new_tokens": 4}
        ours_again = other.generate(input_ids=again, sampling_params=plain, return_logprob=True)
        ref_again = engine.generate(input_ids=again, sampling_params=plain, return_logprob=True)
        assert all(o["meta_info"]["cached_tokens"] > len(prompt_ids) for o in ours_again)
        for a, b in zip(ours_again, ref_again):
            assert a["output_ids"] == b["output_ids"]
            assert [lp for lp, *_ in a["meta_info"]["output_token_logprobs"]] == pytest.approx(
                [lp for lp, *_ in b["meta_info"]["output_token_logprobs"]], abs=1e-4)
        assert_no_leak(other)
        assert any(rewinds)
    jsonschema.validate(json.loads(ours[0]["text"]), PERSON)


class AllRowsGraphs:
    """Stands in for ``CudaGraphRunner`` on the CPU: it takes the decode-only batches and returns every
    row's logits, as a replayed graph does, whether the row samples this step or not."""

    def __init__(self, runner):
        self.runner, self.replays = runner, 0

    def can_run(self, batch) -> bool:
        return batch.is_decode_only

    def run(self, batch):
        self.replays += 1
        every_row = dataclasses.replace(batch, logits_indices=torch.arange(batch.batch_size))
        self.runner.attn_backend.prepare(every_row)
        return self.runner.model.compute_logits(self.runner.model(every_row))


def _replaced_by_ending_batch(engine, monkeypatch, budget_left: int = 8) -> list[dict]:
    """Email regexes whose sampled token at ``budget_left`` tokens to go is replaced by the shortest
    ending (as budget steering's ``vet`` does for a token after which no ending fits, which the bundled
    model rarely samples on its own)."""
    original = GrammarState.ending_instead_of

    def ending_instead_of(state, token, budget):
        if budget == budget_left and state.steering is not None and not state.steering.closed:
            path = shortest_completion(state.matcher, state.info)
            if path:
                state.steering.closed = state.closing = True
                return path + [state.steering.stop_id]
        return original(state, token, budget)

    with monkeypatch.context() as patch:
        patch.setattr(GrammarState, "ending_instead_of", ending_instead_of)
        patch.setattr(engine.token_healing, "enabled", False)  # the prompt's ids stay the tokenizer's
        prompt = _chat(engine, "Write an email address.")
        params = [{"regex": EMAIL, "max_new_tokens": 12, "temperature": 1.0, "seed": seed} for seed in range(4)]
        return engine.generate([prompt] * len(params), params)


def test_streaming_constrained_snapshots_are_cumulative(engine):
    chunks = list(engine.generate(_chat(engine, "A person as JSON."),
                                  {"temperature": 0, "max_new_tokens": 40, "json_schema": PERSON}, stream=True))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    for a, b in itertools.pairwise(chunks):
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]


# Tight budgets (a few tokens over the shortest ending from the start) at temperature 0.7: without
# steering the model runs out mid-value; with it every output ends valid (budget.py).
NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "required": ["id", "tags"], "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}},
    "active": {"type": "boolean"}}, "required": ["user", "active"]}
EMAIL = r"[a-z]{3,}@[a-z]+\.com"
TIGHT = [({"json_schema": PERSON}, 16), ({"json_schema": PERSON}, 20), ({"json_schema": NESTED}, 24),
         ({"regex": EMAIL}, 7), ({"ebnf": 'start: "(" WORD (" + " WORD)* ")"\nWORD: /[a-z]{2,5}/'}, 6)]


def _tight_batch(engine, margin, **kwargs):
    engine.constrained.budget_margin = margin
    # bounded by states visited only, so that a slow or busy machine finds the same endings
    engine.constrained.budget_limits = SearchLimits(max_seconds=10.0)
    try:
        prompt = _chat(engine, "Write a long and detailed answer in the requested format.")
        params = [{**spec, "max_new_tokens": budget, "temperature": 0.7, "seed": seed}
                  for spec, budget in TIGHT for seed in (1, 2)]
        return engine.generate([prompt] * len(params), params, **kwargs)
    finally:
        engine.constrained.budget_margin = 1
        engine.constrained.budget_limits = SearchLimits()


def _valid(spec: dict, text: str) -> bool:
    if "json_schema" in spec:
        try:
            jsonschema.validate(json.loads(text), spec["json_schema"])
        except ValueError:  # JSONDecodeError and ValidationError both are
            return False
        return True
    if "regex" in spec:
        return re.fullmatch(spec["regex"], text) is not None
    return re.fullmatch(r"\([a-z]{2,5}( \+ [a-z]{2,5})*\)", text) is not None


def test_tight_budgets_end_valid_with_honest_finish_reasons(engine):
    specs = [spec for spec, _ in TIGHT for _ in (1, 2)]
    budgets = [budget for _, budget in TIGHT for _ in (1, 2)]
    off = _tight_batch(engine, None)
    assert not all(_valid(s, o["text"]) for s, o in zip(specs, off))  # the model alone runs out mid-value
    for spec, out in zip(specs, off):
        assert out["meta_info"]["budget_closed"] is False
        assert out["meta_info"]["incomplete"] is not _valid(spec, out["text"])
    before = engine.stats()
    on = _tight_batch(engine, 1, return_logprob=True)
    after = engine.stats()
    # budget steering's work is counted into the engine's totals (/metrics) as requests finish
    searches = after["budget_searches"] - before["budget_searches"]
    learned = after["budget_endings_learned"] - before["budget_endings_learned"]
    # endings found by searches of earlier requests of these grammars (tests before this one, the off
    # run's requests do not steer) may stand in for all of this run's vetting searches
    assert searches + learned > 0 and after["budget_endings_reused"] - before["budget_endings_reused"] >= learned
    assert (after["budget_search_seconds"] > before["budget_search_seconds"]) == (searches > 0)
    assert 0 <= after["budget_searches_without_ending"] - before["budget_searches_without_ending"] <= searches
    for spec, budget, out in zip(specs, budgets, on):
        meta = out["meta_info"]
        assert _valid(spec, out["text"]), (spec, out["text"])
        assert meta["incomplete"] is False and meta["finish_reason"]["type"] == "stop"
        assert len(out["output_ids"]) <= budget
        # logprobs are those of sampled tokens that are in the output (a replaced token's entry is dropped)
        it = iter(out["output_ids"])
        assert all(any(t == tid for t in it) for _, tid, _ in meta["output_token_logprobs"])
    assert sum(out["meta_info"]["budget_closed"] for out in on) >= len(on) // 2


def test_disable_budget_steering_cuts_outputs_at_the_budget_without_searching(bundled_model_dir):
    """``EngineConfig.disable_budget_steering``: constrained requests are cut at ``max_new_tokens`` as
    SGLang and vLLM cut them (flagged incomplete where the value is unfinished), with no search."""
    engine = Engine(model=str(bundled_model_dir), max_total_tokens=2048, dtype="float32", disable_budget_steering=True,
                    grammar_compile_workers=0)
    try:
        assert engine.constrained.budget_margin is None
        prompt = _chat(engine, "Write a long and detailed answer in the requested format.")
        tight = [TIGHT[0], TIGHT[3]]  # a JSON schema and a regex
        params = [{**spec, "max_new_tokens": budget, "temperature": 0.7, "seed": 1} for spec, budget in tight]
        outs = engine.generate([prompt] * len(params), params)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats["budget_searches"] == 0 and stats["budget_endings_reused"] == 0
    for (spec, budget), out in zip(tight, outs):
        meta = out["meta_info"]
        assert meta["budget_closed"] is False and len(out["output_ids"]) <= budget
        assert meta["incomplete"] is not _valid(spec, out["text"])
    assert any(out["meta_info"]["incomplete"] for out in outs)  # the model alone runs out mid-value


def test_a_budget_tight_from_the_first_token_follows_the_start_ending_planned_at_admission(engine):
    # per-step searches that visit one matcher state find nothing: only the start state's ending, planned
    # when the request is admitted (once per grammar, START_LIMITS), can end these outputs valid
    grammar = engine.constrained.grammar_for(SamplingParams(json_schema=NESTED))
    plan = start_ending(grammar, engine.constrained.compiler.info, START_LIMITS)
    prompt = _chat(engine, "Write a long and detailed answer in the requested format.")
    params = [{"json_schema": NESTED, "max_new_tokens": len(plan) + slack, "temperature": 0.7, "seed": seed}
              for slack in (1, 3) for seed in (1, 2)]
    engine.constrained.budget_limits = SearchLimits(max_nodes=1)
    try:
        outs = engine.generate([prompt] * len(params), params)
    finally:
        engine.constrained.budget_limits = SearchLimits()
    for param, out in zip(params, outs):
        assert _valid({"json_schema": NESTED}, out["text"]), out["text"]
        assert out["meta_info"]["incomplete"] is False and out["meta_info"]["budget_closed"] is True
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert len(out["output_ids"]) <= param["max_new_tokens"]


def test_submit_plans_a_tight_budget_on_the_admission_thread_not_the_callers(engine):
    """A server's command loop calls submit(on_admitted=...) and must not block: a compiled grammar whose
    start ending is not cached yet is planned on the admission thread (submit returns [] at once); once
    cached, the next request goes straight in and plans from the cache."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
              "required": ["city", "zip"]}
    engine.constrained.grammar_for(SamplingParams(json_schema=schema))  # compiled and cached
    params = {"json_schema": schema, "max_new_tokens": 40, "temperature": 0.7, "seed": 3}
    assert engine.constrained.start_plan_pending(SamplingParams.from_dict(params))
    prompt = _chat(engine, "Write a long and detailed answer in the requested format.")
    done, admitted, outputs = threading.Event(), [], []

    def on_output(index, event):
        if event["finished"]:
            outputs.append(event["output"])
            done.set()

    caller = threading.current_thread()
    assert engine.submit(prompt, params, on_output=on_output, rid="plan-1",
                         on_admitted=lambda err: admitted.append((err, threading.current_thread()))) == []
    assert done.wait(120) and admitted[0][0] is None and admitted[0][1] is not caller
    assert _valid({"json_schema": schema}, outputs[0]["text"]), outputs[0]["text"]
    assert not engine.constrained.start_plan_pending(SamplingParams.from_dict(params))
    done.clear()
    assert engine.submit(prompt, {**params, "seed": 4}, on_output=on_output, rid="plan-2",
                         on_admitted=lambda err: admitted.append((err, None))) == ["plan-2"]
    assert done.wait(120) and _valid({"json_schema": schema}, outputs[1]["text"]), outputs[1]["text"]


def test_submit_reports_an_already_failed_compile_without_compiling_again(engine, monkeypatch):
    """A grammar whose compile already failed when submit(on_admitted=...) looks (a compile finished
    between two requests) is reported through on_admitted as it is, never compiled again on the caller's
    thread (a server's command loop, where a compile in a worker may take its whole timeout)."""
    from concurrent.futures import Future

    from plait.runtime.constrained.spec import ConstraintError

    failed = Future()
    failed.set_exception(ConstraintError("refused by the grammar library"))
    monkeypatch.setattr(engine.constrained, "grammar_future", lambda params: failed)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled on the caller's thread")

    monkeypatch.setattr(engine.constrained.compiler, "compile", no_compile)
    admitted = []
    got = threading.Event()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert engine.submit("Hi", {"json_schema": schema, "max_new_tokens": 4}, on_output=lambda i, e: None,
                         on_admitted=lambda err: (admitted.append(err), got.set())) == []
    assert got.wait(30)
    assert isinstance(admitted[0], ConstraintError) and "refused by the grammar library" in str(admitted[0])


def test_without_compile_workers_generate_compiles_on_its_thread_and_submit_does_not(
        engine, monkeypatch, llguidance_compile_threads):
    """grammar_compile_workers=0: generate() compiles on the calling thread (no hop to a compiler thread
    and back); submit(on_admitted=...) never compiles on its caller's thread (a server's command loop)."""
    from plait.runtime.constrained import GrammarCompiler

    compiler = GrammarCompiler(engine.constrained.compiler.info, timeout_s=30)  # as workers=0 builds it
    threads = llguidance_compile_threads
    monkeypatch.setattr(engine.constrained, "_compiler", compiler)
    caller = threading.current_thread()
    try:
        schema = {"type": "object", "properties": {"town": {"type": "string", "maxLength": 16}}, "required": ["town"]}
        out = engine.generate(_chat(engine, "Name a town as JSON."),
                              {"json_schema": schema, "temperature": 0, "max_new_tokens": 24})
        assert threads == [caller] and _valid({"json_schema": schema}, out["text"]), out["text"]
        done, admitted, outputs = threading.Event(), [], []

        def on_output(index, event):
            if event["finished"]:
                outputs.append(event["output"])
                done.set()

        other = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 16}}, "required": ["river"]}
        engine.submit(_chat(engine, "Name a river as JSON."),
                      {"json_schema": other, "temperature": 0, "max_new_tokens": 24},
                      on_output=on_output, on_admitted=admitted.append)
        assert done.wait(120) and admitted == [None]
        assert len(threads) == 2 and threads[1] is not caller
        assert _valid({"json_schema": other}, outputs[0]["text"]), outputs[0]["text"]
    finally:
        compiler.shutdown()
    assert_no_leak(engine)


# llguidance refuses "oneOf" and "not": the schema compiles relaxed (oneOf as anyOf, not dropped) and each
# finished document is validated against it (runtime/relaxed.py)
PET = {"type": "object", "properties": {"kind": {"oneOf": [{"const": "cat"}, {"const": "dog"}]},
                                        "name": {"type": "string", "maxLength": 12, "not": {"const": ""}}},
       "required": ["kind", "name"], "additionalProperties": False}


def test_relaxed_schema_is_validated_and_reported(engine):
    prompt = _chat(engine, "Describe a pet as JSON with its kind and name.")
    healed = "A pet as JSON:"  # token healing backs off ":" (the document is still the output text alone)
    outs = engine.generate([prompt, prompt, healed],
                           [{"temperature": 0, "max_new_tokens": 40, "json_schema": PET},
                            {"temperature": 0.9, "seed": 5, "max_new_tokens": 40, "json_schema": PET},
                            {"temperature": 0, "max_new_tokens": 40, "json_schema": PET}])
    assert outs[2]["meta_info"]["healed_tokens"] == 1
    streamed = list(engine.generate(prompt, {"temperature": 0, "max_new_tokens": 40, "json_schema": PET}, stream=True))
    assert len(streamed) == 1  # validated before anything is sent: one final event
    for out in [*outs, streamed[0]]:
        meta = out["meta_info"]
        assert meta["schema_relaxed"] == ["not", "oneOf"]
        assert 1 <= meta["schema_attempts"] <= engine.config.grammar_relaxed_max_attempts
        assert meta["finish_reason"]["type"] == "stop"
        assert meta["schema_valid"] is jsonschema.Draft202012Validator(PET).is_valid(json.loads(out["text"]))
        if not meta["schema_valid"]:  # every attempt failed: said so, never passed off as valid
            assert meta["schema_attempts"] == engine.config.grammar_relaxed_max_attempts and meta["schema_error"]
    assert streamed[0]["text"] == outs[0]["text"]
    exact = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 40, "json_schema": PERSON})
    assert not any(k.startswith("schema_") for k in exact["meta_info"])  # exact schemas: nothing new
    assert_no_leak(engine)


def test_relaxed_schema_invalid_every_attempt_says_so(engine):
    never = {"type": "integer", "minimum": 0, "maximum": 9, "not": {"type": "integer"}}  # no document validates
    out = engine.generate(_chat(engine, "A digit."), {"temperature": 0, "max_new_tokens": 8, "json_schema": never})
    meta = out["meta_info"]
    assert meta["schema_relaxed"] == ["not"] and meta["schema_valid"] is False
    assert meta["schema_attempts"] == engine.config.grammar_relaxed_max_attempts == 3
    assert "not" in meta["schema_error"]
    assert meta["finish_reason"]["type"] == "stop" and 0 <= json.loads(out["text"]) <= 9  # honest finish reason
    assert_no_leak(engine)


def test_relaxed_retry_at_temperature_0_samples_again(engine, monkeypatch):
    from plait.runtime.constrained.relax import SchemaValidator
    from plait.runtime.relaxed import RETRY_MIN_TEMPERATURE

    calls = []
    real = SchemaValidator.error
    monkeypatch.setattr(SchemaValidator, "error", lambda self, text: calls.append(text) or (
        "rejected by the test" if len(calls) == 1 else real(self, text)))
    seen = []
    original_add = engine.scheduler.add_request
    monkeypatch.setattr(engine.scheduler, "add_request", lambda req: seen.append(req.params) or original_add(req))
    out = engine.generate(_chat(engine, "A digit."),
                          {"temperature": 0, "max_new_tokens": 8, "json_schema": {"type": "integer", "not": {"const": 5}}})
    assert out["meta_info"]["schema_attempts"] == 2 and len(calls) == 2
    assert [p.temperature for p in seen] == [0, RETRY_MIN_TEMPERATURE]
    assert out["meta_info"]["schema_valid"] is (json.loads(out["text"]) != 5)
    assert_no_leak(engine)


def test_relaxed_request_aborted_while_validated_is_not_sampled_again(engine, monkeypatch):
    from plait.runtime.constrained.relax import SchemaValidator
    from plait.runtime.relaxed import RETRY_SEED_STRIDE

    entered, release = threading.Event(), threading.Event()

    def blocking_error(self, text):
        entered.set()
        release.wait(10)
        return "rejected by the test"

    monkeypatch.setattr(SchemaValidator, "error", blocking_error)
    seen = []
    original_add = engine.scheduler.add_request
    monkeypatch.setattr(engine.scheduler, "add_request", lambda req: seen.append(req.params.seed) or original_add(req))
    params = {"temperature": 0, "seed": 11, "max_new_tokens": 8, "json_schema": {"type": "integer", "not": {"const": 5}}}
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=engine.generate("A digit:", params, rid="held")))
    worker.start()
    assert entered.wait(30)
    engine.abort("held")  # while its first document is being validated
    release.set()
    worker.join(30)
    meta = result["out"]["meta_info"]
    assert meta["schema_attempts"] == 1 and meta["schema_valid"] is False and seen == [11]
    # not aborted: every attempt is made, each with its own seed
    out = engine.generate("A digit:", params)
    assert out["meta_info"]["schema_attempts"] == 3 and out["meta_info"]["schema_valid"] is False
    assert seen[1:] == [11, 11 + RETRY_SEED_STRIDE, 11 + 2 * RETRY_SEED_STRIDE]
    assert_no_leak(engine)


def test_relaxed_retry_that_cannot_be_queued_still_delivers(engine, monkeypatch):
    import plait.runtime.relaxed as relaxed

    def broken(engine, req):
        raise RuntimeError("simulated")

    monkeypatch.setattr(relaxed, "retry_of", broken)
    never = {"type": "integer", "minimum": 0, "maximum": 9, "not": {"type": "integer"}}
    out = engine.generate("A digit:", {"temperature": 0, "max_new_tokens": 4, "json_schema": never})
    assert out["meta_info"]["schema_attempts"] == 1 and out["meta_info"]["schema_valid"] is False
    assert_no_leak(engine)
