"""Token healing at the prompt boundary: which prompt tokens are backed off, the healed grammars of both
backends, and constrained generation on the bundled model after a prompt that ends mid-token."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from plait.runtime.constrained import GrammarState, spec_from_params
from plait.runtime.constrained.healing import (
    VocabPrefixIndex,
    backoff_candidates,
    choose_backoff,
    compile_healed,
    escape_regex_literal,
)
from plait.runtime.engine import Engine
from plait.sampling import SamplingParams
from tests.runtime.constrained.conftest import walk
from tests.runtime.engine_helpers import assert_no_leak

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}


@pytest.fixture(scope="module")
def index(tokenizer_info) -> VocabPrefixIndex:
    return VocabPrefixIndex(tokenizer_info)


def _id(info, text: str) -> int:
    ids = info.encode(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


# ---------------------------------------------------------------------- back-off choice
def test_extensions_match_a_scan_of_the_vocabulary(tokenizer_info, index):
    vocab = [(i, b) for i, b in enumerate(tokenizer_info.token_bytes) if b]
    for prefix in (b" Par", b" Paris", b"\n", b"{", b" ", b"zzzzqq", b"\xf0"):
        scanned = sorted(i for i, b in vocab if b.startswith(prefix) and len(b) > len(prefix))
        assert sorted(index.extensions(prefix)) == scanned, prefix
        assert index.has_extension(prefix) == bool(scanned)


def test_last_token_is_backed_off_when_other_tokens_extend_it(tokenizer_info, index):
    ids = tokenizer_info.encode("The capital of France is Par")
    assert ids[-1] == _id(tokenizer_info, " Par")
    assert choose_backoff(tokenizer_info, index, ids) == 1
    assert choose_backoff(tokenizer_info, index, ids, max_tokens=0) == 0
    # a token that no other token starts with is not healed
    lone = _id(tokenizer_info, " Parish")
    assert not any(b and b.startswith(b" Parish") and b != b" Parish" for b in tokenizer_info.token_bytes)
    assert choose_backoff(tokenizer_info, index, [ids[0], lone]) == 0


def test_special_tokens_single_token_prompts_and_split_characters_are_not_healed(tokenizer_info, index):
    par = _id(tokenizer_info, " Par")
    assert choose_backoff(tokenizer_info, index, [par]) == 0  # at least one prompt token stays
    eos = min(tokenizer_info.stop_ids)
    assert choose_backoff(tokenizer_info, index, [par, eos]) == 0  # special tokens are never healed
    # with two tokens allowed, the back-off stops at a special token instead of going past it
    assert backoff_candidates(tokenizer_info, index, [par, eos, par], max_tokens=2) == [1]
    # a token ending inside a UTF-8 character: its text is not a text prefix, so it is not healed
    partial = next(i for i, b in enumerate(tokenizer_info.token_bytes)
                   if b and b[-1] >= 0x80 and _not_utf8(b) and index.has_extension(b))
    assert choose_backoff(tokenizer_info, index, [par, partial]) == 0


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_several_tokens_back_off_largest_first(tokenizer_info, index):
    ids = [_id(tokenizer_info, "The"), _id(tokenizer_info, " P"), _id(tokenizer_info, "ar")]
    assert backoff_candidates(tokenizer_info, index, ids, max_tokens=2) == [2, 1]  # " Par" and "ar"
    assert choose_backoff(tokenizer_info, index, ids, max_tokens=2) == 2
    assert choose_backoff(tokenizer_info, index, ids) == 1


# ---------------------------------------------------------------------- healed grammars
@pytest.mark.parametrize("backend", ["llguidance", "outlines"])
@pytest.mark.parametrize("params, prefix, good, bad", [
    ({"regex": "is|ma"}, " Par", " Paris", "is"),
    ({"choices": ["is", "ma"]}, ' "/.\n', ' "/.\nma', ' "/.ma'),
    ({"json_schema": CITY}, " é", ' é{"city": "Lyon"}', '{"city": "Lyon"}'),
    ({"ebnf": 'start: "is" | "ma"'}, " Par", " Parma", " Par is"),
])
def test_healed_grammar_is_the_prefix_then_the_original(compilers, tokenizer_info, backend, params, prefix, good, bad):
    spec = spec_from_params(SamplingParams(**params))
    if backend == "outlines" and "ebnf" in params:
        pytest.skip("outlines-core has no grammars")
    compiler = compilers[backend]
    healed = compile_healed(compiler, compiler.compile(spec), prefix)
    assert healed.backend_name == backend
    assert walk(GrammarState(healed, tokenizer_info, frozenset()), tokenizer_info, good) == (True, True)
    ok, complete = walk(GrammarState(healed, tokenizer_info, frozenset()), tokenizer_info, bad)
    assert not (ok and complete)  # never looser than "prefix, then the original constraint"


def test_a_token_spanning_the_boundary_is_allowed(compilers, tokenizer_info):
    compiler = compilers["llguidance"]
    healed = compile_healed(compiler, compiler.compile(spec_from_params(SamplingParams(regex="is|ma"))), " Par")
    state = GrammarState(healed, tokenizer_info, frozenset())
    assert state.accept_token(_id(tokenizer_info, " Paris")) == {"type": "stop", "matched": None}


def test_escape_regex_literal_keeps_only_plain_characters():
    assert escape_regex_literal("Par_9") == "Par_9"
    assert escape_regex_literal(' "/é\n') == r"\x{20}\x{22}\x{2f}\x{e9}\x{a}"


# ---------------------------------------------------------------------- on the bundled model
@pytest.fixture(scope="module")
def engine(bundled_model_dir):
    eng = Engine(model=str(bundled_model_dir), max_total_tokens=8192, dtype="float32")
    yield eng
    eng.shutdown()


def _without_healing(engine, *args, **kwargs):
    engine.token_healing.enabled = False
    try:
        return engine.generate(*args, **kwargs)
    finally:
        engine.token_healing.enabled = True


GREEDY = {"temperature": 0, "max_new_tokens": 24}
PARIS = "The capital of France is Par"


@pytest.mark.model
def test_regex_after_a_mid_word_prompt_spans_the_boundary(engine):
    tok = engine.tokenizer
    ids = tok.encode(PARIS)
    healed = engine.generate(PARIS, {**GREEDY, "regex": "is|ma"})
    meta = healed["meta_info"]
    assert meta["healed_tokens"] == 1 and meta["prompt_tokens"] == len(ids) - 1
    assert healed["output_ids"][0] == tok.encode(" Paris", add_special_tokens=False)[0]  # one token across the cut
    assert healed["text"] == "is" and meta["finish_reason"]["type"] == "stop" and meta["incomplete"] is False
    # output_ids spell the healed text, then the returned text
    assert tok.decode(healed["output_ids"]) == " Par" + healed["text"]
    assert meta["completion_tokens"] == len(healed["output_ids"])
    assert meta["cached_tokens"] <= meta["prompt_tokens"]

    plain = _without_healing(engine, PARIS, {**GREEDY, "regex": "is|ma"})
    pmeta = plain["meta_info"]
    assert pmeta["healed_tokens"] == 0 and pmeta["prompt_tokens"] == len(ids)
    assert tok.decode(plain["output_ids"]) == plain["text"] == "is"  # after " Par", "is" is its own token
    assert_no_leak(engine)


@pytest.mark.model
def test_json_after_a_trailing_space_is_valid_and_consistent(engine):
    prompt = "Give the capital of France as JSON: "
    out = engine.generate(prompt, {**GREEDY, "json_schema": CITY})
    meta = out["meta_info"]
    assert meta["healed_tokens"] == 1 and meta["finish_reason"]["type"] == "stop" and meta["incomplete"] is False
    jsonschema.validate(json.loads(out["text"]), CITY)
    assert not out["text"].startswith(" ")
    assert engine.tokenizer.decode(out["output_ids"]) == " " + out["text"]
    # the first (forced) token spans the cut: the canonical " {" form, not " " then "{"
    assert engine.tokenizer.decode(out["output_ids"][:1]).startswith(" {")

    plain = _without_healing(engine, prompt, {**GREEDY, "json_schema": CITY})
    assert plain["meta_info"]["healed_tokens"] == 0
    assert plain["meta_info"]["prompt_tokens"] == meta["prompt_tokens"] + 1
    assert engine.tokenizer.decode(plain["output_ids"]) == plain["text"]
    jsonschema.validate(json.loads(plain["text"]), CITY)


@pytest.mark.model
def test_streamed_text_and_stop_strings_leave_the_healed_text_out(engine):
    # the stop string is the healed text itself: it is prompt, so it must not end the output
    params = {**GREEDY, "max_new_tokens": 6, "regex": "is[a-z ,]*", "stop": ["Par"]}
    snapshots = list(engine.generate(PARIS, params, stream=True))
    final = snapshots[-1]
    assert final["meta_info"]["healed_tokens"] == 1
    assert final["text"].startswith("is") and re.fullmatch("is[a-z ,]*", final["text"])
    assert final["meta_info"]["finish_reason"]["type"] == "length"
    for snap in snapshots:
        assert final["text"].startswith(snap["text"]) and not snap["text"].startswith(" Par")
    stopped = engine.generate(PARIS, {**params, "stop": [","]})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": ","}
    assert stopped["text"] == final["text"].split(",")[0]


@pytest.mark.model
def test_when_healing_does_not_apply(engine):
    tok = engine.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "A city as JSON."}])
    # the chat prompt ends with "\n"; no token starting with "\n" can begin the JSON: nothing to heal
    out = engine.generate(chat, {**GREEDY, "json_schema": CITY})
    assert out["meta_info"]["healed_tokens"] == 0
    assert out["meta_info"]["prompt_tokens"] == len(tok.encode(chat))
    # prompt logprobs are for the prompt as given: no healing
    scored = engine.generate(PARIS, {**GREEDY, "regex": "is|ma"}, return_logprob=True, logprob_start_len=0)
    assert scored["meta_info"]["healed_tokens"] == 0
    assert len(scored["meta_info"]["input_token_logprobs"]) == len(tok.encode(PARIS))
    # unconstrained greedy requests are untouched
    plain = engine.generate(PARIS, {**GREEDY, "max_new_tokens": 8})
    assert "healed_tokens" not in plain["meta_info"]
    assert plain["output_ids"] == _without_healing(engine, PARIS, {**GREEDY, "max_new_tokens": 8})["output_ids"]
    assert plain["meta_info"]["prompt_tokens"] == len(tok.encode(PARIS))


@pytest.mark.model
def test_outlines_backend_heals_too(engine):
    compiler = engine.constrained.compiler
    compiler.backend = "outlines"
    try:
        out = engine.generate(PARIS, {**GREEDY, "regex": "(is|ma)!?"})
    finally:
        compiler.backend = "auto"
    assert out["meta_info"]["healed_tokens"] == 1
    assert out["output_ids"][0] == engine.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert re.fullmatch("(is|ma)!?", out["text"])
    assert_no_leak(engine)
