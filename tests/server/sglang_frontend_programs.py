"""Runs SGLang's own frontend programs (``sglang.test.test_programs``, unchanged) and plait's checks of
the frontend against a running ``plait serve``; prints one JSON line per program.

Run in a subprocess by ``test_sglang_frontend_and_load.py``: importing ``sglang`` (0.5.3+) patches
transformers and redirects cache directories process-wide, which must not leak into other tests.

    python -m tests.server.sglang_frontend_programs URL NAME [NAME ...]

NAME is ``sglang:<function of sglang.test.test_programs>`` or ``plait:<function of this module>``. The
first line lists every program of ``sglang.test.test_programs`` (``{"programs": [...]}``). A
program fails on an exception, and also when SGLang's interpreter swallowed one (it turns errors in
its executor thread into a warning and carries on).
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
import warnings

import httpx

# SGLang's programs that run here, and why the others do not (test_sglang_frontend_and_load.py checks
# that together they name every program of the installed sglang, so a new one is never skipped silently).
SGLANG_PROGRAMS = [
    "test_mt_bench", "test_select", "test_expert_answer", "test_tool_use", "test_stream", "test_stream_logprobs",
    "test_regex", "test_dtype_gen",
]
SGLANG_NOT_RUN = {
    "test_decode_json_regex": "needs a stronger model: the 135M model writes the digit 1 until SGLang's default of "
                              "128 new tokens in each of its three number gens (~35 s on a 2-core CPU); the "
                              "frontend's regex and dtype paths are covered by test_regex and test_dtype_gen",
    "test_decode_json": "samples at temperature 1 under SGLang's string regex, whose \\s admits control characters "
                        "JSON forbids: the 135M model writes one at random",
    "test_parallel_decoding": "left out for time: its 512-token summary takes over a minute on a 2-core CPU "
                              "(fork and join are covered by test_select's batch and plait:check_fork)",
    "test_few_shot_qa": "asserts factual answers: needs a stronger model than the bundled 135M one",
    "test_decode_int": "asserts factual answers (24 hours, 365 days): needs a stronger model",
    "test_react": "asserts a factual answer: needs a stronger model",
    "test_image_qa": "needs an image model and an image file",
    "test_parallel_encoding": "needs /concate_and_append_request, which SGLang's own server does not have either",
    "test_completion_speculative": "API speculative execution: OpenAI-backend only (RuntimeEndpoint has no "
                                   "token_usage)",
    "test_chat_completion_speculative": "API speculative execution: OpenAI-backend only",
    "test_gen_min_new_tokens": "imports SGLang's server-side tokenizer utilities (torchvision); min_tokens is "
                               "checked by plait:check_min_tokens instead",
}


PLAIT_CHECKS = ["check_gen_and_streaming_with_logprobs", "check_select_methods", "check_stop_regex", "check_fork",
                "check_min_tokens"]


def _greedy(url: str, text: str, n: int, **params) -> str:
    body = {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0, **params}}
    return httpx.post(url + "/generate", json=body, timeout=120).json()["text"]


# ------------------------------------------------------------------------------- plait's own checks
def check_gen_and_streaming_with_logprobs(sgl, url: str) -> None:
    @sgl.function
    def qa(s, question):
        s += "Q: " + question + "\nA:"
        s += sgl.gen("answer", max_tokens=8, temperature=0, stop="\n")

    state = qa.run(question="What is the capital of France?")
    assert state["answer"] == _greedy(url, "Q: What is the capital of France?\nA:", 8, stop=["\n"])
    streamed = qa.run(question="Name a fruit.", stream=True, return_logprob=True)
    pieces = list(streamed.text_iter("answer"))
    assert len(pieces) > 1 and "".join(pieces) == qa.run(question="Name a fruit.")["answer"]
    meta = streamed.get_meta_info("answer")
    assert meta["completion_tokens"] >= 1 and meta["finish_reason"] is not None
    entry = meta["output_token_logprobs"][-1]
    assert entry[0] <= 0 and isinstance(entry[1], int)


def check_select_methods(sgl, url: str) -> None:
    from sglang.lang import choices

    for method in ("token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized"):
        @sgl.function
        def pick(s):
            s += "The capital of France is"
            s += sgl.select("city", choices=[" Paris", " a banana split", " Berlin"],
                            choices_method=getattr(choices, method))

        state = pick.run()
        meta = state.get_meta_info("city")
        assert len(meta["input_token_logprobs"]) == 3
        if method != "unconditional_likelihood_normalized":
            assert state["city"] == " Paris", (method, state["city"])
            continue
        scores = meta["normalized_unconditional_prompt_logprobs"]
        assert state["city"] == [" Paris", " a banana split", " Berlin"][scores.index(max(scores))]


def check_stop_regex(sgl, url: str) -> None:
    @sgl.function
    def count(s):
        s += "Count with me: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
        s += sgl.gen("rest", max_tokens=24, temperature=0, stop_regex=r"1[5-9],")

    full = _greedy(url, "Count with me: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", 24)
    rest = count.run()["rest"]
    assert "15," in full and rest == full[: full.index("15,")], (full, rest)


def check_fork(sgl, url: str) -> None:
    @sgl.function
    def two_colors(s):
        s += "List two colors:"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" {i + 1}."
            f += sgl.gen("color", max_tokens=4, temperature=0)
        forks.join()
        s += " A:" + forks[0]["color"] + " B:" + forks[1]["color"]

    text = two_colors.run().text()
    first, second = _greedy(url, "List two colors: 1.", 4), _greedy(url, "List two colors: 2.", 4)
    assert text == f"List two colors: A:{first} B:{second}", text


def check_min_tokens(sgl, url: str) -> None:
    @sgl.function
    def short(s):
        s += sgl.user("What is the capital of the United States?")
        s += sgl.assistant(sgl.gen("answer", min_tokens=40, max_tokens=48))

    state = short.run()
    assert state.get_meta_info("answer")["completion_tokens"] >= 40


# ------------------------------------------------------------------------------------------ running
def _run(name: str, sgl, url: str) -> None:
    kind, func_name = name.split(":", 1)
    if kind == "plait":
        globals()[func_name](sgl, url)
        return
    from sglang.test import test_programs

    func = getattr(test_programs, func_name)
    kwargs = {"check_answer": False} if "check_answer" in inspect.signature(func).parameters else {}
    func(**kwargs)


def _swallowed(caught: list) -> list[str]:
    """SGLang's StreamExecutor reports a program's exception as a warning, not by raising it."""
    return [str(w.message) for w in caught if "Error in stream_executor" in str(w.message)]


def _run_reported(name: str, sgl, url: str) -> str | None:
    try:
        _run(name, sgl, url)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        return traceback.format_exc(limit=8)
    return None


def main(url: str, names: list[str]) -> None:
    """Run every program concurrently (the server batches them); when a program's error surfaced only as
    a warning, which names no program, run them again one at a time to tell which one it was."""
    import sglang as sgl
    from sglang.test import test_programs

    print(json.dumps({"programs": sorted(n for n in dir(test_programs) if n.startswith("test_"))}), flush=True)
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(len(names)) as pool:
            errors = dict(zip(names, pool.map(lambda name: _run_reported(name, sgl, url), names)))
    if not _swallowed(caught):
        seconds = round(time.monotonic() - started, 1)
        for name in names:
            print(json.dumps({"name": name, "passed": errors[name] is None, "error": errors[name],
                              "seconds": seconds}), flush=True)
        return
    for name in names:
        started = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            error = _run_reported(name, sgl, url)
        if error is None and _swallowed(caught):
            error = _swallowed(caught)[0]
        print(json.dumps({"name": name, "passed": error is None, "error": error,
                          "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
