"""gen, select, roles, var_scope and state access, against the MockBackend."""

from __future__ import annotations

import json
import math

import pytest

import plait as pl
from plait.lang import MockBackend
from plait.lang.primitives import DTYPE_REGEX, NUMBER_END


def run(body, backend, **kwargs):
    return pl.function(body).run(backend=backend, **kwargs)


def test_gen_appends_and_stores(mock):
    def body(s):
        s += "The capital of France is"
        s += pl.gen("city", max_tokens=4)
        s += "."

    state = run(body, mock)
    assert state["city"] == " Paris"
    assert state.text() == "The capital of France is Paris."
    call = mock.calls_of("generate")[0]
    assert call.prompt == "The capital of France is"
    assert call.params.max_new_tokens == 4


def test_gen_stop_and_max_tokens(mock):
    def body(s):
        s += "Count:" + pl.gen("a", stop=" three") + "|" + pl.gen("b", max_tokens=2)

    state = run(body, mock)
    assert state["a"] == " one two"
    assert state.get_meta_info("a")["finish_reason"] == {"type": "stop", "matched": " three"}
    assert state["b"] == " one two"
    assert state.get_meta_info("b")["finish_reason"]["type"] == "length"
    assert mock.calls_of("generate")[0].params.stop == (" three",)


def test_run_sampling_defaults_and_gen_overrides(mock):
    def body(s):
        s += "x" + pl.gen("a") + pl.gen("b", temperature=0.7, top_p=0.5, top_k=3, seed=1, min_tokens=1)

    run(body, mock, temperature=0, max_new_tokens=9, stop=["\n"])
    first, second = (c.params for c in mock.calls_of("generate"))
    assert (first.temperature, first.max_new_tokens, first.stop) == (0.0, 9, ("\n",))
    assert (second.temperature, second.top_p, second.top_k, second.seed, second.min_new_tokens) == (0.7, 0.5, 3, 1, 1)
    assert second.max_new_tokens == 9  # the run default fills what gen leaves unset


def test_gen_validates_sampling_values_at_the_call():
    with pytest.raises(ValueError, match="top_p"):
        pl.gen("x", top_p=2.0)


@pytest.mark.parametrize(
    ("dtype", "output", "value"),
    [(int, "-42", -42), (float, "3.25", 3.25), (bool, "False", False), (str, '"hi there"', "hi there")],
)
def test_dtype_maps_to_regex_and_converts(dtype, output, value):
    backend = MockBackend(default=output)
    state = run(lambda s: s.__iadd__(pl.gen("v", dtype=dtype)), backend)
    assert state["v"] == value and type(state["v"]) is dtype
    number_end = NUMBER_END[0] if dtype in (int, float) else ""
    assert mock_regex(backend) == DTYPE_REGEX[dtype] + number_end
    assert state.text() == output


def mock_regex(backend):
    return backend.calls_of("generate")[-1].params.regex


def test_dtype_regexes_accept_and_reject():
    import re

    assert re.fullmatch(DTYPE_REGEX[int], "-12") and not re.fullmatch(DTYPE_REGEX[int], "1.5")
    assert re.fullmatch(DTYPE_REGEX[float], "1.5e-3") and not re.fullmatch(DTYPE_REGEX[float], "x")
    assert re.fullmatch(DTYPE_REGEX[bool], "True") and not re.fullmatch(DTYPE_REGEX[bool], "true")
    assert re.fullmatch(DTYPE_REGEX[str], '"a \\"b\\""') and not re.fullmatch(DTYPE_REGEX[str], '"a"b"')


def test_regex_and_json_schema_reach_sampling_params():
    backend = MockBackend(default='{"name": "Ada", "age": 36}')
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}

    def body(s):
        s += pl.gen("r", regex=r"\{.*\}") + pl.gen("j", json_schema=schema) + pl.gen("k", json_schema=json.dumps(schema))

    run(body, backend)
    r, j, k = (c.params for c in backend.calls_of("generate"))
    assert r.regex == r"\{.*\}" and r.json_schema is None
    assert json.loads(j.json_schema) == schema and j.regex is None
    assert json.loads(k.json_schema) == schema


