"""Request options of SGLang's protocol in the engine: stop_regex, logit_bias, cache namespaces,
parallel-sample ids, and null meaning the default."""

from __future__ import annotations

import re

import pytest

from tests.runtime.engine_helpers import assert_no_leak

pytestmark = pytest.mark.model
PROMPT = "Count with me: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


def greedy(n: int, **extra) -> dict:
    return {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True, **extra}


def test_stop_regex_stops_and_trims_like_a_stop_string(engine):
    full = engine.generate(PROMPT, greedy(24))["text"]
    match = re.search(r"1[5-9],", full)
    assert match is not None, full  # the model keeps counting
    out = engine.generate(PROMPT, greedy(24, stop_regex=[r"1[5-9],"]))
    assert out["text"] == full[: match.start()]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"1[5-9],"}
    assert out["meta_info"]["completion_tokens"] < 24
    kept = engine.generate(PROMPT, greedy(24, stop_regex=r"1[5-9],", no_stop_trim=True))
    assert kept["text"] == full[: match.end()]
    chunks = list(engine.generate(PROMPT, greedy(24, stop_regex=[r"1[5-9],"]), stream=True))
    assert chunks[-1]["text"] == out["text"] and all(out["text"].startswith(c["text"]) for c in chunks)
    assert_no_leak(engine)


def test_logit_bias_forces_and_bans_tokens(engine):
    plain = engine.generate(PROMPT, greedy(3))
    first = plain["output_ids"][0]
    forced_id = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = engine.generate(PROMPT, greedy(3, logit_bias={str(forced_id): 100}))
    assert forced["output_ids"] == [forced_id] * 3
    banned = engine.generate(PROMPT, greedy(1, logit_bias={first: -100}))
    assert banned["output_ids"][0] != first
    with pytest.raises(ValueError, match="logit_bias"):
        engine.generate(PROMPT, greedy(1, logit_bias={engine.model_config.vocab_size: 1}))
    assert_no_leak(engine)


def test_cache_namespaces_do_not_share_prefixes(engine):
    prompt = "A long shared system prompt about the tenant's secret plans. " * 4
    first = engine.generate(prompt, greedy(4), cache_namespace="tenant-a")
    same_tenant = engine.generate(prompt, greedy(4), cache_namespace="tenant-a")
    other_tenant = engine.generate(prompt, greedy(4), cache_namespace="tenant-b")
    default = engine.generate(prompt, greedy(4))
    assert same_tenant["meta_info"]["cached_tokens"] > 10
    assert other_tenant["meta_info"]["cached_tokens"] == 0 and default["meta_info"]["cached_tokens"] == 0
    assert first["output_ids"] == same_tenant["output_ids"] == other_tenant["output_ids"] == default["output_ids"]
    assert set(engine.tree.namespaces()) == {None, "tenant-a", "tenant-b"}
    for bad in ("", 7):
        with pytest.raises((ValueError, TypeError), match="cache_namespace"):
            engine.generate(prompt, greedy(1), cache_namespace=bad)
    assert_no_leak(engine)
    assert engine.tree.namespaces() == [None]


def test_parallel_samples_are_named_like_sglang(engine):
    outs = engine.generate("Hi", {"n": 2, "max_new_tokens": 2, "seed": 1}, rid="req")
    assert [o["meta_info"]["id"] for o in outs] == ["req_0", "req_1"]


def test_null_sampling_fields_take_their_defaults(engine):
    out = engine.generate(PROMPT, {"temperature": 0.0, "max_new_tokens": 3, "top_p": None, "stop_regex": None,
                                   "logit_bias": None, "repetition_penalty": None})
    assert out["output_ids"] == engine.generate(PROMPT, {"temperature": 0.0, "max_new_tokens": 3})["output_ids"]
    assert_no_leak(engine)
