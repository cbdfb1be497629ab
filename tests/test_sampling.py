"""SamplingParams: validation, normalization, dict round trip, and no torch import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from plait.sampling import SamplingParams


def test_defaults_match_sglang() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.min_new_tokens == 0
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 and p.repetition_penalty == 1.0
    assert p.stop == () and p.stop_token_ids == ()
    assert p.ignore_eos is False and p.seed is None and p.n == 1
    assert p.skip_special_tokens is True and p.no_stop_trim is False
    assert not p.is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", 1.0),
        ("max_new_tokens", True),
        ("max_new_tokens", "10"),
        ("max_new_tokens", None),
        ("min_new_tokens", -1),
        ("min_new_tokens", 200),  # > max_new_tokens (128)
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", None),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", 5.0),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("presence_penalty", 3),
        ("presence_penalty", -3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("stop", [""]),
        ("stop", [1]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", 3),
        ("ignore_eos", 1),
        ("seed", 1.5),
        ("seed", "7"),
        ("n", 0),
        ("skip_special_tokens", None),
        ("no_stop_trim", "yes"),
        # values a fast path could let through: bools are not numbers, NaN and inf are not in range
        ("temperature", True),
        ("top_p", float("nan")),
        ("min_p", float("nan")),
        ("frequency_penalty", float("-inf")),
        ("repetition_penalty", float("inf")),
        ("n", True),
        ("top_k", True),
        ("min_new_tokens", True),
        ("max_new_tokens", 2**70 * 1.0),
        ("ignore_eos", None),
        ("json_schema", 5),
    ],
)
def test_invalid_field_raises_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_usual_values_skip_the_per_field_checks(monkeypatch) -> None:
    """Defaults and plain ints / floats in range take the fast path (no per-field conversion calls);
    they come out as the full checks would leave them (ints as floats), and anything else still goes
    through those checks."""
    import plait.sampling as sampling

    calls = []
    for name in ("_to_float", "_check_int", "_check_bool"):
        original = getattr(sampling, name)
        monkeypatch.setattr(sampling, name, lambda *a, _f=original, **k: calls.append(a[0]) or _f(*a, **k))
    schema = '{"type": "object"}'
    p = SamplingParams(max_new_tokens=64, temperature=0, top_p=1, top_k=20, json_schema=schema)
    assert SamplingParams() == SamplingParams(temperature=1, repetition_penalty=1) and calls == []
    assert p.json_schema == schema and p.temperature == 0.0 and type(p.temperature) is float
    assert type(p.top_p) is float and type(p.repetition_penalty) is float
    assert SamplingParams(temperature=0.5, seed=3).seed == 3 and calls == ["seed"]
    assert SamplingParams(json_schema={"type": "object"}).json_schema == schema


def test_top_k_zero_message_says_use_minus_one() -> None:
    with pytest.raises(ValueError, match="-1"):
        SamplingParams(top_k=0)


def test_range_in_message() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SamplingParams(top_p=2.0)
    with pytest.raises(ValueError, match=r"\[-2, 2\]"):
        SamplingParams(presence_penalty=5.0)


def test_valid_edges() -> None:
    p = SamplingParams(
        max_new_tokens=0, temperature=0, top_p=1, top_k=1, min_p=1, frequency_penalty=-2,
        presence_penalty=2, repetition_penalty=0.01, seed=0, n=3,
    )
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p.is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(min_new_tokens=5, max_new_tokens=5).min_new_tokens == 5


def test_stop_normalized_to_tuple() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    hash(SamplingParams(stop=["a"], stop_token_ids=[3]))  # hashable once normalized


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


def test_from_dict() -> None:
    assert SamplingParams.from_dict(None) == SamplingParams()
    p = SamplingParams(temperature=0.3)
    assert SamplingParams.from_dict(p) is p
    q = SamplingParams.from_dict({"temperature": 0, "stop": "x", "stop_token_ids": None, "seed": None})
    assert q.temperature == 0.0 and q.stop == ("x",) and q.stop_token_ids == ()
    with pytest.raises(ValueError, match="unknown sampling parameter 'foo'"):
        SamplingParams.from_dict({"foo": 1})
    # null means the default (as SGLang and vLLM read a JSON null), for every field
    nulls = SamplingParams.from_dict({name: None for name in SamplingParams.field_names()})
    assert nulls == SamplingParams()
    with pytest.raises(ValueError, match="mapping"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


def test_to_dict_round_trip() -> None:
    p = SamplingParams(stop=["a"], stop_token_ids=[7], seed=3, temperature=0.7, top_k=20)
    d = p.to_dict()
    assert d["stop"] == ["a"] and d["stop_token_ids"] == [7]
    assert set(d) == SamplingParams.field_names()
    assert SamplingParams.from_dict(d) == p


def test_replace_validates() -> None:
    p = SamplingParams(temperature=0.5)
    q = p.replace(top_p=0.9, stop="z")
    assert q.top_p == 0.9 and q.stop == ("z",) and q.temperature == 0.5 and p.top_p == 1.0
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=0.0)
    with pytest.raises(ValueError, match="unknown sampling parameter 'bogus'"):
        p.replace(bogus=1)


def test_imports_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        import plait.sampling
        p = plait.sampling.SamplingParams(stop="x")
        assert "torch" not in sys.modules
        print("ok", p.stop)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_constraint_fields_normalize_and_exclude_each_other() -> None:
    p = SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    assert p.constraint == ("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}')
    hash(p)  # still hashable: the dict was stored as a JSON string
    assert SamplingParams(regex=r"\d+").constraint == ("regex", r"\d+")
    assert SamplingParams().constraint is None
    assert SamplingParams.from_dict({"ebnf": None}).constraint is None
    with pytest.raises(ValueError, match="mutually exclusive"):
        SamplingParams(regex="a", json_schema="{}")
    with pytest.raises(ValueError, match="'regex'"):
        SamplingParams(regex="")
    with pytest.raises(ValueError, match="'json_schema'"):
        SamplingParams(json_schema=3)


def test_stop_regex_is_validated_and_bounded() -> None:
    from plait.sampling import MAX_STOP_REGEX_BYTES, MAX_STOP_REGEX_COUNT

    assert SamplingParams(stop_regex=r"\d+\.").stop_regex == (r"\d+\.",)
    assert SamplingParams(stop_regex=["a", "b"]).stop_regex == ("a", "b")
    assert SamplingParams.from_dict({"stop_regex": []}).stop_regex == ()
    for bad, needle in [("(unclosed", "invalid pattern"), ([""], "non-empty"), (3, "str or a list"),
                        (["x"] * (MAX_STOP_REGEX_COUNT + 1), "at most"), ("a" * (MAX_STOP_REGEX_BYTES + 1), "bytes")]:
        with pytest.raises(ValueError, match=needle):
            SamplingParams(stop_regex=bad)


def test_logit_bias_accepts_json_keys_and_is_bounded() -> None:
    from plait.sampling import MAX_LOGIT_BIAS_ENTRIES

    p = SamplingParams.from_dict({"logit_bias": {"42": -100, "7": 2.5}})
    assert p.logit_bias == ((7, 2.5), (42, -100.0))
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams.from_dict(p.to_dict()) == p and p.to_dict()["logit_bias"] == {"7": 2.5, "42": -100.0}
    hash(p)  # frozen and hashable
    for bad, needle in [({"x": 1}, "token ids"), ({-1: 1}, "token ids"), ({"1": "big"}, "number"),
                        ({1: 1e12}, "values must be in"), ({1: float("nan")}, "finite"), ([1, 2], "map token ids"),
                        ({i: 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}, "at most")]:
        with pytest.raises(ValueError, match=needle):
            SamplingParams(logit_bias=bad)


def test_errors_quote_large_values_briefly() -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(stop_regex=["(" + "x" * 100_000])
    assert len(str(info.value)) < 400


def test_stop_strings_and_stop_token_ids_are_bounded() -> None:
    from plait.sampling import MAX_STOP_CHARS, MAX_STOP_COUNT, MAX_STOP_TOKEN_IDS

    assert len(SamplingParams(stop=["s"] * MAX_STOP_COUNT).stop) == MAX_STOP_COUNT
    assert SamplingParams(stop="x" * MAX_STOP_CHARS).stop == ("x" * MAX_STOP_CHARS,)
    assert len(SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS))).stop_token_ids) == MAX_STOP_TOKEN_IDS
    cases = [
        ({"stop": [f"s{i}" for i in range(100_000)]}, "'stop' allows at most"),
        ({"stop": "x" * 1_000_000}, "'stop' has a string of 1000000 characters"),
        ({"stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}, "at most"),
        ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "'stop_token_ids' allows at most"),
    ]
    for fields, needle in cases:
        with pytest.raises(ValueError, match=needle) as info:
            SamplingParams.from_dict(fields)
        assert len(str(info.value)) < 200  # the message never echoes the huge value


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 1e-30, 5e-6])
def test_tiny_temperatures_are_greedy(temperature: float) -> None:
    from plait.sampling import GREEDY_TEMPERATURE_EPS

    assert GREEDY_TEMPERATURE_EPS == 1e-5
    p = SamplingParams(temperature=temperature)
    assert p.is_greedy and p.temperature == temperature  # the value is kept (to_dict round-trips)
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE_EPS).is_greedy
