"""SGLang's native ``/generate`` request: every field of SGLang's ``GenerateReqInput``, sorted into what
plait honours, what it ignores because it changes nothing about the output, and what it refuses.

- Honoured (``NATIVE_FIELDS``): the prompt, sampling, logprob and streaming fields, ``rid`` (one id for
  a batch becomes ``rid_0, rid_1, ...`` as in SGLang), ``extra_key`` / ``cache_salt`` (a prefix-cache
  namespace), ``session_id`` (the session's cached prefix stays pinned, like a ``program_id`` run),
  ``return_prompt_token_ids``, ``lora_path`` (a loaded LoRA adapter's name, or one per prompt; an
  unknown name is a 400 naming the loaded ones), and plait's ``program_id``.
- Ignored (``NATIVE_IGNORED``): metrics, logging, priority, routing and disaggregation hints.
- Refused unless at their default (``NATIVE_REFUSED``), each with the reason: multimodal inputs (the
  served model reads text), ``lora_id`` (send ``lora_path``), custom logit processors (they execute client
  code), server-side sessions, hidden states and the other extra outputs plait does not compute.
- Unknown fields are ignored and reported (``X-Plait-Ignored-Fields``); ``--strict-fields`` refuses them.
docs/server.md has the same table for users.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.server.protocol import (
    MAX_TOP_LOGPROBS,
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
    sampling_params_from,
    short_repr,
    split_unknown,
)
from plait.token_ids import common_prefix_len

NATIVE_FIELDS = frozenset({
    "text", "input_ids", "sampling_params", "stream", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs", "rid", "program_id", "session_id", "extra_key", "cache_salt",
    "return_prompt_token_ids", "lora_path",
})
NATIVE_IGNORED = frozenset({
    "log_metrics", "no_logs", "custom_labels", "priority", "routed_dp_rank", "data_parallel_rank",
    "disagg_prefill_dp_rank", "routing_key", "conversation_id", "http_worker_ipc", "bootstrap_host",
    "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "external_trace_header",
    "received_time", "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls", "kv_hints",
})
_UNSET = (None, False, [], [None], {})
_TEXT_ONLY = "the served model reads text only"
_EXTRA_OUTPUT = "plait does not compute this output"
# name -> (accepted values, why anything else is refused)
NATIVE_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    **{name: (_UNSET, _TEXT_ONLY) for name in (
        "image_data", "video_data", "audio_data", "input_embeds", "mm_hashes", "mm_content_hashes",
        "use_audio_in_video", "video_config", "max_dynamic_patch", "min_dynamic_patch",
        "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config", "mm_processor_kwargs",
        "positional_embed_overrides")},
    "modalities": ((*_UNSET, ["text"]), _TEXT_ONLY),
    "lora_id": (_UNSET, "adapters are named by lora_path (the name they were loaded under)"),
    "custom_logit_processor": (_UNSET, "custom logit processors execute client code; plait does not run them"),
    "session_params": (_UNSET, "server-side sessions are not supported; send the whole prompt (session_id or "
                               "program_id keeps its cached prefix)"),
    "token_ids_logprob": (_UNSET, "logprobs of chosen token ids are not supported; use top_logprobs_num"),
    "watermark": (_UNSET, "watermarking is not supported"),
    "background": (_UNSET, "background requests are not supported"),
    "require_reasoning": (_UNSET, "reasoning controls are not supported"),
    "max_thinking_tokens": (_UNSET, "reasoning budgets are not supported"),
    "stream_output": (_UNSET, "use stream"),
    "return_bytes": (_UNSET, _EXTRA_OUTPUT),
    "routed_experts_start_len": ((*_UNSET, 0), _EXTRA_OUTPUT),
    **{name: (_UNSET, _EXTRA_OUTPUT) for name in (
        "return_hidden_states", "return_routed_experts", "return_indexer_topk", "return_entropy",
        "return_sampling_mask", "sampling_logprobs_mode", "return_flat_raw_top_logprobs",
        "return_flat_raw_output_top_logprobs", "return_flat_raw_top_logprobs_b64", "multi_item_delimiter_indices",
        "token_indices_to_pool")},
}
KNOWN_FIELDS = NATIVE_FIELDS | NATIVE_IGNORED | set(NATIVE_REFUSED)
MAX_KEY_CHARS = 256  # rid, session_id, extra_key, cache_salt


@dataclass
class NativeRequest:
    """A checked ``/generate`` body: the engine jobs, whether it answers a list, and ignored fields."""

    jobs: list[GenerateJob]
    is_batch: bool
    stream: bool
    ignored: list[str] = field(default_factory=list)


def _refuse_non_default(body: dict[str, Any]) -> None:
    for name, (accepted, reason) in NATIVE_REFUSED.items():
        if name in body and body[name] not in accepted:
            raise RequestError(f"field {name!r} of /generate is refused: {reason} (got {short_repr(body[name])})",
                               param=name)


def _key(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_CHARS:
        raise RequestError(f"field {name!r} must be a non-empty string of at most {MAX_KEY_CHARS} characters, "
                           f"got {short_repr(value)}", param=name)
    return value


def _per_input(body: dict[str, Any], name: str, count: int, default: Any, check: Callable[[str, Any], Any]) -> list:
    value = body.get(name)
    if value is None:
        return [default] * count
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"field {name!r} has {len(value)} entries for {count} prompt(s)", param=name)
        return [default if v is None else check(name, v) for v in value]
    return [check(name, value)] * count


def _rids(body: dict[str, Any], count: int, is_batch: bool) -> list[str]:
    rid = body.get("rid")
    if isinstance(rid, str) and is_batch:
        return [f"{_key('rid', rid)}_{i}" for i in range(count)]  # SGLang's expansion of one id for a batch
    rids = _per_input(body, "rid", count, None, _key)
    given = [r for r in rids if r is not None]
    if len(set(given)) < len(given):
        raise RequestError("field 'rid' has the same id twice in one batch", param="rid")
    return [r or uuid.uuid4().hex for r in rids]


def _namespaces(body: dict[str, Any], count: int) -> list[str | None]:
    """The prefix-cache namespace of each prompt, from ``extra_key`` and ``cache_salt`` (empty = none)."""
    def check(name: str, value: Any) -> str | None:
        return None if value == "" else _key(name, value)

    parts = [_per_input(body, name, count, None, check) for name in ("extra_key", "cache_salt")]
    return ["\x1f".join(k for k in keys if k is not None) or None for keys in zip(*parts)]


def _prompt_ids(body: dict[str, Any], encode: Callable[[str], list[int]] | None) -> tuple[list[list[int]], bool]:
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise RequestError("send exactly one of 'text' or 'input_ids'", param="text")
    if input_ids is not None:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if is_ids(input_ids) and (not input_ids or not isinstance(input_ids[0], list)):
            return [input_ids], False
        if isinstance(input_ids, list) and input_ids and all(is_ids(x) for x in input_ids):
            return input_ids, True
        raise RequestError("field 'input_ids' must be a list of token ids or a non-empty list of such lists",
                           param="input_ids")
    if encode is None:
        raise RequestError("this model has no tokenizer: send 'input_ids' instead of 'text'", param="text")
    if isinstance(text, str):
        return [encode(text)], False
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        return [encode(t) for t in text], True
    raise RequestError("field 'text' must be a string or a non-empty list of strings", param="text")


def _program_id(body: dict[str, Any], program_ids: bool) -> str | None:
    program_id, session_id = body.get("program_id"), body.get("session_id")
    if program_id is not None:
        if not program_ids:
            raise RequestError("field 'program_id' is not supported by this server's engine", param="program_id")
        _key("program_id", program_id)
    if session_id is not None:
        _key("session_id", session_id)
        if program_id is not None and program_id != session_id:
            raise RequestError("give session_id or program_id (they name the same cache retention), not two "
                               "different ones", param="session_id")
    return program_id if program_id is not None else session_id if program_ids else None


def parse_generate(body: Any, encode: Callable[[str], list[int]] | None, limits: Any, program_ids: bool,
                   strict: bool = False, config: Any = None) -> NativeRequest:
    """Check a ``/generate`` body. ``limits``: an ``EngineInfo``; ``strict``: refuse unknown fields;
    ``config``: the ``ServerConfig`` whose request limits apply (None: their defaults)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    ignored = split_unknown(body, KNOWN_FIELDS, "/generate", strict)
    _refuse_non_default(body)
    stream = expect_bool("stream", body.get("stream") or False)
    program_id = _program_id(body, program_ids)
    prompts, is_batch = _prompt_ids(body, encode)
    count = len(prompts)
    raw_params = body.get("sampling_params")
    if isinstance(raw_params, list):
        if len(raw_params) != count:
            raise RequestError(f"field 'sampling_params' has {len(raw_params)} entries for {count} prompt(s)",
                               param="sampling_params")
    else:
        raw_params = [raw_params] * count
    return_logprob = _per_input(body, "return_logprob", count, False, expect_bool)
    start_len = _per_input(body, "logprob_start_len", count, -1, lambda n, v: expect_int(n, v, -1))
    top_num = _per_input(body, "top_logprobs_num", count, 0, lambda n, v: expect_int(n, v, 0, MAX_TOP_LOGPROBS))
    with_text = _per_input(body, "return_text_in_logprobs", count, False, expect_bool)
    prompt_ids_out = expect_bool("return_prompt_token_ids", body.get("return_prompt_token_ids") or False)
    rids = _rids(body, count, is_batch)
    namespaces = _namespaces(body, count)
    loras = _per_input(body, "lora_path", count, None, _key)
    parsed: dict[int, Any] = {}  # one sampling object shared by every prompt is checked once
    jobs = []
    for i, ids in enumerate(prompts):
        check_prompt(ids, limits.max_prompt_tokens, limits.vocab_size)
        raw = raw_params[i]
        if id(raw) not in parsed:
            extra: list[str] = []
            parsed[id(raw)] = sampling_params_from(raw, ignored=extra, strict=strict)
            check_json_schema(parsed[id(raw)])
            ignored.extend(name for name in extra if name not in ignored)
        params = parsed[id(raw)]
        given = raw.get("max_new_tokens", UNSET) if isinstance(raw, dict) else UNSET
        params = fit_max_tokens(params, TO_CONTEXT if given is None else given, len(ids), limits.context_length,
                                kv_slots=getattr(limits, "kv_slots_total", None))
        start = start_len[i]
        if return_logprob[i] and start == -1:
            start = len(ids) - 1  # SGLang's default: only the last prompt token's logprob
        if start >= len(ids):
            raise RequestError(f"logprob_start_len {start} must be < the prompt length {len(ids)}",
                               param="logprob_start_len")
        jobs.append(GenerateJob(
            rid=rids[i], input_ids=ids, sampling_params=params.to_dict(), n=params.n,
            return_logprob=return_logprob[i], logprob_start_len=start if return_logprob[i] else -1,
            top_logprobs_num=top_num[i], return_text_in_logprobs=with_text[i], stream=stream,
            program_id=program_id, cache_namespace=namespaces[i], return_prompt_token_ids=prompt_ids_out,
            lora_path=loras[i],
        ))
        check_job_limits(jobs[-1], config)
    return NativeRequest(jobs, is_batch or len(jobs) > 1 or jobs[0].n > 1, stream, ignored)


