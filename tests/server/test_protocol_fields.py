"""The shared request-field helpers of the server (no server process): unknown fields, bounded errors."""

from __future__ import annotations

import pytest

from plait.runtime.server.protocol import (
    IGNORED_FIELDS_HEADER,
    MAX_ERROR_CHARS,
    MAX_REPORTED_FIELDS,
    RequestError,
    expect_bool,
    ignored_fields_headers,
    short_repr,
    split_unknown,
)


def test_unknown_fields_are_returned_and_logged(caplog):
    body = {"text": "x", "zeta": 1, "alpha": 2}
    with caplog.at_level("WARNING", logger="plait.server"):
        assert split_unknown(body, {"text"}, "/generate") == ["alpha", "zeta"]
    assert "'alpha', 'zeta'" in caplog.text and "/generate" in caplog.text
    assert split_unknown(body, {"text", "zeta", "alpha"}, "/generate") == []
    assert split_unknown({"top_q": 1}, {"top_p"}, "sampling_params", prefix="sampling_params.") == [
        "sampling_params.top_q"]


def test_strict_mode_refuses_unknown_fields():
    with pytest.raises(RequestError) as info:
        split_unknown({"text": "x", "temprature": 0}, {"text", "temperature"}, "/generate", strict=True)
    assert info.value.status == 400 and "'temprature'" in info.value.message and info.value.param == "temprature"


def test_reported_names_are_header_safe_and_bounded():
    names = split_unknown({"é\n" + "x" * 500: 1, "a,b": 2}, set(), "/generate")
    assert all(n.isascii() and n.isprintable() and "," not in n and len(n) < 80 for n in names)
    many = [f"f{i}" for i in range(MAX_REPORTED_FIELDS + 5)]
    header = ignored_fields_headers(many)[IGNORED_FIELDS_HEADER]
    assert header.startswith("f0, f1") and header.endswith("... (5 more)")
    assert ignored_fields_headers([]) == {}


def test_errors_never_echo_a_large_value():
    huge = "A" * 1_000_000
    assert len(short_repr(huge)) < 200 and len(short_repr(list(range(10**5)))) < 200
    with pytest.raises(RequestError) as info:
        expect_bool("stream", huge)
    assert len(info.value.message) < 300
    assert len(RequestError("x" * 10**6).message) <= MAX_ERROR_CHARS + 20


def test_sampling_objects_drop_nulls_and_unknown_keys_when_asked():
    from plait.runtime.server.protocol import sampling_params_from

    ignored: list[str] = []
    params = sampling_params_from({"temperature": None, "top_q": 1, "\u00e9\n": 2, "stream_interval": 3,
                                   "sampling_seed": 5}, ignored=ignored)
    assert params.temperature == 1.0 and params.seed == 5
    assert ignored == ["sampling_params.\\xe9?", "sampling_params.top_q"]  # sorted, made printable
    with pytest.raises(RequestError, match="top_q"):
        sampling_params_from({"top_q": 1})  # without a list to report them in, unknown keys are a 400
    with pytest.raises(RequestError, match="top_q"):
        sampling_params_from({"top_q": 1}, ignored=[], strict=True)
    with pytest.raises(RequestError, match="beam_width"):
        sampling_params_from({"beam_width": 4})


class _Limits:
    max_prompt_tokens, vocab_size, context_length = 100, 1000, 128


def test_generate_bodies_without_a_server():
    from plait.runtime.server.native import parse_generate

    def parse(body, strict=False):
        return parse_generate(body, lambda text: [1] * len(text), _Limits(), True, strict)

    batch = parse({"text": ["ab", "cd"], "rid": "r", "extra_key": ["t1", ""], "cache_salt": "s",
                   "sampling_params": {"max_new_tokens": 2}})
    assert [j.rid for j in batch.jobs] == ["r_0", "r_1"] and batch.is_batch
    assert [j.cache_namespace for j in batch.jobs] == ["t1\x1fs", "s"]
    single = parse({"text": "ab", "session_id": "chat", "priority": 9, "whatever": 1})
    assert single.jobs[0].program_id == "chat" and single.ignored == ["whatever"] and not single.is_batch
    loras = parse({"text": ["ab", "cd"], "lora_path": ["a1", None]})
    assert [j.lora_path for j in loras.jobs] == ["a1", None] and loras.jobs[0].spec()["lora_path"] == "a1"
    assert parse({"text": "ab", "lora_path": "a2"}).jobs[0].lora_path == "a2"
    for body, needle in [({"text": "x", "lora_id": "a"}, "lora_path"), ({"text": ["x", "y"], "lora_path": ["a"]}, "1 entries"),
                         ({"text": "x", "lora_path": 3}, "'lora_path'"), ({"text": "x", "image_data": "png"}, "text only"),
                         ({"text": "x", "custom_logit_processor": "f"}, "client code")]:
        with pytest.raises(RequestError, match=needle):
            parse(body)
    with pytest.raises(RequestError, match="whatever"):
        parse({"text": "x", "whatever": 1}, strict=True)
