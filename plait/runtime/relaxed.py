"""Requests under a relaxed JSON schema: validate the finished document, resample until it validates.

A JSON schema that no backend compiles exactly is compiled relaxed (``constrained/relax.py``): the grammar
accepts a superset of the schema's documents. When such a request finishes, its document (the output
text) is validated against the original schema with ``jsonschema`` on a
validation thread (never on the engine loop). If it does not validate and attempts remain (engine setting
``grammar_relaxed_max_attempts``, default 3, counting the first), the request is generated again from its
prompt (the prefix cache holds the prompt's KV, so a retry recomputes only what was generated), sampled at
``temperature`` at least ``RETRY_MIN_TEMPERATURE`` and, with a ``seed``, ``seed + RETRY_SEED_STRIDE *
(attempt - 1)`` (a retry at temperature 0 would repeat the same document; the stride keeps clear of the
``seed + k`` of an ``n > 1`` request's samples). The final output reports ``meta_info["schema_relaxed"]``
(the keywords relaxed), ``["schema_attempts"]`` and ``["schema_valid"]`` (with ``["schema_error"]`` when
False): a document that fails its schema is never returned as valid.

Streaming: a relaxed request's text cannot be taken back once streamed, so a streamed relaxed request
sends one event, the final one, after validation.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from plait.runtime.request import Request

if TYPE_CHECKING:
    from plait.runtime.engine import Engine

__all__ = ["RETRY_MIN_TEMPERATURE", "RETRY_SEED_STRIDE", "RelaxedValidation", "retry_of"]

logger = logging.getLogger(__name__)

RETRY_MIN_TEMPERATURE = 0.7
RETRY_SEED_STRIDE = 1_000_003


class RelaxedValidation:
    """Holds finished relaxed requests while they are validated, and resamples invalid ones.

    The engine calls ``hold(req)`` on its thread when a request with ``req.relaxation`` finishes;
    validation runs on one worker thread, which then calls the engine's ``_emit_final`` (deliver) or
    ``_requeue`` (generate again). ``abort(rid)`` stops a held request from being resampled.
    """

    def __init__(self, engine: "Engine", max_attempts: int):
        self._engine = engine
        self.max_attempts = max_attempts
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-validate")
        self._lock = threading.Lock()
        self._held: dict[str, Request] = {}
        self._aborted: set[str] = set()

    def hold(self, req: Request) -> None:
        """Validate ``req`` (finished, text decoded) off the engine thread; deliver or resample it then."""
        if (req.finish_reason or {}).get("type") == "abort":  # aborted or failed: partial, never resampled
            req.schema_valid, req.schema_error = False, "the request was aborted before its document was complete"
            self._engine._emit_final(req)
            return
        with self._lock:
            self._held[req.rid] = req
        try:
            self._pool.submit(self._check, req)
        except RuntimeError:  # shut down: validate here rather than lose the request
            self._check(req)

    def abort(self, rid: str) -> None:
        """An abort for ``rid`` (a request id or an n > 1 group's id) while its document is validated."""
        with self._lock:
            for req in self._held.values():
                if rid in (req.rid, req.group_rid):
                    self._aborted.add(req.rid)

    def shutdown(self) -> None:
        """Finish the validations in progress (their requests are delivered, not resampled)."""
        self._pool.shutdown(wait=True)

    def _check(self, req: Request) -> None:
        error = req.relaxation.validator.error(req.text)  # the document (a healed prefix is prompt text)
        with self._lock:
            self._held.pop(req.rid, None)
            aborted = req.rid in self._aborted
            self._aborted.discard(req.rid)
        req.schema_valid, req.schema_error = error is None, error
        if error is not None and not aborted and req.schema_attempts < self.max_attempts:
            logger.debug("request %s: attempt %d does not validate (%s); sampling again",
                         req.rid, req.schema_attempts, error)
            try:
                if self._engine._requeue(retry_of(self._engine, req)):
                    return
            except Exception:  # noqa: BLE001 -- the request must still get its final event
                logger.exception("request %s: could not queue the next attempt; returning this one", req.rid)
        self._engine._emit_final(req)


def retry_of(engine: "Engine", req: Request) -> Request:
    """A fresh request for the next attempt of ``req``: same id, prompt, options and grammar; sampled at
    temperature >= ``RETRY_MIN_TEMPERATURE`` and, with a seed, ``RETRY_SEED_STRIDE`` further."""
    params = req.params
    attempt = req.schema_attempts + 1
    params = params.replace(temperature=max(params.temperature, RETRY_MIN_TEMPERATURE),
                            seed=None if params.seed is None else params.seed + RETRY_SEED_STRIDE)
    grammar = req.grammar
    retry = Request(
        rid=req.rid, group_rid=req.group_rid, prompt_ids=list(req.prompt_ids), params=params,
        eos_token_ids=req.eos_token_ids, return_logprob=req.return_logprob,
        logprob_start_len=req.logprob_start_len, top_logprobs_num=req.top_logprobs_num,
        on_output=req.on_output, stream=False, return_text_in_logprobs=req.return_text_in_logprobs,
        program_id=req.program_id, cache_namespace=req.cache_namespace, lora_name=req.lora_name,
        grammar=engine.constrained.new_state(grammar.grammar, req.eos_token_ids | frozenset(params.stop_token_ids),
                                             params.max_new_tokens),
        healed_tokens=req.healed_tokens, healed_text=req.healed_text,
        relaxation=req.relaxation, schema_attempts=attempt,
    )
    retry.created_at = req.created_at  # e2e_latency covers every attempt
    engine._attach_detokenizer(retry)
    return retry
