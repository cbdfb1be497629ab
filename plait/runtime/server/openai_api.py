"""The OpenAI-compatible API: ``/v1/completions`` and ``/v1/chat/completions`` requests and responses.

Requests become the same ``GenerateJob``s as SGLang's ``/generate``. Supported: streaming, ``n``,
``stop``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, penalties,
``logprobs`` / ``top_logprobs``, ``echo`` (completions), ``response_format`` (``json_object``,
``json_schema``) and the extensions SGLang also accepts (``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``regex``, ``ebnf``, ``json_schema``, ``ignore_eos``, ``stop_token_ids``, ...). Fields of
OpenAI's API that plait does not implement are accepted at their default value only.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.server.protocol import (
    TO_CONTEXT,
    UNSET,
    GenerateJob,
    LogprobText,
    RequestError,
    check_json_schema,
    check_prompt,
    expect_bool,
    expect_int,
    fit_max_tokens,
    reject_non_default,
    reject_unknown,
    sampling_params_from,
)
from plait.sampling import JSON_OBJECT

# OpenAI name -> SGLang sampling-parameter name (value passed through; SamplingParams validates it)
_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop", "n": "n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    # extensions (SGLang / vLLM)
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens",
    "regex": "regex", "ebnf": "ebnf", "json_schema": "json_schema", "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens", "stop_token_ids": "stop_token_ids", "no_stop_trim": "no_stop_trim",
}
_COMMON = {"model", "stream", "stream_options", "max_tokens", "response_format", "user", "rid", "program_id", *_SAMPLING}
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of", "logit_bias"})
CHAT_FIELDS = frozenset(_COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "audio", "modalities", "prediction", "reasoning_effort",
    "web_search_options", "store", "metadata", "service_tier",
})
COMPLETION_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {"suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {})}
CHAT_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False), "functions": (None, []), "function_call": (None, "none", "auto"),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class OpenAIRequest:
    """A checked OpenAI request: the engine jobs plus what the response needs."""

    chat: bool
    jobs: list[GenerateJob]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs
    model: str
    echo_texts: list[str] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _response_format(value: Any, sampling: dict[str, Any]) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        sampling["json_schema"] = JSON_OBJECT
        return
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON Schema object",
                               param="response_format")
        sampling["json_schema"] = schema
        return
    raise RequestError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {value!r}",
                       param="response_format")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    sampling = {sgl: body[name] for name, sgl in _SAMPLING.items() if body.get(name) is not None}
    _response_format(body.get("response_format"), sampling)
    given = [k for k in ("regex", "ebnf", "json_schema") if k in sampling]
    if len(given) > 1:
        raise RequestError(f"give at most one of regex / ebnf / json_schema / response_format, got {given}",
                           param=given[1])
    return sampling


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed with stream=true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise RequestError("stream_options accepts only 'include_usage'", param="stream_options")
    return expect_bool("stream_options.include_usage", options.get("include_usage", False))


def _jobs(body: dict, prompts: list[list[int]], sampling: dict, max_tokens: Any, name: str, state: Any,
          stream: bool, logprobs: int | None, start_len: int) -> tuple[list[GenerateJob], int]:
    """``max_tokens``: the client's value, or ``UNSET`` (the protocol default, 16) or ``TO_CONTEXT``."""
    if max_tokens != TO_CONTEXT:
        sampling = {**sampling, "max_new_tokens": 16 if max_tokens == UNSET else max_tokens}
    aliases = {sgl: name for name, sgl in _SAMPLING.items() if name != sgl}
    params = sampling_params_from(sampling, name="request", aliases={**aliases, "max_new_tokens": name})
    check_json_schema(params)
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or len(prompts) > 1):
        raise RequestError("rid must be a string, and only for a single prompt", param="rid")
    jobs = []
    info = state.info
    for ids in prompts:
        check_prompt(ids, info.max_prompt_tokens, info.vocab_size)
        fitted = fit_max_tokens(params, max_tokens, len(ids), info.context_length, name=name)
        jobs.append(GenerateJob(
            rid=rid or uuid.uuid4().hex, input_ids=ids, sampling_params=fitted.to_dict(), n=fitted.n,
            return_logprob=logprobs is not None, logprob_start_len=start_len if logprobs is not None else -1,
            top_logprobs_num=logprobs or 0, return_text_in_logprobs=True, stream=stream,
            program_id=body.get("program_id"),
        ))
    return jobs, params.n