def test_json_schema_from_pydantic_model():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    node = pl.gen("p", json_schema=Person)
    schema = json.loads(dict(node.overrides)["json_schema"])
    assert schema == Person.model_json_schema()
    assert schema["required"] == ["name", "age"]


def test_constraints_are_exclusive():
    with pytest.raises(ValueError, match="dtype"):
        pl.gen("x", dtype=int, regex="[0-9]+")
    with pytest.raises(ValueError, match="mutually exclusive"):
        pl.gen("x", regex="a", json_schema={"type": "string"})


def test_return_logprob_fills_meta(mock):
    state = run(lambda s: s.__iadd__("Count:" + pl.gen("c", max_tokens=3, return_logprob=True, top_logprobs_num=2)), mock)
    meta = state.get_meta_info("c")
    assert len(meta["output_token_logprobs"]) == 3 == meta["completion_tokens"]
    assert [e[2] for e in meta["output_token_logprobs"]] == [" one", " two", " three"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    call = mock.calls_of("generate")[0]
    assert call.return_logprob and call.top_logprobs_num == 2


# ---------------------------------------------------------------------------------------- select
SCORES = {"alpha": [-0.1, -3.0], "beta": [-0.5, -0.6], "gamma": [-1.0, -1.0]}
UNCOND = {"alpha": [math.nan, -2.9], "beta": [math.nan, -0.1], "gamma": [math.nan, -3.0]}


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (None, "beta"),  # best mean: -0.55
        ("token_length_normalized", "beta"),
        (pl.greedy_token_selection, "alpha"),  # best first token
        ("greedy_token_selection", "alpha"),
        (pl.unconditional_likelihood_normalized, "gamma"),  # (-1 - 0 + -1 + 3) / 2 = 0.5
    ],
)
def test_select_methods(method, expected):
    backend = MockBackend(choice_logprobs=SCORES, unconditional_logprobs=UNCOND)
    state = run(lambda s: s.__iadd__("Pick: " + pl.select("x", choices=list(SCORES), choices_method=method)), backend)
    assert state["x"] == expected and state.text() == "Pick: " + expected
    meta = state.get_meta_info("x")
    assert meta["decision"] == expected and meta["choices"] == list(SCORES)
    assert meta["token_logprobs"] == [SCORES[c] for c in SCORES]
    assert meta["normalized_prompt_logprobs"] == pytest.approx([-1.55, -0.55, -1.0])
    assert [e[0] for e in meta["input_token_logprobs"][0]] == SCORES["alpha"]
    (call,) = backend.calls_of("score_choices")
    assert call["prefix"] == "Pick: " and call["choices"] == list(SCORES)
    if expected == "gamma":
        assert call["unconditional"] is True
        assert meta["normalized_unconditional_prompt_logprobs"] == pytest.approx([-0.1, -0.5, 0.5])
    else:
        assert call["unconditional"] is False


def test_greedy_pads_a_shorter_choice_with_its_mean():
    backend = MockBackend(choice_logprobs={"a": [-0.1], "a b": [-0.1, -0.2], "c": [-0.3]})
    state = run(lambda s: s.__iadd__(pl.select("x", choices=["a b", "a", "c"], choices_method="greedy_token_selection")), backend)
    assert state["x"] == "a"
    assert state.get_meta_info("x")["greedy_logprob_matrix"] == [[-0.1, -0.2], [-0.1, -0.1], [-0.3, -0.3]]


def test_gen_with_choices_is_a_select():
    backend = MockBackend(choice_logprobs=SCORES)
    state = run(lambda s: s.__iadd__(pl.gen("x", choices=list(SCORES))), backend)
    assert state["x"] == "beta" and backend.calls_of("score_choices") and not backend.calls_of("generate")


# ---------------------------------------------------------------------------------------- roles
def chat(s):
    s += pl.system("Be brief.")
    s += pl.user("What is the capital of France?")
    s += pl.assistant(pl.gen("answer", max_tokens=8))
    with s.user():
        s += "Thanks"
    with s.assistant():
        s += pl.gen("reply", max_tokens=4)


