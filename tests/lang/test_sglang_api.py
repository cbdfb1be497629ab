"""SGLang frontend API that plait matches: gen_string, select's argument order, image/video refused clearly,
separate_reasoning, text_async_iter(return_meta_data=True), SGLang's regex constants. MockBackend only."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import plait as pl
from plait.lang import BackendCapabilityError, MockBackend


def test_gen_string_is_a_quoted_json_string(mock):
    backend = MockBackend(default='"Paris"')
    state = pl.function(lambda s: s.__iadd__("City: " + pl.gen_string("city", max_tokens=4))).run(backend=backend)
    assert state["city"] == "Paris" and state.text() == 'City: "Paris"'
    assert backend.calls_of("generate")[0].params.regex == pl.lang.primitives.DTYPE_REGEX[str]
    for typed in (pl.gen_int, pl.gen_float, pl.gen_string):  # SGLang's order: name, max_tokens, ...
        assert list(inspect.signature(typed).parameters)[:2] == ["name", "max_tokens"]
    assert pl.gen_string("s", 7).overrides_dict()["max_new_tokens"] == 7


def test_select_takes_sglangs_positional_order():
    node = pl.select("answer", ["yes", "no"], 0.0, pl.greedy_token_selection)
    assert node.choices == ("yes", "no") and node.choices_method is pl.greedy_token_selection
    positional = [n for n, p in inspect.signature(pl.select).parameters.items() if p.kind is not p.KEYWORD_ONLY]
    assert positional == ["name", "choices", "temperature", "choices_method"]  # plait's own options are keyword-only
    with pytest.raises(ValueError, match="temperature"):
        pl.select("answer", ["yes", "no"], 0.7)


def test_sglang_regex_constants_are_the_dtype_regexes():
    from plait.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR
    from plait.lang.primitives import DTYPE_REGEX, NUMBER_END

    assert REGEX_INT == DTYPE_REGEX[int] + NUMBER_END[0] and REGEX_FLOAT == DTYPE_REGEX[float] + NUMBER_END[0]
    assert REGEX_BOOL == DTYPE_REGEX[bool] and REGEX_STR == DTYPE_REGEX[str]
    with pytest.raises(ImportError, match="REGEX_DATE"):
        from plait.lang.ir import REGEX_DATE  # noqa: F401


@pytest.mark.parametrize("media", [pl.image("photo.png"), pl.video("clip.mp4", 8)])
def test_image_and_video_are_not_supported_by_the_model(mock, media):
    @pl.function
    def describe(s):
        s += pl.user(media + "Describe it.")
        s += pl.assistant(pl.gen("answer", max_tokens=4))

    with pytest.raises(BackendCapabilityError, match="input .* is not supported by this model: backend 'mock'") as info:
        describe.run(backend=mock)
    assert "photo.png" in str(info.value) or "clip.mp4 (8 frames)" in str(info.value)
    assert mock.calls_of("generate") == []  # refused before anything was generated
    assert "not supported by this model" in describe.trace().stopped


THINKING = "<think>The capital of France\nis Paris.</think>\n\nIt is Paris."


@pytest.mark.parametrize("stream", [False, True])
def test_separate_reasoning_keeps_the_reasoning_apart(stream):
    backend = MockBackend(default=THINKING, token_delay_s=0.001 if stream else 0.0)

    @pl.function
    def ask(s):
        s += pl.user("Capital of France?")
        s += pl.assistant(pl.separate_reasoning(pl.gen("answer", max_tokens=32), model_type="qwen3"))
        s += pl.user("Thanks")

    state = ask.run(backend=backend, stream=stream)
    pieces = list(state.text_iter("answer"))
    assert state["answer"] == "It is Paris." and "".join(pieces) == "It is Paris."
    assert state["answer_reasoning_content"] == "The capital of France\nis Paris."
    assert state.messages()[1] == {"role": "assistant", "content": "It is Paris."}  # the reasoning left the prompt
    assert "<think>" not in state.text()
    if stream:
        assert len(pieces) > 1


def test_deepseek_r1_output_starts_inside_the_reasoning():
    backend = MockBackend(default="six times seven</think>\n\n42")
    ask = pl.function(lambda s: s.__iadd__(
        "Q: 6*7?\nA:" + pl.separate_reasoning(pl.gen("n", max_tokens=16), "deepseek-r1")))
    state = ask.run(backend=backend)
    assert state["n"] == "42" and state["n_reasoning_content"] == "six times seven"
    assert state.text() == "Q: 6*7?\nA:42"


def test_separate_reasoning_arguments():
    with pytest.raises(ValueError, match="model_type, one of qwen3, deepseek-r1, gpt-oss; got 'o1'"):
        pl.separate_reasoning(pl.gen("a"), model_type="o1")
    with pytest.raises(ValueError, match="named gen"):
        pl.separate_reasoning(pl.gen(), model_type="qwen3")
    with pytest.raises(ValueError, match="no gen"):
        pl.separate_reasoning("text only", model_type="qwen3")
    node = pl.separate_reasoning(pl.gen("a") + " and " + pl.gen("b"), model_type="gpt-oss")
    gens = [n for n in node.nodes if isinstance(n, pl.lang.ir.Gen)]
    assert [g.reasoning for g in gens] == ["gpt-oss", "gpt-oss"]


def test_gpt_oss_reasoning_reads_special_tokens():
    backend = MockBackend(default="<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final"
                                  "<|message|>Paris")
    ask = pl.function(lambda s: s.__iadd__(pl.separate_reasoning(pl.gen("a", max_tokens=32), "gpt-oss")))
    state = ask.run(backend=backend)
    assert (state["a"], state["a_reasoning_content"]) == ("Paris", "think")
    assert backend.calls_of("generate")[0].params.skip_special_tokens is False


def test_text_async_iter_with_meta_data_reports_each_pieces_logprobs():
    backend = MockBackend(default="one two three four five", token_delay_s=0.005)

    @pl.function
    def qa(s):
        s += "Q: count\nA:" + pl.gen("answer", max_tokens=8, return_logprob=True)

    async def collect(state):
        return [chunk async for chunk in state.text_async_iter("answer", return_meta_data=True)]

    chunks = asyncio.run(collect(qa.run(backend=backend, stream=True)))
    assert "".join(text for text, _ in chunks) == "one two three four five" and len(chunks) > 1
    previous = 0
    for text, meta in chunks:  # SGLang's test_stream_logprobs checks exactly this
        assert text and meta["completion_tokens"] == meta["output_token_logprobs_length"]
        assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] - previous
        previous = meta["completion_tokens"]
    finished = qa.run(backend=backend)  # a finished run: one piece with the whole meta
    [(text, meta)] = list(finished.text_iter("answer", return_meta_data=True))
    assert text == "one two three four five" and len(meta["output_token_logprobs"]) == 5
    assert meta["finish_reason"]["type"] == "stop"


def test_return_meta_data_needs_a_variable(mock):
    state = pl.function(lambda s: s.__iadd__(pl.gen("a", max_tokens=2))).run(backend=mock)
    with pytest.raises(ValueError, match="name its variable"):
        state.text_iter(return_meta_data=True)
    with pytest.raises(ValueError, match="name its variable"):
        state.text_async_iter(return_meta_data=True)


def test_runtime_endpoint_is_sglangs_name_for_the_endpoint_backend():
    """``sgl.set_default_backend(sgl.RuntimeEndpoint(url))`` ports by changing the import."""
    import plait.lang

    assert pl.RuntimeEndpoint is pl.Endpoint and plait.lang.RuntimeEndpoint is plait.lang.Endpoint
    assert "RuntimeEndpoint" in pl.__all__ and "RuntimeEndpoint" in plait.lang.__all__
