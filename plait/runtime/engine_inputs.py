"""Validating and normalizing ``Engine.generate`` arguments into Requests (errors are ValueError/TypeError)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plait.runtime.request import Request
from plait.sampling import SamplingParams

if TYPE_CHECKING:
    from plait.runtime.engine import Engine


class RequestTooLargeError(ValueError):
    """A request this engine can never serve, whatever else runs: its prompt does not fit the context
    length or the KV cache, or its prompt plus ``max_new_tokens`` can never fit the KV cache at once.

    Raised by ``Engine.generate`` / ``submit`` before anything is queued (servers answer 400).
    ``prompt_tokens`` and ``max_new_tokens`` are the request's; ``limit`` is the most tokens whose KV one
    request may hold (the KV cache's size, or the context length minus one).
    """

    def __init__(self, message: str, *, prompt_tokens: int, max_new_tokens: int, limit: int) -> None:
        super().__init__(message)
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit


def check_fits(prompt_tokens: int, max_new_tokens: int, context_length: int, kv_capacity: int) -> None:
    """Raise ``RequestTooLargeError`` unless a request with this prompt and ``max_new_tokens`` can run
    to its end alone in a KV cache of ``kv_capacity`` slots.

    Generation stops at the context length (finish reason ``length``), so only the tokens up to it need
    KV; the last generated token is never fed back, so it needs none.
    """
    fit = min(context_length, kv_capacity)
    if prompt_tokens >= fit:
        raise RequestTooLargeError(
            f"the prompt has {prompt_tokens} tokens; this engine fits at most {fit - 1} "
            f"(context length {context_length}, KV cache {kv_capacity} tokens)",
            prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, limit=fit - 1)
    need = min(prompt_tokens + max(max_new_tokens, 1), context_length) - 1  # KV slots at the last step
    if need > kv_capacity:
        raise RequestTooLargeError(
            f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) needs {need} tokens "
            f"of KV cache, but the whole KV cache holds {kv_capacity}: lower max_new_tokens to at most "
            f"{kv_capacity + 1 - prompt_tokens}",
            prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, limit=kv_capacity)


@dataclass
class GenerateInput:
    requests: list[Request]
    is_batch: bool


_PLAIN_INT = frozenset((int,))


def _is_int_list(x: Any) -> bool:
    """A list or tuple of ints (bools are not token ids)."""
    if not isinstance(x, (list, tuple)):
        return False
    if set(map(type, x)) <= _PLAIN_INT:  # the usual case, without a Python-level loop
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompts_to_ids(engine: "Engine", prompt: Any, input_ids: Any) -> tuple[list[list[int]], bool]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt (text) or input_ids (token ids)")
    if input_ids is not None:
        if _is_int_list(input_ids):
            return [list(input_ids)], False
        if isinstance(input_ids, (list, tuple)) and input_ids and all(_is_int_list(x) for x in input_ids):
            return [list(x) for x in input_ids], True
        raise TypeError("input_ids must be a list of ints or a non-empty list of lists of ints")
    if engine.tokenizer is None:
        raise ValueError(
            f"model {engine.config.model!r} has no tokenizer: pass input_ids, or set tokenizer_path"
        )
    if isinstance(prompt, str):
        return [engine.tokenizer.encode(prompt)], False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return [engine.tokenizer.encode(p) for p in prompt], True
    raise TypeError("prompt must be a str or a non-empty list of str")


def _per_prompt(value: Any, count: int, name: str, scalar_types: tuple) -> list:
    if value is None or isinstance(value, scalar_types):
        return [value] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    raise TypeError(f"{name} has unsupported type {type(value).__name__}")


def _lora_names(engine: "Engine", lora_path: Any, count: int) -> list[str | None]:
    """The adapter of each prompt (None: the base model); unknown names raise ``UnknownLoraError``."""
    names = _per_prompt(lora_path, count, "lora_path", (str,))
    if any(name is not None for name in names):
        lora = engine.runner.lora
        for name in names:
            if name is not None and not isinstance(name, str):
                raise TypeError(f"lora_path entries must be adapter names (str) or None, got {type(name).__name__}")
            if name is not None and lora is None:
                from plait.runtime.lora import UnknownLoraError

                raise UnknownLoraError(f"unknown LoRA adapter {name!r}: this engine serves no adapters "
                                       "(start it with lora_paths=... or enable_lora=True)")
            if name is not None:
                lora.get(name)
    return names


def normalize_inputs(
    engine: "Engine",
    prompt: Any,
    sampling_params: Any,
    input_ids: Any,
    return_logprob: bool,
    logprob_start_len: int,
    top_logprobs_num: int,
    rid: Any,
    plan_search: bool = True,
    lora_path: Any = None,
) -> GenerateInput:
    """Build one Request per (prompt, n) after checking every argument against the engine's limits.
    ``plan_search``: a constrained request's start plan may be searched here (``new_state``); False on a
    thread that must not block, which then plans only from cached endings."""
    id_lists, is_batch = _prompts_to_ids(engine, prompt, input_ids)
    params_list = [
        SamplingParams.from_dict(p) for p in _per_prompt(sampling_params, len(id_lists), "sampling_params", (dict, SamplingParams))
    ]
    rids = _per_prompt(rid, len(id_lists), "rid", (str,))
    loras = _lora_names(engine, lora_path, len(id_lists))
    if not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
        raise ValueError(f"top_logprobs_num must be a non-negative int, got {top_logprobs_num!r}")
    if not isinstance(logprob_start_len, int) or logprob_start_len < -1:
        raise ValueError(f"logprob_start_len must be -1 (no prompt logprobs) or >= 0, got {logprob_start_len!r}")
    vocab = engine.model_config.vocab_size
    max_n = engine.config.max_samples_per_prompt
    requests: list[Request] = []
    for ids, params, rid_i, lora_i in zip(id_lists, params_list, rids, loras):
        if not ids:
            raise ValueError("the prompt is empty (it encodes to no tokens)")
        bad = [] if min(ids) >= 0 and max(ids) < vocab else [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids contain token id(s) outside the vocabulary [0, {vocab}): {bad[:5]}")
        check_fits(len(ids), params.max_new_tokens, engine.context_length, engine.runner.pool.capacity)
        if params.n > max_n:
            raise ValueError(f"sampling parameter 'n' is {params.n}; this engine allows at most {max_n} "
                             "parallel samples per prompt (engine setting max_samples_per_prompt)")
        if logprob_start_len >= len(ids):
            raise ValueError(f"logprob_start_len {logprob_start_len} must be < the prompt length {len(ids)}")
        # Compiled here, on the caller's thread (cached; the engine loop never waits for a grammar):
        # a constraint that cannot be served is a ConstraintError (ValueError) before anything is queued.
        grammar = engine.constrained.grammar_for(params)
        # token healing (constrained requests): back off the prompt's last token if the output may span it
        healing = engine.token_healing.heal(ids, grammar, max_new_tokens=params.max_new_tokens,
                                            prompt_logprobs=return_logprob and logprob_start_len >= 0)
        bad_stop = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids outside the vocabulary: {bad_stop[:5]}")
        bad_bias = [t for t, _ in params.logit_bias or () if t >= vocab]
        if bad_bias:
            raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab}): {bad_bias[:5]}")
        base = rid_i if rid_i is not None else uuid.uuid4().hex
        eos = frozenset() if params.ignore_eos else engine.eos_token_ids
        for k in range(params.n):
            # n seeded samples must differ from each other, yet stay reproducible
            copy_params = params if params.n == 1 or params.seed is None else params.replace(seed=params.seed + k)
            requests.append(
                Request(
                    rid=base if params.n == 1 else f"{base}_{k}",  # SGLang's naming of parallel samples
                    group_rid=None if params.n == 1 else base,
                    prompt_ids=list(healing.prompt_ids),
                    params=copy_params,
                    eos_token_ids=eos,
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len if return_logprob else -1,
                    top_logprobs_num=top_logprobs_num if return_logprob else 0,
                    grammar=None if grammar is None else engine.constrained.new_state(
                        healing.grammar, eos | frozenset(params.stop_token_ids), params.max_new_tokens,
                        plan_search),
                    healed_tokens=healing.tokens,
                    healed_text=healing.text,
                    relaxation=getattr(grammar, "relaxation", None),
                    lora_name=lora_i,
                )
            )
    return GenerateInput(requests=requests, is_batch=is_batch or len(requests) > 1)
