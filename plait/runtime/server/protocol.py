"""Request checking shared by the server's APIs, and the jobs handed to the engine process.

SGLang's ``/generate`` fields are read in ``native.py``, the OpenAI API's in ``openai_api.py``; both use
these helpers. SGLang's sampling object (``sampling_params_from``) honours SamplingParams' fields and
accepts SGLang's others at their default values only (``SAMPLING_DEFAULT_ONLY``). Unknown fields are
ignored with a warning that reaches the caller (``split_unknown`` and the ``X-Plait-Ignored-Fields``
response header, as vLLM does), or refused with 400 under ``--strict-fields``.
Error messages never echo a large value back: ``short_repr`` bounds what they quote.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plait.sampling import SamplingParams

# Sampling parameters of SGLang that plait lacks: accepted only at these values (None: the default).
SAMPLING_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "spaces_between_special_tokens": (True, None),
    "custom_params": (None, {}),  # read by custom logit processors only (refused: they execute code)
    "watermark": (None,),
    "beam_width": (None, 1),
}
# Sampling parameters that change nothing about the output: accepted with any value.
SAMPLING_IGNORED = frozenset({"stream_interval"})  # how often stream events are sent; plait sends every step
# SGLang's names that plait reads besides SamplingParams' own fields.
SAMPLING_EXTRA = frozenset({"sampling_seed", "structural_tag", *SAMPLING_DEFAULT_ONLY, *SAMPLING_IGNORED})
MAX_TOP_LOGPROBS = 100
IGNORED_FIELDS_HEADER = "X-Plait-Ignored-Fields"
MAX_REPORTED_FIELDS = 32  # the header lists at most this many names (then "... (N more)")
MAX_FIELD_NAME_CHARS = 64  # a reported name longer than this is cut
MAX_ERROR_CHARS = 2000  # an error message longer than this is cut (never echo a large payload back)
logger = logging.getLogger("plait.server")


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages about client values."""
    text = repr(value) if not isinstance(value, (str, bytes)) or len(value) <= 4 * limit else repr(value[:limit])
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a message that says what to change.

    The message is cut at ``MAX_ERROR_CHARS``: whatever it quotes, the error body stays small.
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        if len(message) > MAX_ERROR_CHARS:
            message = f"{message[:MAX_ERROR_CHARS]}... (message cut)"
        if param is not None and len(param) > MAX_FIELD_NAME_CHARS:
            param = param[:MAX_FIELD_NAME_CHARS] + "..."
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    @property
    def error_type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """The error in OpenAI's shape (SGLang's clients read ``error.message`` too)."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


@dataclass
class GenerateJob:
    """One prompt for the engine (``n`` samples of it) and how to report its results."""

    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    n: int = 1
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    program_id: str | None = None
    cache_namespace: str | None = None  # prefix-cache namespace (SGLang's extra_key / cache_salt)
    return_prompt_token_ids: bool = False  # the HTTP side adds ``prompt_token_ids`` to each output
    lora_path: str | None = None  # the LoRA adapter's name (None: the base model)

    def spec(self) -> dict[str, Any]:
        """What the engine process receives (see ``process.py``)."""
        return {
            "input_ids": self.input_ids, "sampling_params": self.sampling_params,
            "return_logprob": self.return_logprob, "logprob_start_len": self.logprob_start_len,
            "top_logprobs_num": self.top_logprobs_num, "stream": self.stream, "program_id": self.program_id,
            "cache_namespace": self.cache_namespace, "lora_path": self.lora_path,
        }


# ------------------------------------------------------------------------------------ field checks
def expect_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"field {name!r} must be a boolean, got {short_repr(value)}", param=name)
    return value


def expect_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"field {name!r} must be an integer, got {short_repr(value)}", param=name)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise RequestError(f"field {name!r} must be {bounds}, got {value}", param=name)
    return value


def _printable_name(name: Any) -> str:
    """A client's field name made safe for a log line and an HTTP header: ASCII, no controls, bounded."""
    text = str(name)[: MAX_FIELD_NAME_CHARS * 4].encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() and c != "," else "?" for c in text)
    return text if len(text) <= MAX_FIELD_NAME_CHARS else text[:MAX_FIELD_NAME_CHARS] + "..."