def _common(body: Any, fields: frozenset[str], defaults: dict, where: str, state: Any) -> tuple[bool, bool]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    reject_unknown(body, fields, where)
    reject_non_default(body, defaults, where)
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("field 'model' is required (see /v1/models)", param="model")
    if model not in state.model_names:
        raise RequestError(f"the model {model!r} does not exist; this server serves {state.model_names[0]!r}",
                           status=404, param="model", code="model_not_found")
    if body.get("program_id") is not None and not state.info.supports_program_id:
        raise RequestError("field 'program_id' is not supported by this server's engine", param="program_id")
    stream = expect_bool("stream", body.get("stream") or False)
    return stream, _stream_options(body, stream)


def _max_tokens(body: dict[str, Any], names: tuple[str, ...], default: Any, minimum: int) -> Any:
    for name in names:
        if body.get(name) is not None:
            return expect_int(name, body[name], minimum)
    return default


def parse_completion(body: Any, state: Any) -> OpenAIRequest:
    """Check a ``/v1/completions`` body. ``state``: the app state (tokenizer, engine info, model names)."""
    stream, usage = _common(body, COMPLETION_FIELDS, COMPLETION_DEFAULT_ONLY, "/v1/completions", state)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise RequestError("field 'prompt' must be a string, a list of strings, or token ids", param="prompt")
    ids = [state.encode(p) if isinstance(p, str) else p for p in prompts]
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = expect_int("logprobs", logprobs, 0, 20)
    echo = expect_bool("echo", body.get("echo") or False)
    max_tokens = _max_tokens(body, ("max_tokens",), UNSET, 0)  # unset: OpenAI's default for completions, 16
    jobs, n = _jobs(body, ids, _sampling(body), max_tokens, "max_tokens", state, stream, logprobs, 0 if echo else -1)
    echo_texts = [p if isinstance(p, str) else state.decode(p) for p in prompts] if echo else None
    return OpenAIRequest(False, jobs, n, stream, usage, logprobs, body["model"], echo_texts)


def message_text(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{i}] must be an object", param="messages")
    role, content = message.get("role"), message.get("content")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise RequestError(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                           param="messages")
    unknown = set(message) - {"role", "content", "name"}
    if unknown:
        raise RequestError(f"messages[{i}] has unsupported field(s) {sorted(unknown)}", param="messages")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content: only text parts are supported, got {part!r}",
                                   param="messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return {"role": role, "content": content}


def parse_chat(body: Any, state: Any) -> OpenAIRequest:
    """Check a ``/v1/chat/completions`` body and render its messages with the model's chat template."""
    stream, usage = _common(body, CHAT_FIELDS, CHAT_DEFAULT_ONLY, "/v1/chat/completions", state)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("field 'messages' must be a non-empty list", param="messages")
    text = state.render_chat([message_text(m, i) for i, m in enumerate(messages)])
    ids = state.encode(text, add_special_tokens=False)
    logprobs = None
    if expect_bool("logprobs", body.get("logprobs") or False):
        logprobs = expect_int("top_logprobs", body.get("top_logprobs") or 0, 0, 20)
    elif body.get("top_logprobs") is not None:
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), TO_CONTEXT, 1)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    jobs, n = _jobs(body, [ids], _sampling(body), max_tokens, name, state, stream, logprobs, -1)
    return OpenAIRequest(True, jobs, n, stream, usage, logprobs, body["model"])


# ------------------------------------------------------------------------------------------ responses
def finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else _FINISH.get(reason.get("type"), reason.get("type"))


def _chat_logprobs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    tops = meta.get("output_top_logprobs") or []
    content = []
    for i, (lp, _tid, text) in enumerate(meta.get("output_token_logprobs", [])):
        top = tops[i] if i < len(tops) and tops[i] is not None else []
        content.append({
            "token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for v, _, t in top],
        })
    return content