def align_shared_input_logprobs(outputs: list[tuple[list[int], dict[str, Any]]]) -> None:
    """Give a batch's identical prompt positions one input logprob (in place): the first output's.

    ``outputs``: (prompt ids, ``meta_info``) of each output of one non-streamed batch. The entry of prompt
    token ``i`` is ``log p(t_i | t_<i)``, so two prompts that agree on tokens ``0..i`` have the same value
    in exact arithmetic; computed in rows of different lengths in one batch it can differ in the last
    bits (CPU GEMM and attention kernels pick their blocking by shape). SGLang's frontend compares such
    entries for equality (``greedy_token_selection`` over ``[s + choice for choice in choices]``), so a
    difference of 1e-6 on the shared prompt would decide the choice. Entries past the shared prefix are
    left as computed. ``input_top_logprobs`` positions are aligned the same way.
    """
    with_logprobs = [(ids, meta) for ids, meta in outputs if meta.get("input_token_logprobs")]
    if len(with_logprobs) < 2:
        return
    ref_ids, ref_meta = with_logprobs[0]
    ref_entries = ref_meta["input_token_logprobs"]
    ref_start = len(ref_ids) - len(ref_entries)
    ref_top = ref_meta.get("input_top_logprobs")
    for ids, meta in with_logprobs[1:]:
        entries = meta["input_token_logprobs"]
        start = len(ids) - len(entries)
        shared = common_prefix_len(ids, ref_ids)
        first = max(start, ref_start)
        if first >= shared:
            continue
        entries = meta["input_token_logprobs"] = list(entries)
        top = meta.get("input_top_logprobs")
        aligned_top = (top is not None and ref_top is not None
                       and len(top) == len(entries) and len(ref_top) == len(ref_entries))
        if aligned_top:
            top = meta["input_top_logprobs"] = list(top)
        for position in range(first, shared):
            mine, theirs = position - start, position - ref_start
            entry, ref_entry = entries[mine], ref_entries[theirs]
            entries[mine] = type(entry)((ref_entry[0], *entry[1:]))
            if aligned_top:
                top[mine] = ref_top[theirs]