def split_unknown(body: Mapping[str, Any], known: Iterable[str], where: str, strict: bool = False,
                  prefix: str = "") -> list[str]:
    """The keys of ``body`` that are not in ``known`` (sorted, made printable, prefixed with ``prefix``).

    The caller drops them and reports them back (``ignored_fields_headers``); they are logged here as a
    warning. With ``strict`` (``plait serve --strict-fields``) they are refused instead: a 400 naming
    them. Known fields with wrong values are the caller's 400s either way.
    """
    known = known if isinstance(known, (set, frozenset)) else frozenset(known)
    unknown = sorted(_printable_name(k) for k in body if k not in known)
    if not unknown:
        return []
    names = [prefix + name for name in unknown]
    listed = ", ".join(map(repr, names[:MAX_REPORTED_FIELDS]))
    if strict:
        raise RequestError(f"unknown field(s) {listed} for {where} (this server rejects unknown fields); "
                           f"accepted fields: {', '.join(sorted(known))}", param=names[0])
    logger.warning("ignored unknown field(s) %s of %s", listed, where)
    return names


def ignored_fields_headers(names: Sequence[str]) -> dict[str, str]:
    """Response headers reporting ignored fields: ``{}`` when none, else ``X-Plait-Ignored-Fields``.

    The value is a comma-separated list of names (at most ``MAX_REPORTED_FIELDS``, then ``... (N more)``).
    """
    if not names:
        return {}
    shown = list(names[:MAX_REPORTED_FIELDS])
    if len(names) > MAX_REPORTED_FIELDS:
        shown.append(f"... ({len(names) - MAX_REPORTED_FIELDS} more)")
    return {IGNORED_FIELDS_HEADER: ", ".join(shown)}


def reject_unknown(body: dict[str, Any], known: frozenset[str] | set[str], where: str) -> None:
    """Refuse unknown fields with a 400 (``split_unknown(..., strict=True)``)."""
    split_unknown(body, known, where, strict=True)


def reject_non_default(body: dict[str, Any], defaults: dict[str, tuple[Any, ...]], where: str) -> None:
    for name, allowed in defaults.items():
        if name in body and body[name] not in allowed:
            raise RequestError(
                f"field {name!r} of {where} is not supported by plait; leave it unset "
                f"(accepted value: {allowed[0]!r}), got {short_repr(body[name])}",
                param=name,
            )


def sampling_params_from(raw: Any, name: str = "sampling_params", aliases: dict[str, str] | None = None,
                         ignored: list[str] | None = None, strict: bool = False) -> SamplingParams:
    """Validate a sampling-params object (SGLang names); SGLang-only keys must be at their defaults.

    ``aliases`` maps SGLang names to the client's names (OpenAI's ``max_tokens``) for error messages.
    A key set to null takes its default. Unknown keys: with ``ignored`` (a list), they are dropped and
    their names appended to it (``split_unknown``; ``strict`` refuses them); without it they are a 400.
    ``structural_tag`` becomes an ``ebnf`` (Lark) constraint (``structural_tag.py``).
    """
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise RequestError(f"field {name!r} must be an object, got {short_repr(raw)}", param=name)
    raw = {key: value for key, value in raw.items() if value is not None or key == "max_new_tokens"}
    if ignored is not None:
        known = SamplingParams.field_names() | SAMPLING_EXTRA
        ignored.extend(f"{name}.{key}" for key in split_unknown(raw, known, name, strict))
        raw = {key: value for key, value in raw.items() if key in known}
    reject_non_default(raw, SAMPLING_DEFAULT_ONLY, name)
    for key in (*SAMPLING_DEFAULT_ONLY, *SAMPLING_IGNORED):
        raw.pop(key, None)
    if "sampling_seed" in raw:  # newer SGLang's name for the seed
        seed = raw.pop("sampling_seed")
        raw.setdefault("seed", seed)
    if "structural_tag" in raw:
        _structural_tag(raw, name)
    if raw.get("max_new_tokens", 0) is None:
        del raw["max_new_tokens"]  # SGLang: None means "up to the context" (see fit_max_tokens)
    try:
        return SamplingParams.from_dict(raw)
    except ValueError as exc:
        message = str(exc)
        for ours, theirs in (aliases or {}).items():
            message = message.replace(repr(ours), repr(theirs))
        raise RequestError(message, param=name) from None


def _structural_tag(raw: dict[str, Any], name: str) -> None:
    from plait.runtime.server.structural_tag import StructuralTagError, structural_tag_to_lark

    others = [k for k in ("regex", "json_schema", "ebnf", "choices") if raw.get(k) is not None]
    if others:
        raise RequestError(f"structural_tag and {others[0]} are mutually exclusive; give at most one constraint",
                           param=name)
    try:
        raw["ebnf"] = structural_tag_to_lark(raw.pop("structural_tag"))
    except StructuralTagError as exc:
        raise RequestError(str(exc), param="structural_tag") from None


