"""The OpenAI-compatible API: ``/v1/completions`` and ``/v1/chat/completions`` requests.

Requests become the same ``GenerateJob``s as SGLang's ``/generate``; ``openai_output.py`` formats the
answers. Supported: streaming (``stream_options.include_usage`` / ``continuous_usage_stats``), ``n``,
``stop``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, penalties,
``logit_bias``, ``logprobs`` / ``top_logprobs``, ``echo`` (completions), ``response_format``, tools
(``tools.py``) and chat-template options (``chat_prompt.py``), plus the extensions SGLang and vLLM
accept (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``regex``, ``ebnf``,
``json_schema``, ``ignore_eos``, ``stop_token_ids``, ...). Fields that change nothing plait can honour
are in ``IGNORED``; unknown fields are ignored and reported in a header (``--strict-fields``: 400).
docs/server.md has the field-by-field table.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.server.chat_prompt import normalize_messages, render_chat, render_options
from plait.runtime.server.openai_output import ResponseBuilder, finish_reason  # noqa: F401 - re-exported
from plait.runtime.server.protocol import (
    TO_CONTEXT,
    UNSET,
    GenerateJob,
    RequestError,
    check_job_limits,
    check_json_schema,
    check_prompt,
    expect_bool,
    expect_int,
    fit_max_tokens,
    reject_non_default,
    sampling_params_from,
    short_repr,
    split_unknown,
)
from plait.runtime.server.tools import ToolChoice, parse_chat_tools, tool_grammar
from plait.sampling import JSON_OBJECT

# OpenAI name -> SGLang sampling-parameter name (value passed through; SamplingParams validates it)
SAMPLING_NAMES = {
    "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop", "n": "n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    # extensions (SGLang / vLLM)
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens",
    "regex": "regex", "ebnf": "ebnf", "json_schema": "json_schema", "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens", "stop_token_ids": "stop_token_ids", "no_stop_trim": "no_stop_trim",
    "stop_regex": "stop_regex",
}
# Accepted with any value; they change nothing plait can act on (bookkeeping, billing, hosted features).
IGNORED = frozenset({"user", "safety_identifier", "store", "metadata", "service_tier", "verbosity",
                     "prompt_cache_retention", "prompt_cache_options"})
_CACHE_KEYS = ("prompt_cache_key", "cache_salt")  # prefix-cache namespace (tenants never share cached prompts)
_COMMON = {"model", "stream", "stream_options", "max_tokens", "response_format", "rid", "program_id",
           "logit_bias", *_CACHE_KEYS, *IGNORED, *SAMPLING_NAMES}
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"})
CHAT_FIELDS = frozenset(_COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "audio", "modalities", "prediction", "reasoning_effort",
    "web_search_options", "moderation", "chat_template_kwargs", "continue_final_message", "add_generation_prompt",
    "separate_reasoning",
})
COMPLETION_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {"suffix": (None, ""), "best_of": (None, 1)}
CHAT_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "moderation": (None,),
}
LOGIT_BIAS_RANGE = 100


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
    tools: ToolChoice | None = None
    reasoning_parser: str | None = None
    prompt_text: str = ""
    continuous_usage: bool = False
    ignored: list[str] = field(default_factory=list)  # unknown fields, reported in a response header
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
    if kind == "structural_tag":  # SGLang's and vLLM's extension: constrained text after trigger strings
        sampling["structural_tag"] = value
        return
    raise RequestError(f"response_format type must be 'text', 'json_object', 'json_schema' or 'structural_tag', got "
                       f"{short_repr(value)}", param="response_format")


def logit_bias(value: Any, vocab_size: int) -> dict[str, float] | None:
    """OpenAI's ``logit_bias`` (token-id strings -> -100..100), checked against the vocabulary."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise RequestError("logit_bias must map token ids (strings) to numbers in [-100, 100]", param="logit_bias")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else None
        if token is None or token >= vocab_size:
            raise RequestError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {short_repr(key)}",
                               param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or abs(bias) > LOGIT_BIAS_RANGE:
            raise RequestError(f"logit_bias values must be numbers in [-100, 100], got {short_repr(bias)} for "
                               f"token {token}", param="logit_bias")
        out[str(token)] = float(bias)
    return out


def _sampling(body: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    sampling = {sgl: body[name] for name, sgl in SAMPLING_NAMES.items() if body.get(name) is not None}
    _response_format(body.get("response_format"), sampling)
    bias = logit_bias(body.get("logit_bias"), vocab_size)
    if bias:
        sampling["logit_bias"] = bias
    given = [k for k in ("regex", "ebnf", "json_schema", "structural_tag") if k in sampling]
    if len(given) > 1:
        raise RequestError(f"give at most one of regex / ebnf / json_schema / response_format, got {given}",
                           param=given[1])
    return sampling


def _stream_options(body: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats)."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise RequestError("stream_options is only allowed with stream=true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats",
                                                        "include_obfuscation"}:
        raise RequestError("stream_options accepts 'include_usage' and 'continuous_usage_stats'",
                           param="stream_options")
    return (expect_bool("stream_options.include_usage", options.get("include_usage", False)),
            expect_bool("stream_options.continuous_usage_stats", options.get("continuous_usage_stats", False)))


