"""Per-call models on the real backends' wire: Runtime (a fake engine recording its arguments), Endpoint
(an httpx mock server recording /generate bodies) and OpenAI (the official client on a mock transport)."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

import plait as pl
from plait.lang.backends.base import GenerateCall
from plait.lang.errors import BackendCapabilityError
from plait.sampling import SamplingParams

httpx = pytest.importorskip("httpx")

ADAPTERS = ("writer", "judge")


def by_model(lora: str | None) -> str:
    return f" from {lora or 'base'}"


def logprob_entries(ids: list[int], start: int) -> list[list]:
    return [[None if i == 0 else -0.1 * (1 + t % 7), t, None] for i, t in enumerate(ids)][start:]


# ---------------------------------------------------------------------------------- Runtime
class FakeTokenizer:
    bos_token_id = 1
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class FakeEngine:
    """Answers like a plait Engine with LoRA adapters; records the lora_path of every request."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(model="fake-base")
        self.tokenizer = FakeTokenizer()
        self.requests: list[dict] = []
        self._rids = itertools.count()

    def new_rid(self) -> str:
        return f"r{next(self._rids)}"

    def _check(self, lora):
        for name in lora if isinstance(lora, list) else [lora]:
            if name is not None and name not in ADAPTERS:
                raise ValueError(f"unknown LoRA adapter {name!r}; loaded: {list(ADAPTERS)}")

    def generate(self, prompt=None, sampling_params=None, input_ids=None, *, return_logprob=False,
                 logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False, rid=None, stream=False,
                 program_id=None, cache_namespace=None, lora_path=None):
        self._check(lora_path)
        batch = input_ids is not None and bool(input_ids) and isinstance(input_ids[0], list)
        self.requests.append({"prompt": prompt, "input_ids": input_ids, "lora_path": lora_path, "batch": batch,
                              "max_new_tokens": dict(sampling_params or {}).get("max_new_tokens")
                              if isinstance(sampling_params, dict) else sampling_params.max_new_tokens})
        if batch:
            return [self._scored(ids, logprob_start_len) for ids in input_ids]
        text = "" if self.requests[-1]["max_new_tokens"] == 0 else by_model(lora_path)
        out = {"text": text, "output_ids": [7], "meta_info": {
            "prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 0,
            "finish_reason": {"type": "stop", "matched": None}, "e2e_latency": 0.001}}
        return (o for o in [out]) if stream else out

    def begin_program(self, program_id: str) -> None:
        pass

    def end_program(self, program_id: str) -> None:
        pass

    def abort(self, rid: str) -> None:
        pass

    @staticmethod
    def _scored(ids: list[int], start: int) -> dict:
        entries = logprob_entries(ids, start)
        return {"text": "", "output_ids": [], "meta_info": {
            "prompt_tokens": len(ids), "completion_tokens": 0, "cached_tokens": 0, "finish_reason": {"type": "length"},
            "input_token_logprobs": entries, "input_top_logprobs": [[(-0.1, t, None)] for _, t, _ in entries]}}


class FakeEngineWithoutLora(FakeEngine):
    def generate(self, prompt=None, sampling_params=None, input_ids=None, *, return_logprob=False,
                 logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False, rid=None, stream=False,
                 program_id=None):
        return super().generate(prompt, sampling_params, input_ids, return_logprob=return_logprob,
                                logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num, rid=rid,
                                stream=stream, program_id=program_id)


@pl.function
def writer_and_judge(s):
    s += "Essay topic: tea.\n"
    with s.using(model="writer"):
        s += "Essay:" + pl.gen("essay", max_tokens=8, stop="\n")
        forks = s.fork(2)
    forks += pl.gen("alt", max_tokens=4)
    forks.join()
    s += "\nVerdict:" + pl.select("verdict", ["good", "bad"], model="judge")
    s += "\nBase:" + pl.gen("base", max_tokens=4)


def test_runtime_sends_lora_path_with_every_request_of_a_call():
    from plait.lang.backends.runtime import Runtime

    engine = FakeEngine()
    runtime = Runtime(engine=engine)
    assert runtime.per_call_models
    state = writer_and_judge.run(backend=runtime)
    assert state["essay"] == " from writer" and state["alt"] == [" from writer"] * 2
    assert state["base"] == " from base"
    generated = [r["lora_path"] for r in engine.requests if r["prompt"] is not None and r["max_new_tokens"] != 0]
    assert generated == ["writer", "writer", "writer", None]
    # the fork's shared prefix is cached under the writer; the select's prefix and batch under the judge
    cached = [r for r in engine.requests if r["max_new_tokens"] == 0 and not r["batch"]]
    assert [r["lora_path"] for r in cached] == ["writer", "judge"]
    (scored,) = [r for r in engine.requests if r["batch"]]
    assert scored["lora_path"] == ["judge", "judge"]  # one per prompt of the batch
    assert [c.model for c in state.calls] == ["writer", "writer", "writer", "judge", None]


def test_runtime_streams_and_scores_unconditionally_under_the_adapter():
    from plait.lang.backends.runtime import Runtime

    engine = FakeEngine()
    runtime = Runtime(engine=engine)
    snapshots = list(runtime.stream(GenerateCall("Hi", SamplingParams(max_new_tokens=4), model="judge")))
    assert snapshots[-1].text == " from judge"
    runtime.score_choices("Q: ", ["yes", "no"], unconditional=True, model="writer")
    assert [r["lora_path"] for r in engine.requests[1:]] == ["writer", ["writer"] * 2, ["writer"] * 2]
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'poet'.*\['writer', 'judge'\]"):
        runtime.generate(GenerateCall("Hi", SamplingParams(max_new_tokens=4), model="poet"))


