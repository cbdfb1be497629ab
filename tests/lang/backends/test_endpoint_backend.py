"""The Endpoint backend against a real ``plait serve`` on loopback, checked against direct HTTP calls."""

from __future__ import annotations

import itertools
import time

import pytest

from plait.lang.backends.base import Backend, GenerateCall
from plait.sampling import SamplingParams
from tests.server.server_helpers import assert_idle_and_flushed

pytestmark = pytest.mark.model
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def server(default_server):
    return default_server


@pytest.fixture(scope="module")
def endpoint(server):
    from plait.lang.backends.endpoint import Endpoint

    backend = Endpoint(server.url)
    yield backend
    backend.close()


def direct(server, text, **fields) -> dict:
    return server.post("/generate", {"text": text, **fields}).json()


def test_is_a_backend_that_found_the_extensions(endpoint):
    assert isinstance(endpoint, Backend) and endpoint.name.startswith("endpoint http://127.0.0.1:")
    assert {"apply_chat_template", "program_id", "end_program"} <= endpoint.extensions


def test_generate_equals_the_server(endpoint, server):
    result = endpoint.generate(GenerateCall("The capital of France is", GREEDY, return_logprob=True,
                                            top_logprobs_num=2))
    ref = direct(server, "The capital of France is", sampling_params={"temperature": 0, "max_new_tokens": 10})
    assert result.text == ref["text"] and result.finished
    assert result.finish_reason == ref["meta_info"]["finish_reason"]
    assert result.completion_tokens == 10 == len(result.output_token_logprobs)
    assert [e[1] for e in result.output_token_logprobs] == ref["output_ids"]
    assert all(isinstance(e[2], str) for e in result.output_token_logprobs)
    assert all(len(top) == 2 for top in result.output_top_logprobs)
    assert ref["meta_info"]["cached_tokens"] > 0 and result.latency_s > 0  # the second call hit the cache