def cache_namespace(body: dict[str, Any]) -> str | None:
    """``prompt_cache_key`` / ``cache_salt``: requests share cached prefixes only within one namespace."""
    keys = [body[k] for k in _CACHE_KEYS if body.get(k) is not None]
    for key in keys:
        if not isinstance(key, str) or not key or len(key) > 256:
            raise RequestError("prompt_cache_key / cache_salt must be a non-empty string of at most 256 "
                               "characters", param="prompt_cache_key")
    return "\x1f".join(keys) or None


def lora_for_model(body: dict[str, Any], state: Any) -> str | None:
    """The LoRA adapter an OpenAI request's ``model`` names (None: the base model)."""
    model = body.get("model")
    return model if model not in state.model_names and model in state.lora_names else None


def make_jobs(body: dict, prompts: list[list[int]], sampling: dict, max_tokens: Any, name: str, state: Any,
              stream: bool, logprobs: int | None, start_len: int) -> tuple[list[GenerateJob], int]:
    """``max_tokens``: the client's value, or ``UNSET`` (the protocol default, 16) or ``TO_CONTEXT``."""
    if max_tokens != TO_CONTEXT:
        sampling = {**sampling, "max_new_tokens": 16 if max_tokens == UNSET else max_tokens}
    aliases = {sgl: name for name, sgl in SAMPLING_NAMES.items() if name != sgl}
    params = sampling_params_from(sampling, name="request", aliases={**aliases, "max_new_tokens": name})
    check_json_schema(params)
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or len(prompts) > 1):
        raise RequestError("rid must be a string, and only for a single prompt", param="rid")
    namespace = cache_namespace(body)
    jobs = []
    info = state.info
    for ids in prompts:
        check_prompt(ids, info.max_prompt_tokens, info.vocab_size)
        fitted = fit_max_tokens(params, max_tokens, len(ids), info.context_length, name=name,
                                kv_slots=getattr(info, "kv_slots_total", None))
        job = GenerateJob(
            rid=rid or uuid.uuid4().hex, input_ids=ids, sampling_params=fitted.to_dict(), n=fitted.n,
            return_logprob=logprobs is not None, logprob_start_len=start_len if logprobs is not None else -1,
            top_logprobs_num=logprobs or 0, return_text_in_logprobs=True, stream=stream,
            program_id=body.get("program_id"), cache_namespace=namespace, lora_path=lora_for_model(body, state),
        )
        check_job_limits(job, state.config)
        jobs.append(job)
    return jobs, params.n


