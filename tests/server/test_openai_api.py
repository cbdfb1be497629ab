"""The OpenAI-compatible API against a real ``plait serve`` (with an API key), driven by the ``openai`` package."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.lora_helpers import save_random_adapters
from tests.server.server_helpers import assert_idle_and_flushed, start_server

openai = pytest.importorskip("openai", reason="the openai package is in the test extra")
pytestmark = pytest.mark.model
MODEL = "smollm2-135m-instruct"
KEY = "test-key-123"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapters(bundled_model_dir, tmp_path_factory) -> dict[str, str]:
    """Two random PEFT LoRA adapters on the bundled model: "judge" served from the start, "writer" loaded
    by a test at run time."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {name: {"r": rank, "lora_alpha": 2 * rank, "target_modules": modules}
                for name, rank in (("judge", 8), ("writer", 4))}
    return save_random_adapters(model, adapters, tmp_path_factory.mktemp("served-lora"))[1]


@pytest.fixture(scope="module")
def server(bundled_model_dir, adapters):
    server = start_server("--lora-paths", f"judge={adapters['judge']}", api_key=KEY)
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "judge"]  # the base model, then its adapters
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    assert httpx.post(server.url + "/generate", json={"text": "x"}).status_code == 401  # native routes too
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_chat_completion_matches_native_generate(server, client):
    text = httpx.post(server.url + "/apply_chat_template", headers=server.headers,
                      json={"messages": CHAT, "add_generation_prompt": True}).json()["text"]
    native = server.post("/generate", {"text": text, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == native["text"] and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == native["meta_info"]["completion_tokens"]
    assert out.usage.prompt_tokens == native["meta_info"]["prompt_tokens"]
    assert out.usage.prompt_tokens_details.cached_tokens > 0  # the second time the prompt is cached
    assert out.choices[0].finish_reason in ("length", "stop")


def test_chat_stream_n_seed_and_logprobs(client):
    kwargs = {"model": MODEL, "messages": CHAT, "max_completion_tokens": 6, "temperature": 0.9, "seed": 3, "n": 2,
              "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**kwargs)
    assert len(whole.choices) == 2 and whole.choices[0].message.content != whole.choices[1].message.content
    for choice in whole.choices:
        content = choice.logprobs.content
        assert len(content) == 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]  # seeded: same samples
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_stop_echo_and_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert out.choices[0].finish_reason == "stop" and "7" not in out.choices[0].text
    echo = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=2, temperature=0, echo=True,
                                     logprobs=1)
    logprobs = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("Hello world")
    assert "".join(logprobs.tokens) == echo.choices[0].text and logprobs.token_logprobs[0] is None
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    batch = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    default = client.completions.create(model=MODEL, prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"], stream=True) if c.choices)
    assert streamed == out.choices[0].text


def test_json_and_regex_output(client):
    try:
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a JSON person."}],
                                             max_tokens=60, temperature=0, response_format={"type": "json_schema",
                                             "json_schema": {"name": "p", "schema": {
                                                 "type": "object", "properties": {"age": {"type": "integer"}},
                                                 "required": ["age"], "additionalProperties": False}}})
    except openai.BadRequestError as exc:
        pytest.fail(f"constrained decoding refused: {exc}")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content)["age"], int)
    assert "schema_valid" not in out.choices[0].model_extra  # exact schema: nothing added
    relaxed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A pet as JSON."}], max_tokens=30, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": {
            "type": "object", "properties": {"kind": {"enum": ["cat", "dog"], "not": {"const": "cow"}}},
            "required": ["kind"], "additionalProperties": False}}})
    extra = relaxed.choices[0].model_extra  # "not" is relaxed (dropped), the answer validated
    assert extra["schema_relaxed"] == ["not"] and extra["schema_valid"] is True
    assert json.loads(relaxed.choices[0].message.content)["kind"] in ("cat", "dog")
    regex = client.completions.create(model=MODEL, prompt="Phone:", max_tokens=12, temperature=0,
                                      extra_body={"regex": r"\d{3}-\d{4}"})
    assert len(regex.choices[0].text) == 8 and regex.choices[0].text[3] == "-"


BAD = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**9}, "context length"),
    ({"temperature": "hot"}, "temperature"),
    ({"logit_bias": {"one": 5}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "multimodal"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi " * 9000}]}, "at most"),
]


@pytest.mark.parametrize("change, needle", BAD, ids=[n for _, n in BAD])
def test_bad_input_is_a_400_in_openai_shape(client, change, needle):
    body = {"model": MODEL, "messages": CHAT, **change}
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=messages, **{k: v for k, v in body.items() if k == "model"},
                                       extra_body={k: v for k, v in body.items() if k != "model"})
    assert needle in info.value.message and info.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_an_adapter_is_a_model(server, client, adapters):
    """OpenAI's ``model`` names a LoRA adapter: its answer is the native ``lora_path`` one, streamed or not,
    and not the base model's; adapters load and unload at run time; an unknown one is a 404 naming them."""
    greedy = {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    base = client.chat.completions.create(model=MODEL, **greedy).choices[0].message.content
    judged = client.chat.completions.create(model="judge", **greedy)
    assert judged.model == "judge" and judged.choices[0].message.content != base
    text = httpx.post(server.url + "/apply_chat_template", headers=server.headers,
                      json={"messages": CHAT, "add_generation_prompt": True}).json()["text"]
    native = server.post("/generate", {"text": text, "lora_path": "judge",
                                       "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()
    assert native["text"] == judged.choices[0].message.content
    streamed = client.chat.completions.create(model="judge", stream=True, **greedy)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == native["text"]
    completion = client.completions.create(model="judge", prompt=text, max_tokens=8, temperature=0)
    assert completion.choices[0].text == native["text"]

    with pytest.raises(openai.NotFoundError, match="judge"):  # the error names what is loaded
        client.chat.completions.create(model="writer", **greedy)
    loaded = server.post("/load_lora_adapter", {"lora_name": "writer", "lora_path": adapters["writer"]})
    assert loaded.status_code == 200 and loaded.json()["loaded_adapters"] == ["judge", "writer"]
    assert [m.id for m in client.models.list().data] == [MODEL, "judge", "writer"]
    written = client.chat.completions.create(model="writer", **greedy).choices[0].message.content
    assert written not in (base, native["text"])
    assert server.post("/unload_lora_adapter", {"lora_name": "writer"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="writer", **greedy)
    assert client.chat.completions.create(model="judge", **greedy).choices[0].message.content == native["text"]


def test_zz_no_slot_leaked(server):
    assert_idle_and_flushed(server)


def test_logit_bias_forces_and_bans_tokens(bundled_model_dir, client):
    from plait.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(bundled_model_dir)
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    word = tokenizer.decode([banana])
    forced = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=2, temperature=0,
                                       logit_bias={str(banana): 100})
    assert forced.choices[0].text == word * 2
    plain = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=1, temperature=0)
    greedy = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=1, temperature=0,
                                       logit_bias={str(greedy): -100})
    assert banned.choices[0].text != plain.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0,
                                          logit_bias={str(banana): 100})
    assert chat.choices[0].message.content == word * 3


def test_prompt_cache_key_separates_cached_prefixes(client):
    messages = [{"role": "user", "content": "A question no other test asks: " + "zebra " * 24}]

    def cached(key: str) -> int:
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, prompt_cache_key=key)
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 20
    assert cached("tenant-b") == 0  # another tenant never hits tenant-a's cached prompt