def check_json_schema(params: SamplingParams) -> None:
    if params.json_schema is None:
        return
    try:
        schema = json.loads(params.json_schema)
    except json.JSONDecodeError as exc:
        raise RequestError(f"json_schema is not valid JSON: {exc}", param="json_schema") from None
    if not isinstance(schema, (dict, bool)):
        raise RequestError("json_schema must be a JSON object (a JSON Schema)", param="json_schema")


def check_prompt(ids: list[int], max_prompt_tokens: int, vocab_size: int) -> None:
    if not ids:
        raise RequestError("the prompt is empty; send at least one token of text")
    if len(ids) > max_prompt_tokens:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}", code="context_length_exceeded")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"input_ids contain token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", param="input_ids")


DEFAULT_MAX_N = 128  # samples per prompt (OpenAI's own bound on n)
DEFAULT_MAX_PROMPT_LOGPROBS = 100_000  # prompt positions x max(1, top_logprobs_num) one request may ask for


def check_job_limits(job: GenerateJob, config: Any = None) -> None:
    """Per-request bounds of ``ServerConfig`` (``max_n``, ``max_prompt_logprobs``): 400 past them.

    ``config`` None (or without these fields) takes the defaults above.
    """
    max_n = getattr(config, "max_n", DEFAULT_MAX_N)
    if job.n > max_n:
        raise RequestError(f"n={job.n} samples per prompt; this server allows at most {max_n} "
                           "(plait serve --max-n)", param="n")
    if job.return_logprob and job.logprob_start_len >= 0:
        limit = getattr(config, "max_prompt_logprobs", DEFAULT_MAX_PROMPT_LOGPROBS)
        positions = len(job.input_ids) - job.logprob_start_len
        volume = positions * max(1, job.top_logprobs_num)
        if volume > limit:
            raise RequestError(
                f"prompt logprobs for {positions} prompt positions x {max(1, job.top_logprobs_num)} alternatives = "
                f"{volume} entries; this server returns at most {limit} per request (plait serve "
                "--max-prompt-logprobs): ask for fewer top logprobs or start later in the prompt",
                param="top_logprobs_num")


UNSET = "unset"  # max tokens not given: the protocol's default, shortened to fit the context
TO_CONTEXT = "to_context"  # max tokens given as null / omitted where the default is "the rest of the context"


def fit_max_tokens(params: SamplingParams, given: Any, prompt_len: int, context_length: int,
                   name: str = "max_new_tokens", kv_slots: int | None = None) -> SamplingParams:
    """Fit ``max_new_tokens`` to the context. ``given``: the client's value, ``UNSET`` or ``TO_CONTEXT``.

    An explicit value that does not fit is an error (like SGLang and vLLM); the protocol default is
    shortened to fit; ``TO_CONTEXT`` becomes whatever the prompt leaves of the context. ``kv_slots``
    (the engine's KV pool) bounds it the same way where it is smaller than the context: a request that
    could never fit the pool is refused at admission, not aborted after it started.
    """
    bound, what = context_length, f"the context length {context_length}"
    if kv_slots is not None and kv_slots < context_length:
        bound, what = kv_slots, f"the KV cache's {kv_slots} token slots (--max-total-tokens / --kv-cache-gb)"
    room = bound - prompt_len
    if given == TO_CONTEXT or given == UNSET and params.max_new_tokens > room:
        return params.replace(max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room))
    if given != UNSET and params.max_new_tokens > room:
        raise RequestError(
            f"{name}={params.max_new_tokens} plus the prompt's {prompt_len} tokens exceeds {what}; "
            f"ask for at most {room} new tokens", param=name, code="context_length_exceeded")
    return params


# ---------------------------------------------------------------------------------- output building
class LogprobText:
    """Token text for logprob entries, decoded once per token id (the engine sends ids only)."""

    def __init__(self, decode: Callable[[Sequence[int]], str] | None):
        self.decode = decode
        self.cache: dict[int, str] = {}

    def text(self, token_id: int) -> str | None:
        if self.decode is None:
            return None
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.decode([token_id])
        return text

    def entries(self, entries: list, with_text: bool) -> list:
        return [[lp, tid, self.text(tid) if with_text else None] for lp, tid, *_ in entries]

    def decorate(self, meta: dict[str, Any], with_text: bool) -> dict[str, Any]:
        """A copy of ``meta`` whose logprob entries are ``[logprob, token_id, text-or-None]`` lists."""
        meta = dict(meta)
        for key in ("input_token_logprobs", "output_token_logprobs"):
            if key in meta:
                meta[key] = self.entries(meta[key], with_text)
        for key in ("input_top_logprobs", "output_top_logprobs"):
            if key in meta:
                meta[key] = [None if top is None else self.entries(top, with_text) for top in meta[key]]
        return meta