def check_common(body: Any, fields: frozenset[str], defaults: dict, where: str, state: Any) -> tuple[bool, list[str]]:
    """Checks every OpenAI route shares; returns (stream, ignored unknown fields). Unknown fields are
    removed from ``body``."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    ignored = split_unknown(body, fields, where, strict=getattr(state.config, "strict_fields", False))
    for name in [k for k in body if k not in fields]:
        del body[name]
    reject_non_default(body, defaults, where)
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("field 'model' is required (see /v1/models)", param="model")
    if model not in state.model_names and model not in state.lora_names:
        adapters = f" and the LoRA adapters {sorted(state.lora_names)}" if state.lora_names else ""
        raise RequestError(f"the model {short_repr(model)} does not exist; this server serves "
                           f"{state.model_names[0]!r}{adapters}", status=404, param="model", code="model_not_found")
    _bookkeeping_strings(body)
    if body.get("program_id") is not None and not state.info.supports_program_id:
        raise RequestError("field 'program_id' is not supported by this server's engine", param="program_id")
    return expect_bool("stream", body.get("stream") or False), ignored


def _max_tokens(body: dict[str, Any], names: tuple[str, ...], default: Any, minimum: int) -> Any:
    for name in names:
        if body.get(name) is not None:
            return expect_int(name, body[name], minimum)
    return default


def _is_ids(values: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in values)


def _bookkeeping_strings(body: dict[str, Any]) -> None:
    """``user`` and ``safety_identifier`` are ignored, but, as in OpenAI's API, must be strings."""
    for name in ("user", "safety_identifier"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(f"field {name!r} must be a string, got {short_repr(body[name])}", param=name)


def parse_completion(body: Any, state: Any) -> OpenAIRequest:
    """Check a ``/v1/completions`` body. ``state``: the app state (tokenizer, engine info, model names)."""
    stream, ignored = check_common(body, COMPLETION_FIELDS, COMPLETION_DEFAULT_ONLY, "/v1/completions", state)
    if body.get("suffix"):
        raise RequestError("suffix (fill-in-the-middle) is not supported by the served model", param="suffix")
    usage, continuous = _stream_options(body, stream)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and _is_ids(prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and _is_ids(p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise RequestError("field 'prompt' must be a string, a list of strings, a list of token ids or a list of "
                           "such lists", param="prompt")
    ids = [state.encode(p) if isinstance(p, str) else p for p in prompts]
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = expect_int("logprobs", logprobs, 0, 20)
    echo = expect_bool("echo", body.get("echo") or False)
    max_tokens = _max_tokens(body, ("max_tokens",), UNSET, 0)  # unset: OpenAI's default for completions, 16
    jobs, n = make_jobs(body, ids, _sampling(body, state.info.vocab_size), max_tokens, "max_tokens", state, stream,
                        logprobs, 0 if echo else -1)
    echo_texts = [p if isinstance(p, str) else state.decode(p) for p in prompts] if echo else None
    return OpenAIRequest(False, jobs, n, stream, usage, logprobs, body["model"], echo_texts,
                         continuous_usage=continuous, ignored=ignored)


def message_text(message: Any, i: int) -> dict[str, str]:
    """A plain text message (``/apply_chat_template``): role system/developer/user/assistant, text content."""
    if not isinstance(message, dict):
        raise RequestError(f"messages[{i}] must be an object", param="messages")
    role, content = message.get("role"), message.get("content")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise RequestError(f"messages[{i}].role {short_repr(role)} is not supported (system, developer, user, "
                           "assistant)", param="messages")
    unknown = set(message) - {"role", "content", "name"}
    if unknown:
        raise RequestError(f"messages[{i}] has unsupported field(s) {sorted(unknown)}", param="messages")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content: only text parts are supported, got {short_repr(part)}",
                                   param="messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return {"role": role, "content": content}


def chat_request(body: dict[str, Any], state: Any, messages: list[dict[str, Any]], tools: ToolChoice | None,
                 stream: bool, ignored: list[str], max_names: tuple[str, ...]) -> OpenAIRequest:
    """The engine request for checked chat ``messages`` (shared by chat completions and the Responses API)."""
    sampling = _sampling(body, state.info.vocab_size)
    parser = getattr(state.config, "reasoning_parser", None)
    if not expect_bool("separate_reasoning", body.get("separate_reasoning", True)):
        parser = None
    if parser == "gpt-oss":
        sampling.setdefault("skip_special_tokens", False)  # the harmony channel markers are special tokens
    text = render_chat(state.tokenizer, messages, tools, render_options(body))
    thinking = None  # how a <think> block may precede tool calls (see tool_grammar)
    if parser in ("qwen3", "deepseek-r1"):
        opened = parser == "deepseek-r1" or text.rfind("<think>") > text.rfind("</think>")
        thinking = "open" if opened else "optional"
    grammar = tool_grammar(tools, thinking) if tools is not None else None
    if grammar is not None:
        taken = [k for k in ("regex", "ebnf", "json_schema", "structural_tag") if k in sampling]
        if taken:
            raise RequestError(f"tool calls are generated under their own grammar; {taken[0]} / response_format "
                               "cannot be combined with tools unless tool_choice is 'none'", param=taken[0])
        sampling["ebnf"] = grammar
    ids = state.encode(text, add_special_tokens=False)
    logprobs = None
    if expect_bool("logprobs", body.get("logprobs") or False):
        logprobs = expect_int("top_logprobs", body.get("top_logprobs") or 0, 0, 20)
    elif body.get("top_logprobs") is not None:
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    max_tokens = _max_tokens(body, max_names, TO_CONTEXT, 1)
    name = next((n for n in max_names if body.get(n) is not None), max_names[-1])
    jobs, n = make_jobs(body, [ids], sampling, max_tokens, name, state, stream, logprobs, -1)
    usage, continuous = _stream_options(body, stream)
    return OpenAIRequest(True, jobs, n, stream, usage, logprobs, body["model"], tools=tools,
                         reasoning_parser=parser, prompt_text=text, continuous_usage=continuous, ignored=ignored)


def parse_chat(body: Any, state: Any) -> OpenAIRequest:
    """Check a ``/v1/chat/completions`` body and render its messages with the model's chat template."""
    stream, ignored = check_common(body, CHAT_FIELDS, CHAT_DEFAULT_ONLY, "/v1/chat/completions", state)
    messages = normalize_messages(body.get("messages"))
    tools = parse_chat_tools(body)
    return chat_request(body, state, messages, tools, stream, ignored, ("max_completion_tokens", "max_tokens"))