def test_stop_regex_and_logit_bias_travel_over_http(endpoint, server):
    prompt = "Count with me: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, stop_regex=[r"1[5-9],"])
    result = endpoint.generate(GenerateCall(prompt, params))
    ref = direct(server, prompt, sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    assert "15," in ref["text"] and result.text == ref["text"][: ref["text"].index("15,")]
    assert result.finish_reason == {"type": "stop", "matched": r"1[5-9],"}
    banned = ref["output_ids"][0]
    biased = endpoint.generate(GenerateCall(prompt, SamplingParams(temperature=0.0, max_new_tokens=1,
                                                                   logit_bias={banned: -100}), return_logprob=True))
    assert biased.output_token_logprobs[0][1] != banned


def test_stream_is_cumulative_and_matches_generate(endpoint):
    call = GenerateCall("Count: 1, 2, 3,", GREEDY, return_logprob=True)
    snaps = list(endpoint.stream(call))
    assert len(snaps) > 1 and [s.finished for s in snaps] == [False] * (len(snaps) - 1) + [True]
    for a, b in itertools.pairwise(snaps):
        assert b.text.startswith(a.text)
        assert len(b.output_token_logprobs) >= len(a.output_token_logprobs)
    final = endpoint.generate(call)
    assert snaps[-1].text == final.text
    assert [e[1] for e in snaps[-1].output_token_logprobs] == [e[1] for e in final.output_token_logprobs]


def test_closing_a_stream_aborts_it(endpoint, server):
    stream = endpoint.stream(GenerateCall("Tell me a long story.",
                                          SamplingParams(max_new_tokens=2000, ignore_eos=True)))
    next(stream), next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    while server.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats()["running"] == 0


def reference_logprobs(server, text: str, start: int) -> list:
    meta = direct(server, text, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                  logprob_start_len=start, top_logprobs_num=1)["meta_info"]
    return meta["input_token_logprobs"]


def test_score_choices_equal_direct_prompt_logprobs(endpoint, server):
    prefix, choices = "The capital of France is", [" Paris", " a banana split"]
    scores = endpoint.score_choices(prefix, choices, unconditional=True)
    prefix_len = direct(server, prefix, sampling_params={"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
    for score, choice in zip(scores, choices):
        ref = reference_logprobs(server, prefix + choice, prefix_len)
        assert score.choice == choice and score.token_ids == [e[1] for e in ref]
        assert score.token_logprobs == pytest.approx([e[0] for e in ref], abs=1e-3)
        assert len(score.top_token_ids) == len(score.token_ids)
        uncond = server.post("/generate", {"input_ids": score.token_ids, "sampling_params": {"max_new_tokens": 0},
                                           "return_logprob": True, "logprob_start_len": 0}).json()
        expected = [0.0 if e[0] is None else e[0] for e in uncond["meta_info"]["input_token_logprobs"]]
        assert score.unconditional_token_logprobs == pytest.approx(expected, abs=1e-3)
    assert scores[0].token_logprobs[0] > scores[1].token_logprobs[0]


def test_score_choices_across_a_merging_boundary(endpoint, server):
    # "Say yes" + "es" tokenizes differently from "Say y" + "es": the choice takes the merged token
    prefix = "The answer is y"
    scores = endpoint.score_choices(prefix, ["es", "ellow"])
    prefix_ids = [e[1] for e in reference_logprobs(server, prefix, 0)]
    for score in scores:
        full = [e[1] for e in reference_logprobs(server, prefix + score.choice, 0)]
        start = next(i for i, (a, b) in enumerate(zip(prefix_ids, full + [None])) if a != b)
        assert score.token_ids == full[start:]


def test_chat_template_is_the_models_own(endpoint):
    template = endpoint.chat_template()
    assert template.role_prefix_and_suffix["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert template.role_prefix_and_suffix["assistant"][0] == "<|im_start|>assistant\n"


def test_a_program_over_http(endpoint, server):
    import plait as pl

    @pl.function
    def quiz(s, question):
        s += pl.user(question)
        s += pl.assistant(pl.gen("answer", max_tokens=12, temperature=0))
        s += pl.user("Is that right?")
        s += pl.assistant(pl.select("verdict", choices=["Yes", "No"]))

    state = quiz.run("What is 2 + 2?", backend=endpoint)
    assert state["verdict"] in ("Yes", "No") and state["answer"]
    assert server.stats()["pinned_tokens"] == 0  # the run ended: its prefixes are no longer pinned


def test_program_ids_pin_until_end_program(endpoint, server):
    endpoint.begin_program("p1")
    endpoint.cache_prefix("A prefix the program will reuse, " * 4, program_id="p1")
    assert server.stats()["pinned_tokens"] > 0
    result = endpoint.generate(GenerateCall("A prefix the program will reuse, " * 4 + "and", GREEDY, program_id="p1"))
    assert result.cached_tokens > 0
    endpoint.end_program("p1")
    assert server.stats()["pinned_tokens"] == 0


def test_refusals_are_value_errors(endpoint):
    with pytest.raises(ValueError, match="regex"):
        endpoint.generate(GenerateCall("x", SamplingParams(regex="(unclosed", max_new_tokens=2)))
    with pytest.raises(ValueError, match="n=2"):
        endpoint.generate(GenerateCall("x", SamplingParams(n=2)))


def test_openai_backend_against_plait_serve(endpoint, server):
    """pl.OpenAI with the official client on plait serve's /v1 API: a chat program gives what the
    native Endpoint gives for the same program, and select (completions + echo logprobs) scores the
    choices as the Endpoint does."""
    pytest.importorskip("openai")
    import plait as pl
    from plait.lang.backends.openai import OpenAI

    backend = OpenAI("smollm2-135m-instruct", base_url=server.url + "/v1", api_key="unused")

    @pl.function
    def chat(s, question):
        s += pl.system("Answer in a few words.")
        s += pl.user(question)
        s += pl.assistant(pl.gen("answer", max_tokens=12, temperature=0))

    ours = chat.run(question="What is the capital of France?", backend=backend)
    native = chat.run(question="What is the capital of France?", backend=endpoint)
    assert ours["answer"] and ours["answer"] == native["answer"]

    @pl.function
    def pick(s):
        s += "The capital of France is"
        s += pl.select("city", choices=[" Paris", " Rome", " Berlin"])

    via_openai, via_native = pick.run(backend=backend), pick.run(backend=endpoint)
    assert via_openai["city"] == via_native["city"]
    ours_scores = via_openai.get_meta_info("city")
    native_scores = via_native.get_meta_info("city")
    key = "normalized_prompt_logprobs"
    assert ours_scores[key] == pytest.approx(native_scores[key], abs=1e-3)


# The same constraint mistake must raise the same error on every backend. Sent straight to a backend (as a
# program's gen() would refuse it first): each backend's own refusal, mapped to InvalidConstraintError.
CONSTRAINT_MISTAKES = {
    "regex-syntax": {"regex": "(unclosed"},
    "regex-look-ahead": {"regex": r"(?=a)a"},
    "schema-unknown-type": {"json_schema": '{"type": "object", "properties": {"a": {"type": "strng"}}}'},
    "schema-dangling-ref": {"json_schema": '{"$ref": "#/$defs/missing"}'},
    # Python's re accepts it, the grammar compilers do not: only a backend with a compiler can tell
    "regex-compiler-only": {"regex": "a{,3}"},
}
BACKENDS = ["mock", "runtime", "endpoint", "openai"]


@pytest.fixture
def any_backend(request, server):
    from plait.lang import MockBackend
    from plait.lang.backends.openai import OpenAI

    name = request.param
    if name == "mock":
        return MockBackend()
    if name == "runtime":
        return request.getfixturevalue("shared_runtime")
    if name == "endpoint":
        return request.getfixturevalue("endpoint")
    pytest.importorskip("openai")
    return OpenAI("smollm2-135m-instruct", base_url=server.url + "/v1", api_key="unused", extra_sampling=True)


@pytest.mark.parametrize("any_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mistake", sorted(CONSTRAINT_MISTAKES))
def test_the_same_constraint_mistake_raises_the_same_error(any_backend, mistake):
    import plait as pl
    from plait.lang import InvalidConstraintError

    fields = CONSTRAINT_MISTAKES[mistake]
    if mistake == "regex-compiler-only" and any_backend.name == "mock":
        pytest.skip("the mock has no grammar compiler: Python's re accepts this regex")
    call = GenerateCall("The answer:", SamplingParams(max_new_tokens=4, **fields))
    with pytest.raises(InvalidConstraintError):
        any_backend.generate(call)
    with pytest.raises(InvalidConstraintError):
        list(any_backend.stream(call))
    prog = pl.function(lambda s: s.__iadd__("The answer:" + pl.gen("a", max_tokens=4, **fields)))
    with pytest.raises(InvalidConstraintError):  # in a program: at gen() where the front end can tell
        prog.run(backend=any_backend)


def test_a_timed_out_run_aborts_its_request_on_the_server(endpoint, server):
    import plait as pl
    from plait.lang import ProgramTimeoutError

    story = pl.function(lambda s: s.__iadd__("Story:" + pl.gen("story", max_tokens=2000, ignore_eos=True)))
    before = server.stats()["generated_tokens"]
    started = time.monotonic()
    with pytest.raises(ProgramTimeoutError):
        story.run(backend=endpoint, timeout=1.0)  # a blocking /generate: aborted through /abort_request
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 5
    while server.stats()["running"]:
        assert time.monotonic() < deadline, "the request still runs on the server"
        time.sleep(0.05)
    assert server.stats()["generated_tokens"] - before < 200
    state = story.run(backend=endpoint, stream=True)
    for i, _ in enumerate(state.text_iter("story")):  # leaving the stream closes it: the server aborts
        if i == 2:
            break
    deadline = time.monotonic() + 5
    while server.stats()["running"]:
        assert time.monotonic() < deadline, "the streamed request still runs on the server"
        time.sleep(0.05)


def test_zz_no_slot_leaked(server):
    assert_idle_and_flushed(server)


def test_tool_agent_over_http_and_through_the_openai_tools_api(endpoint, server):
    """The same agent on the Endpoint (grammar sent in /generate, tools rendered by the server's
    /apply_chat_template) and on the OpenAI backend (the server's tools API): valid calls, run, and
    the same first call from both (greedy, the same prompt and call format)."""
    pytest.importorskip("openai")
    import jsonschema

    import plait as pl
    from plait.lang.backends.openai import OpenAI
    from plait.lang.tool_format import NativeToolRendering, tool_rendering_of

    assert isinstance(tool_rendering_of(endpoint.chat_template()), NativeToolRendering)

    @pl.tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return f"sunny in {city}"

    @pl.function
    def agent(s):
        s += pl.system("You answer questions about the weather.", tools=[get_weather])
        s += pl.user("What is the weather in Paris?")
        s += pl.call_tools("answer", tool_choice="required", parallel=False, max_steps=1, max_tokens=40)

    openai_backend = OpenAI("smollm2-135m-instruct", base_url=server.url + "/v1", api_key="unused")
    states = [agent.run(backend=b, temperature=0) for b in (endpoint, openai_backend)]
    calls = []
    for state in states:
        [result] = state.get_meta_info("answer")["tool_results"]
        jsonschema.validate(result.call.arguments, get_weather.parameters)
        assert result.content == f"sunny in {result.call.arguments['city']}" and state["answer"]
        calls.append((result.call.name, result.call.arguments))
    assert calls[0] == calls[1]
    assert [m["role"] for m in states[1].messages()] == ["system", "user", "assistant", "tool", "assistant"]