def test_runtime_without_lora_support_refuses_named_models():
    from plait.lang.backends.runtime import Runtime

    runtime = Runtime(engine=FakeEngineWithoutLora())
    assert not runtime.per_call_models
    with pytest.raises(BackendCapabilityError, match="model 'writer'"):
        writer_and_judge.run(backend=runtime)

    @pl.function
    def plain(s):
        s += "Q:" + pl.gen("a", max_tokens=2)

    assert plain.run(backend=runtime)["a"] == " from base"


def test_runtime_passes_lora_paths_to_its_engine(monkeypatch):
    import plait.runtime.engine as engine_module
    from plait.lang.backends.runtime import Runtime

    made = {}

    class RecordingEngine(FakeEngine):
        def __init__(self, model, **settings):
            super().__init__()
            made.update(model=model, **settings)

    monkeypatch.setattr(engine_module, "Engine", RecordingEngine)
    Runtime(model="m", lora_paths=["writer=/adapters/w"], dtype="float32")
    assert made == {"model": "m", "lora_paths": ["writer=/adapters/w"], "dtype": "float32"}
    with pytest.raises(TypeError, match="lora_paths"):
        Runtime(engine=FakeEngine(), lora_paths={"writer": "/adapters/w"})


# ---------------------------------------------------------------------------------- Endpoint
class FakeServer:
    """plait serve's native API, enough for the Endpoint: records /generate bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            info = {"/get_model_info": {"model_path": "fake-base"}, "/get_server_info": {"plait_extensions": []}}
            return httpx.Response(200, json=info[request.url.path])
        body = json.loads(request.content)
        self.bodies.append(body)
        lora = body.get("lora_path")
        if isinstance(body["text"], list):
            return httpx.Response(200, json=[self._scored(t, body["logprob_start_len"]) for t in body["text"]])
        text = "" if body["sampling_params"].get("max_new_tokens") == 0 else by_model(lora)
        return httpx.Response(200, json={"text": text, "output_ids": [7], "meta_info": {
            "prompt_tokens": len(body["text"]), "completion_tokens": 1, "cached_tokens": 0,
            "finish_reason": {"type": "stop"}}})

    @staticmethod
    def _scored(text: str, start: int) -> dict:
        entries = logprob_entries([ord(c) for c in text], start)
        return {"text": "", "meta_info": {"prompt_tokens": len(text), "input_token_logprobs": entries,
                                          "input_top_logprobs": [[[-0.1, e[1], None]] for e in entries]}}


def test_endpoint_sends_lora_path_on_generate(monkeypatch):
    import plait.lang.backends.endpoint as endpoint_module

    server, real_client = FakeServer(), httpx.Client
    monkeypatch.setattr(endpoint_module.httpx, "Client",
                        lambda **kw: real_client(transport=httpx.MockTransport(server), **kw))
    endpoint = endpoint_module.Endpoint("http://fake.test")
    assert endpoint.per_call_models
    state = writer_and_judge.run(backend=endpoint)
    assert state["essay"] == " from writer" and state["base"] == " from base"
    generated = [b.get("lora_path") for b in server.bodies if b["sampling_params"].get("max_new_tokens") != 0]
    assert generated == ["writer", "writer", "writer", None]
    cached = [b.get("lora_path") for b in server.bodies
              if b["sampling_params"].get("max_new_tokens") == 0 and not isinstance(b["text"], list)]
    assert cached == ["writer", "judge"]  # the fork's prefix, the select's prefix
    (scored,) = [b for b in server.bodies if isinstance(b["text"], list)]
    assert scored["lora_path"] == ["judge"] * len(scored["text"])
    endpoint.close()


# ---------------------------------------------------------------------------------- OpenAI
def test_openai_sends_the_calls_model_as_the_requests_model():
    openai = pytest.importorskip("openai")
    from plait.lang.backends.openai import OpenAI

    bodies: list[dict] = []

    def serve(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if request.url.path.endswith("/completions") and "chat" not in request.url.path:  # select: echoed logprobs
            return httpx.Response(200, json={
                "id": "e", "object": "text_completion", "created": 1, "model": body["model"], "choices": [
                    {"index": i, "text": p, "finish_reason": "length", "logprobs": {
                        "tokens": ["Q:", p[2:]], "token_logprobs": [None, -0.5], "text_offset": [0, 2]}}
                    for i, p in enumerate(body["prompt"])]})
        return httpx.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                          "content": f"by {body['model']}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    client = openai.OpenAI(api_key="k", base_url="http://api.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(serve)))

    @pl.function
    def prog(s):
        s += pl.user("Write.")
        with s.using(model="writer"):
            s += pl.assistant(pl.gen("draft", max_tokens=8))
        s += pl.user("Judge it.")
        s += pl.assistant(pl.gen("verdict", max_tokens=8, model="judge"))
        s += pl.user("Again.")
        s += pl.assistant(pl.gen("plain", max_tokens=8))

    backend = OpenAI("base-model", client=client)
    state = prog.run(backend=backend)
    assert [b["model"] for b in bodies] == ["writer", "judge", "base-model"]
    assert (state["draft"], state["verdict"], state["plain"]) == ("by writer", "by judge", "by base-model")
    scores = backend.score_choices("Q:", [" yes", " no"], model="judge")  # select's echoed prompt logprobs
    assert [s.token_logprobs for s in scores] == [[-0.5], [-0.5]] and bodies[-1]["model"] == "judge"
    backend.score_choices("Q:", [" yes"])
    assert bodies[-1]["model"] == "base-model"
