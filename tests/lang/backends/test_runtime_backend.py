"""The in-process Runtime backend on the bundled model, checked against direct engine calls."""

from __future__ import annotations

import itertools

import pytest

from plait.lang.backends.base import Backend, GenerateCall
from plait.sampling import SamplingParams
from tests.runtime.engine_helpers import assert_cumulative, assert_no_leak, wait_until

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def rt(bundled_model_dir):
    from plait.lang.backends.runtime import Runtime

    # float32 everywhere: on a GPU the default bf16 makes results depend on batch shape
    runtime = Runtime(model=str(bundled_model_dir), dtype="float32", max_total_tokens=8192)
    yield runtime
    runtime.shutdown()


def prompt_logprobs(rt, ids: list[int], start: int) -> list[float | None]:
    """Logprobs of ``ids[start:]`` from one direct engine call (the reference for score_choices)."""
    out = rt.engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                             logprob_start_len=start)
    return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]


def test_is_a_backend(rt):
    assert isinstance(rt, Backend)
    assert rt.name.startswith("runtime ")


def test_generate_equals_engine_greedy(rt):
    prompt = "The capital of France is"
    result = rt.generate(GenerateCall(prompt, GREEDY, return_logprob=True, top_logprobs_num=2))
    direct = rt.engine.generate(prompt, GREEDY, return_logprob=True, top_logprobs_num=2)
    assert result.text == direct["text"] and result.text
    assert result.finished and result.finish_reason == direct["meta_info"]["finish_reason"]
    assert result.prompt_tokens == direct["meta_info"]["prompt_tokens"]
    assert result.completion_tokens == len(direct["output_ids"]) == len(result.output_token_logprobs)
    assert [e[1] for e in result.output_token_logprobs] == direct["output_ids"]
    assert all(isinstance(e[2], str) for e in result.output_token_logprobs)  # token text is included
    assert all(len(top) == 2 for top in result.output_top_logprobs)
    for (lp, _, _), (ref, _, _) in zip(result.output_token_logprobs, direct["meta_info"]["output_token_logprobs"]):
        assert lp == pytest.approx(ref, abs=1e-4)
    assert result.latency_s > 0


def test_stream_snapshots_are_cumulative_and_match_generate(rt):
    call = GenerateCall("Count: 1, 2, 3,", GREEDY)
    snaps = list(rt.stream(call))
    assert len(snaps) > 1
    assert [s.finished for s in snaps] == [False] * (len(snaps) - 1) + [True]
    for a, b in itertools.pairwise(snaps):
        assert b.text.startswith(a.text)
    assert snaps[-1].text == rt.generate(call).text
    assert snaps[-1].finish_reason["type"] == "length"
    assert_cumulative([{"text": s.text, "output_ids": s.meta["output_ids"],
                        "meta_info": {"finish_reason": s.finish_reason}} for s in snaps])


def test_closing_a_stream_aborts_the_request(rt):
    before = rt.engine.stats()["generated_tokens"]
    stream = rt.stream(GenerateCall("Write a long story about a dragon.", SamplingParams(max_new_tokens=500)))
    first = next(stream)
    assert not first.finished
    stream.close()
    wait_until(lambda: rt.engine.stats()["running"] == 0, what="the aborted request to leave")
    assert rt.engine.stats()["generated_tokens"] - before < 100


def test_score_choices_equal_direct_prompt_logprobs(rt):
    tok = rt.engine.tokenizer
    prefix = "The capital of France is"
    scores = rt.score_choices(prefix, [" Paris", " London", " a big city"])
    n_prefix = len(tok.encode(prefix))
    for score in scores:
        ids = tok.encode(prefix + score.choice)
        assert score.token_ids == ids[n_prefix:]
        assert len(score.token_logprobs) == len(score.top_token_ids) == len(score.token_ids)
        assert score.token_logprobs == pytest.approx(prompt_logprobs(rt, ids, n_prefix), abs=1e-4)
        assert score.unconditional_token_logprobs is None
    paris = scores[0]
    assert paris.token_logprobs[0] > scores[1].token_logprobs[0]  # the model knows its capitals
    assert paris.top_token_ids[0] == paris.token_ids[0]  # " Paris" is also the greedy next token
    assert paris.cached_tokens > 0  # the prefix was cached first and shared


def test_score_choices_token_merging_across_the_boundary(rt):
    tok = rt.engine.tokenizer
    prefix = "The answer is "  # ends in a space that merges into the choice's first token
    assert tok.encode(prefix + "yes")[:-1] != tok.encode(prefix)
    scores = rt.score_choices(prefix, ["yes", "no"])
    for score in scores:
        ids = tok.encode(prefix + score.choice)
        start = len(ids) - 1
        assert score.token_ids == ids[start:] == tok.encode(" " + score.choice)
        assert score.token_logprobs == pytest.approx(prompt_logprobs(rt, ids, start), abs=1e-4)


def test_score_choices_unconditional_scores_the_choice_tokens_alone(rt):
    scores = rt.score_choices("Q: Is the sky blue?\nA:", [" yes", " no, it is not"], unconditional=True)
    for score in scores:
        alone = prompt_logprobs(rt, score.token_ids, 0)
        assert alone[0] is None  # nothing precedes the first token: reported as 0.0, as SGLang does
        assert score.unconditional_token_logprobs[0] == 0.0
        assert score.unconditional_token_logprobs[1:] == pytest.approx(alone[1:], abs=1e-4)
        assert len(score.unconditional_token_logprobs) == len(score.token_logprobs)


