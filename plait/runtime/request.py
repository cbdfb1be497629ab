"""Request: one generation's state as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from plait.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no table row (it may have been retracted)
    RUNNING = "running"  # holds a table row; prefilling or decoding
    FINISHED = "finished"


@dataclass
class Request:
    """A request's token ids, progress through the KV cache, sampling state and results.

    KV for ``all_ids[:computed_len]`` is in the pool, mapped by row ``row`` of the request-to-slot
    table. Of those, ``all_ids[:cache_locked_len]`` belong to the radix tree (locked via
    ``last_node``); the rest are the request's own slots. With a hybrid KV pool, the request's own
    tokens before ``sliding_from`` no longer have sliding slots (they fell behind the window).
    """

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs
    top_logprobs_num: int = 0
    on_output: Callable[[dict[str, Any]], None] | None = None  # called from the engine thread
    stream: bool = False
    # a stream whose text the caller makes from the streamed ids (the server's HTTP process): the engine
    # detokenizes it only where it needs the text itself (stop strings, token healing), else once at the end
    stream_ids_only: bool = False
    group_rid: str | None = None  # the caller's id when n > 1 expanded it into several requests
    return_text_in_logprobs: bool = False
    program_id: str | None = None  # the program run it belongs to (program-aware caching, kvcache/pins.py)
    # prefix-cache namespace: shares cached prefixes only within it. With a LoRA adapter it is the tuple
    # ("lora", adapter name, adapter load id, the caller's namespace): KV under an adapter is its own
    cache_namespace: str | tuple | None = None
    lora_name: str | None = None  # the LoRA adapter serving it (None: the base model)
    lora_slot: int = -1  # its adapter's device slot while running (LoraManager.acquire), else -1

    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    row: int | None = None
    computed_len: int = 0
    cache_locked_len: int = 0
    last_node: Any = None
    sliding_from: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    prompt_logprobs_done: bool = False
    retractions: int = 0
    # overlap scheduling: a token sampled on the device but not yet read back (0 or 1), and its row in
    # that step's sampled-token tensor (the next step reads its input token from there)
    inflight: int = 0
    inflight_row: int = -1
    finish_reason: dict[str, Any] | None = None
    detokenizer: Any = None  # IncrementalDetokenizer, or None without a tokenizer
    grammar: Any = None  # constrained decoding: a GrammarState (plait.runtime.constrained), or None
    # token healing (constrained/healing.py): prompt tokens removed from the end of the prompt and their
    # text, which the output starts with and the returned text leaves out
    healed_tokens: int = 0
    healed_text: str = ""
    # a relaxed JSON schema (constrained/relax.py, runtime/relaxed.py): what was relaxed, which attempt this
    # is (1 = the first), and once validated whether the document is valid against the original (and why not)
    relaxation: Any = None
    schema_attempts: int = 1
    schema_valid: bool | None = None
    schema_error: str | None = None
    text: str = ""
    sent_text_len: int = 0
    sent_ids_len: int = 0
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    created_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without concatenating the whole sequence (hot path: once per step)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending_len(self) -> int:
        """Tokens whose KV is not yet computed (1 while decoding), counting a sampled token still in flight."""
        return self.total_len + self.inflight - self.computed_len

    @property
    def will_finish_by_length(self) -> bool:
        """Its in-flight token is its last by max_new_tokens: scheduling it again would be wasted."""
        return self.inflight > 0 and len(self.output_ids) + self.inflight >= self.params.max_new_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.prompt_logprobs_done

    def prompt_logprob_positions(self, start: int, length: int) -> tuple[int, int]:
        """The prompt positions ``[lo, hi)`` whose logits score a prompt token (position p scores token
        p + 1) among the ``length`` positions computed from ``start``; ``lo >= hi`` when there are none."""
        if not self.wants_prompt_logprobs:
            return start, start
        lo = max(start, self.logprob_start_len - 1, 0)
        return lo, min(start + length, len(self.prompt_ids) - 1)

    def max_prefix_match(self) -> int:
        """How many leading tokens may come from the cache: at least one token must be computed to get
        logits, and prompt logprobs need the hidden states from ``logprob_start_len - 1`` on."""
        limit = self.total_len - 1
        if self.wants_prompt_logprobs:
            limit = min(limit, max(self.logprob_start_len - 1, 0))
        return max(limit, 0)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