class CompletionLogprobs:
    """Builds the legacy completions ``logprobs`` object, keeping text offsets across stream chunks."""

    def __init__(self) -> None:
        self.offset = 0

    def build(self, entries: list, tops: list) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, (lp, _tid, text) in enumerate(entries):
            top = tops[i] if i < len(tops) else None
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {t: v for v, _, t in top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


class ResponseBuilder:
    """Turns engine events of one ``OpenAIRequest`` into OpenAI responses and stream chunks."""

    def __init__(self, request: OpenAIRequest, texts: LogprobText):
        self.req, self.texts = request, texts
        self.kind = "chat.completion" if request.chat else "text_completion"
        self.started: set[int] = set()
        self.offsets: dict[int, CompletionLogprobs] = {}
        self.usage_parts: dict[int, dict[str, Any]] = {}

    def choice_index(self, job_index: int, sample: int) -> int:
        return job_index * self.req.n + sample

    def _header(self, chunk: bool) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.req.chat else "cmpl-"
        obj = self.kind + (".chunk" if chunk and self.req.chat else "")
        return {"id": prefix + self.req.id, "object": obj, "created": self.req.created, "model": self.req.model}

    def _logprobs(self, index: int, job_index: int, meta: dict[str, Any], first: bool) -> Any:
        if self.req.logprobs is None:
            return None
        meta = self.texts.decorate(meta, True)
        if self.req.chat:
            return {"content": _chat_logprobs(meta)}
        builder = self.offsets.setdefault(index, CompletionLogprobs())
        entries, tops = meta.get("output_token_logprobs", []), meta.get("output_top_logprobs") or []
        if first and self.req.echo_texts is not None:
            entries = meta.get("input_token_logprobs", []) + entries
            tops = (meta.get("input_top_logprobs") or [None] * len(meta.get("input_token_logprobs", []))) + tops
        return builder.build(entries, tops)

    def record_usage(self, job_index: int, sample: int, meta: dict[str, Any]) -> None:
        self.usage_parts[self.choice_index(job_index, sample)] = meta

    def usage(self) -> dict[str, Any]:
        """Prompt and cached tokens count once per prompt (sample 0); completion tokens for every sample."""
        parts = self.usage_parts
        prompt = sum(m.get("prompt_tokens", 0) for i, m in parts.items() if i % self.req.n == 0)
        cached = sum(m.get("cached_tokens", 0) for i, m in parts.items() if i % self.req.n == 0)
        completion = sum(m.get("completion_tokens", 0) for m in parts.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def choice(self, job_index: int, event: Any, chunk: bool) -> dict[str, Any]:
        """One choice entry: the delta of a stream event (``chunk``) or a whole finished output."""
        index = self.choice_index(job_index, event.index)
        first = index not in self.started
        self.started.add(index)
        text = event.text_delta if chunk else event.text
        if not self.req.chat and first and self.req.echo_texts is not None:
            text = self.req.echo_texts[job_index] + text
        choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(index, job_index, event.meta_info, first)}
        if self.req.chat and chunk:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or first:
                delta["content"] = text
            choice["delta"] = delta
        elif self.req.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"] = finish_reason(event.meta_info) if event.finished else None
        if event.finished:
            matched = (event.meta_info.get("finish_reason") or {}).get("matched")
            choice["matched_stop"] = matched
            self.record_usage(job_index, event.index, event.meta_info)
        return choice

    def chunk(self, job_index: int, event: Any) -> dict[str, Any]:
        return {**self._header(True), "choices": [self.choice(job_index, event, chunk=True)]}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._header(True), "choices": [], "usage": self.usage()}

    def response(self, finals: list[tuple[int, Any]]) -> dict[str, Any]:
        """The non-streamed response from every finished ``(job_index, event)``."""
        choices = sorted((self.choice(j, e, chunk=False) for j, e in finals), key=lambda c: c["index"])
        return {**self._header(False), "choices": choices, "usage": self.usage()}