def test_roles_render_through_the_backend_template():
    mock = MockBackend({"capital of France": " Paris", "Thanks": " Bye"})
    state = run(chat, mock)
    assert state.text() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n Paris<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n Bye<|im_end|>\n"
    )
    assert state.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": " Paris"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": " Bye"},
    ]
    # A gen inside an assistant block stops at the template's stop string.
    assert all(c.params.stop == ("<|im_end|>",) for c in mock.calls_of("generate"))


def test_gen_outside_assistant_has_no_template_stop(mock):
    run(lambda s: s.__iadd__(pl.user("hi " + pl.gen("x", max_tokens=2))), mock)
    assert mock.calls_of("generate")[0].params.stop == ()


def test_assistant_gen_stops_at_template_stop_in_output():
    backend = MockBackend(default=" Paris<|im_end|>\n<|im_start|>user\nmore")
    state = run(lambda s: s.__iadd__(pl.user("q") + pl.assistant(pl.gen("a"))), backend)
    assert state["a"] == " Paris"


def test_default_system_prompt_is_inserted_once():
    state = run(lambda s: s.__iadd__(pl.user("hi") + pl.user("again")), MockBackend(chat_template="smollm2"))
    msgs = state.messages()
    assert msgs[0] == {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}
    assert [m["role"] for m in msgs] == ["system", "user", "user"]


def test_explicit_template_by_run_and_by_decorator(mock):
    body = lambda s: s.__iadd__(pl.user("hi") + pl.assistant(pl.gen("a")))
    assert run(body, mock, chat_template="default").text() == "USER: hi\nASSISTANT:  ok\n"
    prog = pl.function(chat_template="llama-3-instruct")(body)
    text = prog.run(backend=mock).text()
    assert text.startswith("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert mock.calls_of("generate")[-1].params.stop == ("<|eot_id|>",)


def test_role_begin_end_primitives(mock):
    state = run(lambda s: s.__iadd__([pl.user_begin(), "x", pl.user_end()]), mock)
    assert state.messages() == [{"role": "user", "content": "x"}]


# ---------------------------------------------------------------------------------------- state access
def test_var_scope_set_var_and_contains(mock):
    def body(s):
        s += "Q: "
        with s.var_scope("q"):
            s += "capital of France" + pl.gen("g", max_tokens=1)
        s["extra"] = 5
        assert "g" in s and "nope" not in s

    state = run(body, mock)
    assert state["q"] == "capital of France Paris"
    assert state["extra"] == 5
    assert state.variables()["g"] == " Paris"


def test_program_return_value_and_nested_program(mock):
    @pl.function
    def inner(s, x):
        s += f"<{x}>"

    @pl.function
    def outer(s):
        inner(s, "a")
        s += pl.gen("y", max_tokens=1)
        return "done"

    state = outer.run(backend=mock)
    assert state.text() == "<a> ok" and state.ret_value == "done"


def test_unnamed_gen_appends_without_a_variable(mock):
    state = run(lambda s: s.__iadd__("capital of France" + pl.gen(max_tokens=1)), mock)
    assert state.text() == "capital of France Paris" and state.variables() == {}
    assert len(state.calls) == 1


def test_gen_stop_regex_cuts_like_a_stop_string(mock):
    def body(s):
        s += "Count:" + pl.gen("a", stop_regex=r"t\w+e") + "|" + pl.gen("b", stop_regex=[r"z+", r"\stwo"])

    state = run(body, mock)
    assert state["a"] == " one two "  # cut where "three" starts
    assert state.get_meta_info("a")["finish_reason"] == {"type": "stop", "matched": r"t\w+e"}
    assert state["b"] == " one"
    assert mock.calls_of("generate")[1].params.stop_regex == (r"z+", r"\stwo")
    with pytest.raises(ValueError, match="stop_regex"):
        pl.gen("x", stop_regex="(unclosed")
