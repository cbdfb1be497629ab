"""SamplingParams: the one definition of sampling options, shared by the language and the runtime.

Names and defaults follow SGLang's native API, so a request written for SGLang means the same thing
here. The object is frozen and validated on construction: a bad value raises ``ValueError`` naming
the field and the allowed range, so a server can turn it into a clear 400 instead of ignoring it.

This module must not import torch: the frontend (``plait.lang``) uses it without torch installed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GREEDY_TEMPERATURE_EPS", "JSON_OBJECT", "SamplingParams"]

# ``json_schema=JSON_OBJECT``: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).
# ``json_schema={}`` (or ``True``) allows any JSON value.
JSON_OBJECT = '{"type": "object"}'

_CONSTRAINT_FIELDS = ("regex", "json_schema", "ebnf", "choices")
# Bounds on what one request may ask for (the work per decode step stays bounded).
MAX_STOP_COUNT = 64  # stop strings per request (each costs work on every generated character)
MAX_STOP_CHARS = 4096  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024  # stop token ids per request (each generated token is looked up in them)
MAX_STOP_REGEX_COUNT = 32  # patterns per request (SGLang's limit)
MAX_STOP_REGEX_BYTES = 256  # UTF-8 bytes per pattern (SGLang's limit)
MAX_LOGIT_BIAS_ENTRIES = 1024  # biased tokens per request
MAX_LOGIT_BIAS = 1e9  # |bias| beyond this could overflow float32 logits
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing float32 logits by a tinier
# temperature overflows them to inf (1e-40 is not even a normal float32), and the softmax of inf is NaN.
GREEDY_TEMPERATURE_EPS = 1e-5
_REAL = (int, float)  # exact types (``type(x) in _REAL``: bool, a subclass of int, is not one)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages never echo a large value)."""
    text = repr(value[: limit + 1] if isinstance(value, (str, list, tuple)) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_int(name: str, value: Any, minimum: int | None = None, allowed: str = "") -> None:
    """Raise ValueError unless ``value`` is a real int (not bool, not float) and >= ``minimum``.

    ``allowed`` describes the accepted values for the message; it defaults to ``>= minimum``.
    """
    allowed = allowed or (f" >= {minimum}" if minimum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"sampling parameter {name!r} must be an int{allowed}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"sampling parameter {name!r} must be an int{allowed}, got {value!r}")


def _to_float(name: str, value: Any, allowed: str) -> float:
    """Return ``value`` as a finite float; ints are accepted, bools, strings and NaN/inf are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"sampling parameter {name!r} must be a number {allowed}, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"sampling parameter {name!r} must be a finite number {allowed}, got {value!r}")
    return result


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"sampling parameter {name!r} must be a bool, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one generation. Frozen; every field is validated in ``__post_init__``.

    ``stop`` may be given as a single string or a list; it is stored as a tuple: at most
    ``MAX_STOP_COUNT`` strings of at most ``MAX_STOP_CHARS`` characters each. ``stop_token_ids`` likewise
    (at most ``MAX_STOP_TOKEN_IDS``). ``top_k=-1`` means no top-k filter; ``temperature=0`` means greedy
    decoding, and so does any temperature below ``GREEDY_TEMPERATURE_EPS`` (1e-5).
    ``no_stop_trim=True`` keeps the matched stop string at the end of the output text.
    ``stop_regex`` (a pattern or a list, stored as a tuple; Python ``re`` syntax): generation stops when
    one matches the generated text; the text is cut at the match like a stop string (``no_stop_trim``
    keeps it). At most ``MAX_STOP_REGEX_COUNT`` patterns of ``MAX_STOP_REGEX_BYTES`` bytes each.
    ``logit_bias`` maps token ids (ints, or their decimal strings as in JSON) to a number added to that
    token's logit before sampling (greedy included); stored as sorted ``(token_id, bias)`` pairs, None
    when empty. Reported logprobs stay those of the raw model distribution.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_regex: tuple[str, ...] = field(default=())
    logit_bias: tuple[tuple[int, float], ...] | None = None
    # Constrained decoding (at most one): the output must match this regex / JSON schema / EBNF grammar.
    # ``json_schema`` may be given as a dict (or a JSON string); it is stored as a JSON string so the
    # object stays hashable; a pydantic model class is replaced by its JSON schema. Any JSON object is
    # ``JSON_OBJECT``. ``choices`` (a list of strings, stored as a tuple): the output is exactly one of them.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Each group has a fast path for values that are already what validation would leave (the usual
        # request: defaults and plain ints / floats in range): the same checks, without the conversions
        # and the per-field calls (a request's parameters cost ~14 us before, ~7 us with them).
        self._normalize_constraint()
        self._validate_ints()
        self._validate_floats()
        if not (type(self.stop) is tuple and not self.stop and type(self.stop_token_ids) is tuple
                and not self.stop_token_ids):
            self._normalize_stops()
        if not (type(self.stop_regex) is tuple and not self.stop_regex):
            self._normalize_stop_regex()
        if self.logit_bias is not None:
            self._normalize_logit_bias()
        if not (type(self.ignore_eos) is bool and type(self.skip_special_tokens) is bool
                and type(self.no_stop_trim) is bool):
            for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
                _check_bool(name, getattr(self, name))
        if self.seed is not None:
            _check_int("seed", self.seed, allowed=" or None")

    # ------------------------------------------------------------------ validation helpers
    def _validate_ints(self) -> None:
        top_k = self.top_k
        if (type(self.max_new_tokens) is int and type(self.min_new_tokens) is int and type(top_k) is int
                and type(self.n) is int and 0 <= self.min_new_tokens <= self.max_new_tokens
                and (top_k == -1 or top_k >= 1) and self.n >= 1):
            return  # fast path: the checks below would all pass
        _check_int("max_new_tokens", self.max_new_tokens, 0)
        _check_int("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"sampling parameter 'min_new_tokens' must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        _check_int("top_k", self.top_k, allowed=" that is -1 (off) or >= 1")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(
                f"sampling parameter 'top_k' must be -1 (off) or >= 1, got {self.top_k}; use -1 to disable top-k"
            )
        _check_int("n", self.n, 1)

    def _validate_floats(self) -> None:
        t, p, m = self.temperature, self.top_p, self.min_p
        f, r, rp = self.frequency_penalty, self.presence_penalty, self.repetition_penalty
        if (type(t) in _REAL and type(p) in _REAL and type(m) in _REAL and type(f) in _REAL
                and type(r) in _REAL and type(rp) in _REAL
                and 0.0 <= t < math.inf and 0.0 < p <= 1.0 and 0.0 <= m <= 1.0 and -2.0 <= f <= 2.0
                and -2.0 <= r <= 2.0 and 0.0 < rp < math.inf):
            # fast path: plain ints or floats (not bools), finite (NaN fails every comparison), in range
            for name, value in (("temperature", t), ("top_p", p), ("min_p", m), ("frequency_penalty", f),
                                ("presence_penalty", r), ("repetition_penalty", rp)):
                if type(value) is int:
                    object.__setattr__(self, name, float(value))
            return
        # (name, predicate, allowed-range text)
        specs: tuple[tuple[str, Any, str], ...] = (
            ("temperature", lambda v: v >= 0.0, ">= 0 (0 = greedy)"),
            ("top_p", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
            ("min_p", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
            ("frequency_penalty", lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
            ("presence_penalty", lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
            ("repetition_penalty", lambda v: v > 0.0, "> 0 (1 = off)"),
        )
        for name, ok, allowed in specs:
            value = _to_float(name, getattr(self, name), allowed)
            if not ok(value):
                raise ValueError(f"sampling parameter {name!r} must be {allowed}, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)

    def _normalize_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise ValueError(f"sampling parameter 'stop' must be a str or a list of str, got {_short(stop)}")
        if len(stop) > MAX_STOP_COUNT:
            raise ValueError(f"sampling parameter 'stop' allows at most {MAX_STOP_COUNT} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"sampling parameter 'stop' must contain non-empty strings, got {_short(s)}")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"sampling parameter 'stop' has a string of {len(s)} characters; "
                                 f"at most {MAX_STOP_CHARS} are allowed")
        object.__setattr__(self, "stop", stop)

        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif isinstance(ids, (list, tuple)):
            ids = tuple(ids)
        else:
            raise ValueError(f"sampling parameter 'stop_token_ids' must be a list of int >= 0, got {_short(ids)}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"sampling parameter 'stop_token_ids' allows at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(ids)}")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"sampling parameter 'stop_token_ids' must contain ints >= 0, got {t!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    def _normalize_stop_regex(self) -> None:
        patterns = self.stop_regex
        if patterns is None:
            patterns = ()
        elif isinstance(patterns, str):
            patterns = (patterns,)
        elif isinstance(patterns, (list, tuple)):
            patterns = tuple(patterns)
        else:
            raise ValueError(f"sampling parameter 'stop_regex' must be a str or a list of str, got {_short(patterns)}")
        if len(patterns) > MAX_STOP_REGEX_COUNT:
            raise ValueError(f"sampling parameter 'stop_regex' allows at most {MAX_STOP_REGEX_COUNT} patterns, "
                             f"got {len(patterns)}")
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"sampling parameter 'stop_regex' must contain non-empty strings, got {_short(pattern)}")
            size = len(pattern.encode("utf-8"))
            if size > MAX_STOP_REGEX_BYTES:
                raise ValueError(f"sampling parameter 'stop_regex' has a pattern of {size} bytes; "
                                 f"at most {MAX_STOP_REGEX_BYTES} are allowed")
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as exc:
                raise ValueError(f"sampling parameter 'stop_regex' has an invalid pattern {_short(pattern)}: {exc}") from None
        object.__setattr__(self, "stop_regex", patterns)

    def _normalize_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if isinstance(bias, Mapping):
            items = list(bias.items())
        elif isinstance(bias, (list, tuple)) and all(isinstance(e, (list, tuple)) and len(e) == 2 for e in bias):
            items = [tuple(e) for e in bias]
        else:
            raise ValueError("sampling parameter 'logit_bias' must map token ids to numbers, "
                             f"e.g. {{\"42\": -100}}, got {_short(bias)}")
        if len(items) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"sampling parameter 'logit_bias' allows at most {MAX_LOGIT_BIAS_ENTRIES} tokens, "
                             f"got {len(items)}")
        pairs: dict[int, float] = {}
        for key, value in items:
            token = key
            if isinstance(key, str) and key.strip().lstrip("+").isdigit():
                token = int(key)
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"sampling parameter 'logit_bias' keys must be token ids (ints >= 0), got {_short(key)}")
            amount = _to_float("logit_bias", value, f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
            if abs(amount) > MAX_LOGIT_BIAS:
                raise ValueError(f"sampling parameter 'logit_bias' values must be in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}], got {_short(value)} for token {token}")
            pairs[token] = amount
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items())) or None)

    def _normalize_constraint(self) -> None:
        schema = self.json_schema
        if schema is not None and type(schema) is not str:  # a str (the usual case) is stored as is
            if isinstance(schema, type) and callable(getattr(schema, "model_json_schema", None)):
                schema = schema.model_json_schema()  # a pydantic model class
            if schema is True:
                schema = {}
            if isinstance(schema, Mapping):
                try:
                    schema = json.dumps(schema)
                except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                    raise ValueError(f"sampling parameter 'json_schema' is not JSON-serializable: {exc}") from None
            object.__setattr__(self, "json_schema", schema)
        if self.choices is not None:
            self._normalize_choices()
        for name in ("regex", "json_schema", "ebnf"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                kind = "a non-empty str or a dict" if name == "json_schema" else "a non-empty str"
                raise ValueError(f"sampling parameter {name!r} must be {kind} or None, got {value!r}")
        given = [n for n in _CONSTRAINT_FIELDS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"sampling parameters {given} are mutually exclusive; give at most one constraint")

    def _normalize_choices(self) -> None:
        choices = self.choices
        if choices is None:
            return
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
            raise ValueError(f"sampling parameter 'choices' must be a list of non-empty str or None, got {choices!r}")
        choices = tuple(choices)
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise ValueError(f"sampling parameter 'choices' must be a non-empty list of non-empty str, got {choices!r}")
        object.__setattr__(self, "choices", choices)

    # ------------------------------------------------------------------ constructors / views
    @classmethod
    @functools.cache
    def field_names(cls) -> frozenset[str]:
        """The names of all sampling parameters (computed once: every request's keys are checked)."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _check_keys(cls, keys: Collection[str]) -> None:
        names = cls.field_names()
        if names.issuperset(keys):
            return
        unknown = sorted(str(k) for k in keys if k not in names)
        if unknown:
            listed = ", ".join(repr(k) for k in unknown)
            noun = "parameter" if len(unknown) == 1 else "parameters"
            raise ValueError(f"unknown sampling {noun} {listed}; known: {', '.join(sorted(names))}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | SamplingParams | None) -> SamplingParams:
        """Build from a mapping (e.g. a JSON request body's ``sampling_params``).

        ``None`` gives the defaults; a ``SamplingParams`` is returned unchanged. Unknown keys raise
        ``ValueError``. A key whose value is ``None`` takes its default (as SGLang and vLLM read a JSON null).
        """
        if d is None:
            return cls()
        if isinstance(d, SamplingParams):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling parameters must be a mapping, got {type(d).__name__}")
        cls._check_keys(d.keys())
        return cls(**{key: value for key, value in d.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples become lists); ``from_dict(p.to_dict()) == p``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        out["stop_regex"] = list(self.stop_regex)
        if self.logit_bias is not None:
            out["logit_bias"] = {str(token): bias for token, bias in self.logit_bias}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied, validated like a new object."""
        self._check_keys(changes.keys())
        return dataclasses.replace(self, **changes)

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``(kind, spec)`` with kind ``"regex"``, ``"json_schema"``, ``"ebnf"`` or ``"choices"`` (whose spec
        is the JSON list of choices); None when unconstrained."""
        for name in _CONSTRAINT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return name, json.dumps(list(value)) if name == "choices" else value
        return None

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature below ``GREEDY_TEMPERATURE_EPS`` (0 included)
        or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1
