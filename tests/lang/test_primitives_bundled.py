"""The language on the real bundled model (SmolLM2-135M-Instruct) through ``pl.Runtime``.

Greedy results are compared with direct engine calls on the prompt the program rendered, so the
tests check the language's rendering and plumbing, not what the small model happens to say.
"""

from __future__ import annotations

import pytest

import plait as pl

runtime_module = pytest.importorskip(
    "plait.lang.backends.runtime", reason="plait.lang.backends.runtime (the in-process backend) is not built yet"
)

pytestmark = pytest.mark.model
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def rt(bundled_model_dir):
    # float32 everywhere: on a GPU the default bf16 makes results depend on batch shape
    runtime = runtime_module.Runtime(model=str(bundled_model_dir), dtype="float32", max_total_tokens=8192)
    yield runtime
    runtime.shutdown()


def engine_text(rt, prompt: str, **params) -> str:
    return rt.engine.generate(prompt, {"temperature": 0.0, **params})["text"]


def test_gen_stop_and_max_tokens(rt):
    @pl.function
    def prog(s):
        s += "Count from one to ten: one, two, three,"
        s += pl.gen("upto", max_tokens=24, stop=" six")
        s += "\nThe capital of France is"
        s += pl.gen("capital", max_tokens=5)

    state = prog.run(backend=rt, **GREEDY)
    first_prompt = "Count from one to ten: one, two, three,"
    assert state["upto"] == engine_text(rt, first_prompt, max_new_tokens=24, stop=[" six"])
    assert " six" not in state["upto"] and state.get_meta_info("upto")["finish_reason"]["type"] == "stop"
    meta = state.get_meta_info("capital")
    assert meta["completion_tokens"] == 5 and meta["finish_reason"]["type"] == "length"
    prompt = first_prompt + state["upto"] + "\nThe capital of France is"
    assert state["capital"] == engine_text(rt, prompt, max_new_tokens=5)
    assert state.text() == prompt + state["capital"]


def test_gen_stop_regex_cuts_where_the_pattern_matches(rt):
    prompt = "Count with me: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
    count = pl.function(lambda s: s.__iadd__(prompt + pl.gen("rest", max_tokens=24, stop_regex=r"1[5-9],")))
    state = count.run(backend=rt, **GREEDY)
    full = engine_text(rt, prompt, max_new_tokens=24)
    assert "15," in full and state["rest"] == full[: full.index("15,")]
    assert state.get_meta_info("rest")["finish_reason"] == {"type": "stop", "matched": r"1[5-9],"}


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized"])
def test_select_methods(rt, method):
    @pl.function
    def prog(s):
        s += pl.user("Is Paris the capital of France? Answer yes or no.")
        s += pl.assistant(pl.select("answer", choices=["yes", "no", "maybe later"], choices_method=method))

    state = prog.run(backend=rt)
    meta = state.get_meta_info("answer")
    assert state["answer"] in ("yes", "no", "maybe later") and meta["method"] == method
    assert [len(t) for t in meta["token_logprobs"]][2] > 1  # "maybe later" is several tokens
    assert all(lp <= 0 for row in meta["token_logprobs"] for lp in row)
    if method == "token_length_normalized":
        scores = meta["normalized_prompt_logprobs"]
        assert state["answer"] == meta["choices"][scores.index(max(scores))]
    if method == "unconditional_likelihood_normalized":
        assert len(meta["normalized_unconditional_prompt_logprobs"]) == 3


def test_roles_use_the_models_chat_template(rt):
    @pl.function
    def chat(s):
        s += pl.system("You are a terse assistant.")
        s += pl.user("Name a color.")
        s += pl.assistant(pl.gen("color", max_tokens=24))

    state = chat.run(backend=rt, **GREEDY)
    messages = state.messages()[:2]
    prompt = rt.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert state.text().startswith(prompt)
    expected = engine_text(rt, prompt, max_new_tokens=24, stop=["<|im_end|>"])
    assert state["color"] == expected and "<|im_end|>" not in state["color"]
    assert state.text() == prompt + expected + "<|im_end|>\n"
    template = rt.chat_template()
    assert template.role_prefix_and_suffix["user"] == ("<|im_start|>user\n", "<|im_end|>\n")


def test_fork_join_and_streaming(rt):
    @pl.function
    def prog(s):
        s += "Here are two fruits and their colors.\n"
        forks = s.fork(2)
        for f, fruit in zip(forks, ["Banana:", "Cherry:"]):
            f += fruit + pl.gen("color", max_tokens=4, stop="\n")
        forks.join()

    state = prog.run(backend=rt, **GREEDY)
    base = "Here are two fruits and their colors.\n"
    assert state["color"] == [engine_text(rt, base + f, max_new_tokens=4, stop=["\n"]) for f in ("Banana:", "Cherry:")]

    stream_prog = pl.function(lambda s: s.__iadd__("The capital of France is" + pl.gen("c", max_tokens=6)))
    streamed = stream_prog.run(backend=rt, stream=True, **GREEDY)
    chunks = list(streamed.text_iter("c"))
    assert len(chunks) > 1 and "".join(chunks) == streamed["c"] == engine_text(rt, "The capital of France is", max_new_tokens=6)


def test_run_batch_equals_single_runs(rt):
    @pl.function
    def prog(s, city):
        s += "Answer briefly.\nQ: Which country is " + city + " in?\nA:"
        s += pl.gen("country", max_tokens=4, stop="\n")

    items = [{"city": c} for c in ("Rome", "Madrid", "Oslo")]
    states = prog.run_batch(items, backend=rt, **GREEDY)
    assert [s["country"] for s in states] == [prog.run(backend=rt, **GREEDY, **i)["country"] for i in items]
    assert prog.batch_prefix(items) == "Answer briefly.\nQ: Which country is "
    assert all(s.calls[0].cached_tokens > 0 for s in states)  # the traced prefix was prefilled
