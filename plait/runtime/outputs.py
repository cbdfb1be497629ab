"""Turning a Request into the result dicts the engine returns (the shape SGLang's Engine returns)."""

from __future__ import annotations

import time
from typing import Any

from plait.runtime.request import Request


def _with_text(entries, tokenizer, with_text: bool) -> list:
    """(logprob, token_id) pairs -> [logprob, token_id, text-or-None] entries."""
    return [
        (lp, tid, tokenizer.decode([tid], skip_special_tokens=False) if with_text and tokenizer else None)
        for lp, tid in entries
    ]


def _top_with_text(entries, tokenizer, with_text: bool) -> list:
    return [None if top is None else _with_text([(lp, tid) for tid, lp in top], tokenizer, with_text) for top in entries]


def build_output(req: Request, tokenizer) -> dict[str, Any]:
    """Cumulative snapshot of a request: text so far, output ids and meta_info.

    Logprob entries carry token text when ``req.return_text_in_logprobs`` (streamed snapshots too).
    """
    with_text = req.return_text_in_logprobs
    meta: dict[str, Any] = {
        "id": req.rid,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "finish_reason": req.finish_reason,
        "retractions": req.retractions,
    }
    if req.grammar is not None:
        # constrained decoding: whether the output is (not yet) a complete match -- True after a cut by
        # max_new_tokens ("length") -- and how many tokens jump-forward appended without sampling
        meta["incomplete"] = not req.grammar.complete
        meta["forced_tokens"] = req.grammar.forced_count
        # tokens appended without sampling so that the output ends valid within max_new_tokens
        meta["budget_closed"] = req.grammar.budget_closed
        meta["healed_tokens"] = req.healed_tokens  # prompt tokens backed off by token healing
    if req.relaxation is not None:
        # generated under a relaxed JSON schema (runtime/relaxed.py): validated against the original
        meta["schema_relaxed"] = list(req.relaxation.keywords)
        meta["schema_attempts"] = req.schema_attempts
        meta["schema_valid"] = req.schema_valid
        if req.schema_error is not None:
            meta["schema_error"] = req.schema_error
    if req.first_token_at is not None:
        meta["ttft"] = req.first_token_at - req.created_at
    end = req.finished_at if req.finished_at is not None else time.perf_counter()
    meta["e2e_latency"] = end - req.created_at
    if req.return_logprob:
        meta["input_token_logprobs"] = _with_text(req.input_token_logprobs, tokenizer, with_text)
        meta["output_token_logprobs"] = _with_text(req.output_token_logprobs, tokenizer, with_text)
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = _top_with_text(req.input_top_logprobs, tokenizer, with_text)
            meta["output_top_logprobs"] = _top_with_text(req.output_top_logprobs, tokenizer, with_text)
    return {"text": req.text, "output_ids": list(req.output_ids), "meta_info": meta}