def test_score_choices_after_an_empty_prefix_uses_the_start_token(rt):
    scores = rt.score_choices("", ["Hello", "Goodbye"])
    tok = rt.engine.tokenizer
    for score in scores:
        assert score.token_ids == tok.encode(score.choice)
        assert all(lp < 0 for lp in score.token_logprobs)


def test_score_choices_rejects_bad_choices(rt):
    with pytest.raises(ValueError, match="non-empty list"):
        rt.score_choices("x", [])
    with pytest.raises(ValueError, match="non-empty str"):
        rt.score_choices("x", ["a", ""])


def test_chat_template_derived_from_the_tokenizer_is_chatml(rt):
    from plait.lang.chat_template import get_chat_template

    derived = rt.chat_template()
    chatml = get_chat_template("chatml")
    assert derived.role_prefix_and_suffix == chatml.role_prefix_and_suffix
    assert derived.stop_str == ("<|im_end|>",)
    assert derived.default_system_prompt.startswith("You are a helpful AI assistant named SmolLM")
    assert rt.chat_template() is derived  # derived once


def test_program_ids_pin_and_release(rt):
    eng = rt.engine
    rt.begin_program("prog-1")
    rt.generate(GenerateCall("Tell me about the moon.", GREEDY, program_id="prog-1"))
    rt.score_choices("The moon is", [" bright", " dark"], program_id="prog-1")
    stats = eng.stats()
    assert stats["pinned_programs"] == 1 and stats["pinned_tokens"] > 0
    assert eng.pins.pinned_tokens("prog-1") == stats["pinned_tokens"]
    rt.end_program("prog-1")
    assert eng.stats()["pinned_tokens"] == 0 and eng.stats()["open_programs"] == 0
    assert_no_leak(eng)


def test_cached_tokens_on_a_repeated_prefix(rt):
    prefix = "You are a careful assistant. Answer in one word. " * 4
    rt.cache_prefix(prefix)
    n_prefix = len(rt.engine.tokenizer.encode(prefix))
    result = rt.generate(GenerateCall(prefix + "What color is grass?", GREEDY))
    assert result.cached_tokens >= n_prefix - 1


def test_bad_arguments(rt, bundled_model_dir):
    from plait.lang.backends.runtime import Runtime

    with pytest.raises(ValueError, match="n=2"):
        rt.generate(GenerateCall("hi", SamplingParams(n=2)))
    with pytest.raises(ValueError, match="n=2"):
        rt.stream(GenerateCall("hi", SamplingParams(n=2)))
    with pytest.raises(TypeError, match="existing engine"):
        Runtime(engine=rt.engine, max_total_tokens=64)
    with Runtime(engine=rt.engine) as wrapper:  # wraps; leaving the block leaves the engine running
        assert wrapper.engine is rt.engine
    assert rt.generate(GenerateCall("hi", SamplingParams(max_new_tokens=1))).finished


def test_cache_prefix_leaves_out_a_last_token_that_merges(rt):
    """A prefix ending in a space: the prompt continues it with " Paris", one token, so the prefix's own
    last token (the space) is in no prompt; it is not cached, and every cached token is hit."""
    rt.engine.flush_cache()
    prefix = "Name the city. The capital of France is "
    ids = rt.engine.tokenizer.encode(prefix)
    full = rt.engine.tokenizer.encode(prefix + "Paris")
    assert full[: len(ids) - 1] == ids[:-1] and full[len(ids) - 1] != ids[-1]  # the space merged into " Paris"
    rt.cache_prefix(prefix)
    assert rt.engine.stats()["kv_slots_cached"] == len(ids) - 1
    result = rt.generate(GenerateCall(prefix + "Paris", GREEDY))
    assert result.cached_tokens == len(ids) - 1


def test_a_tool_agent_on_the_bundled_model(rt):
    """SmolLM2's template has no tool support: tools are shown in the plain format; the model's call
    is generated under the grammar (valid for the schema), run, and answered in a last turn."""
    import jsonschema

    import plait as pl
    from plait.lang.tool_format import PlainToolRendering, tool_rendering_of

    assert isinstance(tool_rendering_of(rt.chat_template()), PlainToolRendering)

    @pl.tool
    def get_weather(city: str, days: int = 1) -> str:
        """Get the weather forecast of a city."""
        return f"sunny in {city} for {days} day(s)"

    @pl.function
    def agent(s):
        s += pl.system("You answer questions about the weather.", tools=[get_weather])
        s += pl.user("What is the weather in Paris?")
        s += pl.call_tools("answer", tool_choice="required", parallel=False, max_steps=1, max_tokens=48)

    state = agent.run(backend=rt, temperature=0)
    meta = state.get_meta_info("answer")
    [result] = meta["tool_results"]
    jsonschema.validate(result.call.arguments, get_weather.parameters)
    assert result.error is None and result.content.startswith("sunny in ")
    assert f"<tool_response>\n{result.content}\n</tool_response>" in state.text()
    assert meta["max_steps_reached"] and '<tool_call>\n{"name": "' not in state["answer"]
    assert [c.kind for c in state.calls] == ["call_tools", "call_tools"]
