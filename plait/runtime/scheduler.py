"""Scheduler: continuous batching with chunked prefill, prefix-aware admission and retraction.

Every step mixes one decode token for each running request with prefill chunks of new (or resumed)
requests, under a per-step token budget; chunks that score prompt positions (prompt logprobs) also
share a per-step budget of scored positions, so that such work cannot stall the others' decode steps.
The scheduler decides; it never touches weights or runs kernels. It owns the bookkeeping between
requests, the request-to-slot table, the KV pool and the radix tree (which slots belong to whom, and
who locks which cached prefix).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from plait.runtime.config import EngineConfig
from plait.runtime.kvcache.pins import ProgramPins
from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.radix import RadixCache
from plait.runtime.kvcache.table import ReqToSlotTable
from plait.runtime.request import Request, RequestStatus

logger = logging.getLogger(__name__)

LPM_MAX_QUEUE = 128  # above this many waiting requests, LPM ordering costs more than it saves: use FCFS

# Admission reserves KV for the tokens running requests will still generate (SGLang's new-token ratio):
# each running request's remaining ``max_new_tokens`` (clipped) times a ratio that starts at INIT, decays
# over DECAY_STEPS decode steps without a retraction (most requests stop well before their limit), and
# goes back up after a retraction to what the retracted batch really decoded. The decay stops at MIN, or
# at the share of their budgets that finished requests really used (a running average) where that is
# higher: a workload whose requests run to ``max_new_tokens`` keeps reserving their whole outputs. Without
# it, a large ``max_running_requests`` admits prompts while their outputs still fit, then retracts and
# recomputes them once the outputs grow. All times ``EngineConfig.schedule_conservativeness`` (0: reserve
# nothing).
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY_STEPS = 600
CLIP_MAX_NEW_TOKENS = 4096  # a request's expected output is counted up to this many tokens
RETRACT_DECODE_STEPS = 20  # after a retraction: assume each running request decodes this many more tokens
USED_SHARE_WEIGHT = 0.05  # weight of one finished request in the running average of the budget share used
# Hybrid KV pools (sliding-window layers in sliding slots): a running request frees the sliding slots of
# its own tokens that fell behind its window once this many have (one free for many steps), and eviction
# for sliding slots frees at least this many at once (it scans the tree)
SLIDING_FREE_BATCH = 64
SLIDING_EVICT_MIN = 4096
# Tokens appended without sampling (constrained decoding's jump-forward and budget endings) are computed
# one a step inside the decode batch, like a decode token whose input is known, when at least
# ``Scheduler.forced_in_decode_min_batch`` requests decode in the step and the request has at most this
# many such tokens pending; longer runs are computed in one extend chunk
FORCED_IN_DECODE_MAX_TOKENS = 16


@dataclass
class ScheduledItem:
    """``length`` tokens of ``req`` (from position ``start``) computed this step, written to ``slots``."""

    req: Request
    start: int
    length: int
    slots: torch.Tensor

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens, so its last logits pick a new token."""
        return self.start + self.length == self.req.total_len + self.req.inflight


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        pool: KVPool,
        table: ReqToSlotTable,
        tree: RadixCache,
        pins: ProgramPins | None = None,
        forced_in_decode_min_batch: int | None = None,
        lora: object | None = None,
    ):
        """``forced_in_decode_min_batch``: from how many decoding requests on a request's forced tokens
        (jump-forward) are computed one a step inside the decode batch instead of in one extend chunk,
        which would make the step a mixed one (no CUDA graph); None: always in one extend. ``lora``: the
        adapter manager (``LoraManager``; None: no LoRA): a request with an adapter is admitted only once
        its adapter has a device slot, which it holds while running."""
        self.config = config
        self.lora = lora
        self.forced_in_decode_min_batch = forced_in_decode_min_batch
        self.pool = pool
        self.table = table
        self.tree = tree
        # program-aware caching: finished requests of an open program keep their path locked
        self.pins = pins if pins is not None else ProgramPins(tree, max_tokens_per_program=0)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_retractions = 0
        self.peak_running = 0  # the most requests running at once (reset by whoever measures a stretch)
        self._failed: list[Request] = []
        self._logprob_budget = config.prompt_logprob_chunk_size  # prompt positions left to score this step
        self._conservativeness = config.schedule_conservativeness
        self.new_token_ratio = self._init_ratio = min(INIT_NEW_TOKEN_RATIO * self._conservativeness, 1.0)
        self._min_ratio = min(MIN_NEW_TOKEN_RATIO * self._conservativeness, self._init_ratio)
        self._ratio_decay = (self._init_ratio - self._min_ratio) / NEW_TOKEN_RATIO_DECAY_STEPS
        self.used_budget_share: float | None = None  # running average over finished requests
        self.window = pool.sliding_window if pool.hybrid else 0  # hybrid pools: the sliding layers' window

    # ------------------------------------------------------------------ queue management
    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, rid: str) -> Request | None:
        for req in self.running + self.waiting:
            if req.rid == rid:
                return req
        return None

    def find_all(self, rid: str) -> list[Request]:
        """The request with this id, or every request of the ``n > 1`` group with this base id."""
        return [r for r in self.running + self.waiting if r.rid == rid or r.group_rid == rid]

    def remove(self, req: Request) -> None:
        """Take a request out of the queues, releasing its KV (its computed prefix stays cached)."""
        if req.status is RequestStatus.RUNNING:
            self._release(req, pin_for_program=True)
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> list[ScheduledItem]:
        """Pick this step's work: decode tokens of running requests (one allocation for all of them),
        then prefill chunks of partially prefilled requests, then admit waiting ones while the token
        budget lasts. The new tokens' slots are written into the request-to-slot table by the step
        builder, in one vectorized write."""
        budget = self.config.chunked_prefill_size
        self._logprob_budget = self.config.prompt_logprob_chunk_size
        items, riding = self._schedule_decodes()
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or req.pending_len <= 1 or budget <= 0 or id(req) in riding:
                continue
            n = self._limit_prompt_logprobs(req, req.computed_len, min(req.pending_len, budget))
            if n <= 0:
                continue
            slots = self._alloc_for_running(req, n)
            if slots is None:
                continue  # req itself was retracted or failed
            items.append(self._scheduled_chunk(req, req.computed_len, n, slots))
            budget -= n
        if budget > 0 and self.waiting:
            items.extend(self._admit(budget))
        return items

    def _limit_prompt_logprobs(self, req: Request, start: int, n: int) -> int:
        """Shorten a chunk of ``n`` tokens from ``start`` so that the prompt positions it scores (prompt
        logprobs) fit what is left of this step's ``prompt_logprob_chunk_size``. May return 0."""
        lo, hi = req.prompt_logprob_positions(start, n)
        if hi - lo <= self._logprob_budget:
            return n
        return lo + self._logprob_budget - start

    def _scheduled_chunk(self, req: Request, start: int, n: int, slots: torch.Tensor) -> ScheduledItem:
        """The item for a prefill chunk; charges the prompt positions it scores to this step's budget."""
        lo, hi = req.prompt_logprob_positions(start, n)
        self._logprob_budget -= max(hi - lo, 0)
        return ScheduledItem(req, start, n, slots)

    def _schedule_decodes(self) -> tuple[list[ScheduledItem], set[int]]:
        """One token for every decoding request; retracts the newest requests while memory is short.
        Also the ids of the requests among them whose token is one of a few forced ones (jump-forward, an
        ending: ``forced_in_decode_min_batch``); the rest of their pending tokens follow in the next steps."""
        if not self.running:
            self.new_token_ratio = self._init_ratio
        retracted = False
        while True:
            decoding, forced = [], []
            for r in self.running:
                if r.pending_len == 1:
                    if not r.will_finish_by_length:
                        decoding.append(r)
                elif self.forced_in_decode_min_batch is not None and self._has_forced_pending(r):
                    forced.append(r)
            if forced and len(decoding) + len(forced) < self.forced_in_decode_min_batch:
                forced = []  # too small a batch for it to pay: their pending tokens go in extend chunks
            decoding = forced + decoding
            if not decoding:
                return [], set()
            slots = self._alloc(len(decoding))
            if slots is not None:
                if retracted:
                    self._raise_ratio_after_retraction()
                else:
                    self.new_token_ratio = max(self.new_token_ratio - self._ratio_decay, self._ratio_floor())
                items = [ScheduledItem(r, r.computed_len, 1, slots[i : i + 1]) for i, r in enumerate(decoding)]
                return items, {id(r) for r in forced}
            self._retract_newest()
            retracted = True

    @staticmethod
    def _has_forced_pending(req: Request) -> bool:
        """Whether ``req``'s pending tokens are at most ``FORCED_IN_DECODE_MAX_TOKENS`` known outputs."""
        return (req.inflight == 0 and 1 < req.pending_len <= FORCED_IN_DECODE_MAX_TOKENS
                and req.computed_len >= len(req.prompt_ids) and req.status is RequestStatus.RUNNING)

    def _raise_ratio_after_retraction(self) -> None:
        """After a retraction: expect the running requests to use as much of their budgets as they have so
        far plus ``RETRACT_DECODE_STEPS`` tokens each (SGLang's estimate), never less than now."""
        if self._conservativeness == 0:
            return
        decoded = sum(len(r.output_ids) for r in self.running)
        budgets = sum(r.params.max_new_tokens for r in self.running)
        if budgets > 0:
            estimate = (decoded + RETRACT_DECODE_STEPS * len(self.running)) / budgets
            self.new_token_ratio = max(self.new_token_ratio, min(estimate, 1.0))

    def _ratio_floor(self) -> float:
        """Where the ratio's decay stops: MIN, or the budget share finished requests used where higher."""
        if self.used_budget_share is None:
            return self._min_ratio
        return max(self._min_ratio, min(self.used_budget_share * self._conservativeness, 1.0))

    def _record_budget_use(self, req: Request) -> None:
        """Fold a finished request's share of its (clipped) ``max_new_tokens`` into the running average."""
        budget = min(req.params.max_new_tokens, CLIP_MAX_NEW_TOKENS)
        if budget <= 0:
            return
        share = min(len(req.output_ids), budget) / budget
        if self.used_budget_share is None:
            self.used_budget_share = share
        else:
            self.used_budget_share += USED_SHARE_WEIGHT * (share - self.used_budget_share)

    def _future_tokens(self, req: Request, computed: int) -> float:
        """KV slots ``req`` is expected to need beyond its first ``computed`` tokens: the rest of its
        prompt (or of a retracted request's tokens so far) and its remaining output, clipped and scaled
        by the new-token ratio."""
        rest = max(req.total_len - computed, 0)
        remaining = max(req.params.max_new_tokens - len(req.output_ids), 0)
        return rest + min(remaining, CLIP_MAX_NEW_TOKENS) * self.new_token_ratio

    def _reserved_tokens(self) -> float:
        """KV slots the running requests are expected to take beyond what they hold (``_future_tokens``).
        Tokens scheduled this step (already allocated, not yet computed) count once more: a margin of
        at most one step's tokens."""
        return sum(self._future_tokens(r, r.computed_len) for r in self.running)

    def _alloc(self, n: int, admitting: tuple | None = None) -> torch.Tensor | None:
        """``n`` free slots, evicting cached prefixes (and then program pins) as needed; None if that is
        not enough. ``admitting``: (node, length) of the locked prefix of a request being admitted."""
        slots = self.pool.alloc(n)
        if slots is None:
            self._make_room(n, admitting)
            slots = self.pool.alloc(n)
        while slots is None and self.pins.yield_lru():  # program pins give way before anyone is retracted
            self._make_room(n, admitting)
            slots = self.pool.alloc(n)
        return slots

    def _make_room(self, n: int, admitting: tuple | None) -> None:
        if self.pool.num_free < n:
            self.tree.evict(n - self.pool.num_free)
        if self.pool.hybrid and self.pool.num_sliding_free < n:
            need = max(n - self.pool.num_sliding_free, SLIDING_EVICT_MIN)
            self.tree.evict_sliding(need, self._window_nodes(admitting))

    def _window_nodes(self, admitting: tuple | None = None) -> set:
        """Hybrid pools: the tree nodes holding tokens that running requests (and ``admitting``, a
        (node, length) prefix) still read through their sliding windows: a request at position p reads
        p - W + 1 .. p, of which the tree holds those before its ``cache_locked_len``."""
        prefixes = [(r.last_node, r.cache_locked_len, r.computed_len) for r in self.running]
        if admitting is not None:
            prefixes.append((admitting[0], admitting[1], admitting[1]))
        nodes: set = set()
        for last_node, locked, computed in prefixes:
            need = locked - max(0, computed - self.window + 1)
            node, covered = last_node, 0
            while node is not None and covered < need and not node.is_root:
                nodes.add(node)
                covered += len(node.key)
                node = node.parent
        return nodes

    def _free_behind_windows(self) -> None:
        """Hybrid pools: free the sliding slots of running requests' own tokens that their windows left
        behind (in batches of ``SLIDING_FREE_BATCH``: one free for many steps)."""
        behind = []
        for req in self.running:
            start = max(req.sliding_from, req.cache_locked_len)
            end = req.computed_len - self.window + 1  # the next query, at computed_len, reads from here on
            if end - start >= SLIDING_FREE_BATCH:
                behind.append(self.table.table[req.row, start:end])
                req.sliding_from = end
        if behind:
            self.pool.free_sliding(torch.cat(behind))

    def _yield_pins_for(self, need: int) -> None:
        """Unpin least recently used program runs until ``need`` slots are free or evictable; only
        when the pinned tokens could make that room (requests, not pins, may be what holds it)."""
        while self.pool.num_free + self.tree.evictable_size() < need <= (
            self.pool.num_free + self.tree.evictable_size() + self.pins.pinned_tokens()
        ) and self.pins.yield_lru():
            pass

    def _retract_newest(self) -> Request:
        """Out of memory even after eviction: retract the most recently admitted running request, or
        fail it when it is the only one (it cannot fit alone). Returns that request."""
        victim = self.running[-1]
        if len(self.running) == 1:
            self.fail(victim, "out of KV cache memory: the request does not fit in the cache alone")
        else:
            self.retract(victim)
        return victim

    def _alloc_for_running(self, req: Request, n: int) -> torch.Tensor | None:
        """Allocate, retracting the most recently admitted other requests when memory runs out."""
        while True:
            slots = self._alloc(n)
            if slots is not None:
                return slots
            if self._retract_newest() is req:
                return None

    def _ordered_waiting(self) -> list[Request]:
        if self.config.schedule_policy == "fcfs" or len(self.waiting) > LPM_MAX_QUEUE or self.tree.disabled:
            return list(self.waiting)
        # Longest prefix match first; retracted requests keep priority (they sit at the front).
        scored = []
        for pos, req in enumerate(self.waiting):
            match_len = self.tree.match_prefix(req.token_slice(0, req.max_prefix_match()), req.cache_namespace).length
            scored.append((req.retractions == 0, -match_len, pos, req))
        scored.sort(key=lambda t: t[:3])
        return [t[3] for t in scored]

    def _admit(self, budget: int) -> list[ScheduledItem]:
        items: list[ScheduledItem] = []
        admitted: list[Request] = []
        reserved: float | None = None  # computed at the first request that gets as far as memory
        for req in self._ordered_waiting():
            if budget <= 0 or self.table.num_free == 0 or len(self.running) >= self.config.max_running_requests:
                break
            if req.inflight:
                continue  # retracted with a token still in flight: wait until it is read back
            match = self.tree.match_prefix(req.token_slice(0, req.max_prefix_match()), req.cache_namespace)
            # In-batch prefix sharing: a request that shares a long uncached prefix with one admitted in
            # this step (in the same cache namespace) waits one step, then finds that prefix in the cache
            # instead of recomputing it.
            threshold = match.length + self.config.inbatch_prefix_threshold
            if req.total_len >= threshold and admitted:
                head = req.token_slice(0, threshold)
                if any(other.total_len >= threshold and other.cache_namespace == req.cache_namespace
                       and other.token_slice(0, threshold) == head for other in admitted):
                    continue
            n = self._limit_prompt_logprobs(req, match.length, min(req.total_len - match.length, budget))
            if n <= 0:
                continue  # this step's prompt-logprob budget is spent
            if not self._acquire_lora(req):
                continue  # every adapter slot is held by running requests of other adapters: it waits
            self.tree.inc_lock_ref(match.node)
            # the chunk, plus one decode token for each request already running (program pins give way
            # for these), plus what the running requests and this one are expected to need later (none
            # when nothing else runs: a request that fits alone is always admitted)
            self._yield_pins_for(n + len(self.running))
            expected = 0.0
            if self.running and self._conservativeness > 0:
                if reserved is None:
                    reserved = self._reserved_tokens()
                expected = reserved + self._future_tokens(req, match.length + n)
            if self.pool.num_free + self.tree.evictable_size() < n + len(self.running) + expected or (
                self.pool.hybrid and self.pool.num_sliding_free + self.tree.sliding_size() < n + len(self.running)
            ):
                self.tree.dec_lock_ref(match.node)
                self._release_lora(req)
                break
            slots = self._alloc(n, admitting=(match.node, match.length))
            row = self.table.alloc() if slots is not None else None
            if row is None:
                if slots is not None:
                    self.pool.free(slots)
                self.tree.dec_lock_ref(match.node)
                self._release_lora(req)
                break
            self.table.write(row, 0, match.slots)
            self.table.write(row, match.length, slots)
            req.row, req.last_node = row, match.node
            req.computed_len = req.cache_locked_len = req.sliding_from = match.length
            if not req.admitted_once:
                req.cached_tokens, req.admitted_once = match.length, True
            req.status = RequestStatus.RUNNING
            self.waiting.remove(req)
            self.running.append(req)
            self.peak_running = max(self.peak_running, len(self.running))
            admitted.append(req)
            items.append(self._scheduled_chunk(req, match.length, n, slots))
            budget -= n
            if reserved is not None:
                reserved += self._future_tokens(req, match.length + n)
        return items

    def _acquire_lora(self, req: Request) -> bool:
        """Give ``req`` its adapter's device slot (``req.lora_slot``); False when no slot can be had now."""
        if req.lora_name is None:
            return True
        slot = self.lora.acquire(req.lora_name)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def _release_lora(self, req: Request) -> None:
        if req.lora_slot >= 0:
            self.lora.release(req.lora_name)
            req.lora_slot = -1

    # ------------------------------------------------------------------ after the forward
    def complete(self, items: list[ScheduledItem]) -> None:
        """Advance each scheduled request; cache freshly prefilled prefixes so others can share them."""
        for item in items:
            req = item.req
            if req.status is not RequestStatus.RUNNING:
                continue
            req.computed_len = item.start + item.length
            if item.length > 1:
                self._cache_unfinished(req)
        if self.pool.hybrid:
            self._free_behind_windows()

    def rewind(self, req: Request, length: int) -> None:
        """Forget the KV computed for ``req``'s tokens from position ``length`` on (their token changed
        after the step that computed them was launched: overlap scheduling, an ending appended instead
        of the sampled token); their slots go back to the pool and are computed again."""
        if req.status is not RequestStatus.RUNNING or req.computed_len <= length:
            return
        if length < req.cache_locked_len:
            raise RuntimeError(f"cannot rewind {req.rid} to {length}: the cache holds {req.cache_locked_len} of its tokens")
        slots = self.table.table[req.row, length : req.computed_len].clone()
        behind = min(max(req.sliding_from - length, 0), len(slots))  # positions whose sliding slots are freed already
        if self.pool.hybrid and behind:
            self.pool.free(slots[:behind], sliding=False)
            slots = slots[behind:]
            req.sliding_from = length
        self.pool.free(slots)
        req.computed_len = length

    def _cache_unfinished(self, req: Request) -> None:
        """Hand the request's computed KV to the tree and re-lock it there (SGLang's cache_unfinished_req)."""
        if self.tree.disabled:
            return
        ids = self._give_to_tree(req)
        match = self.tree.match_prefix(ids, req.cache_namespace)
        if match.length != req.computed_len:  # the request's window is whole, so its prefix matches whole
            raise RuntimeError(f"cached {req.computed_len} tokens of {req.rid} but the cache matches {match.length}")
        self.table.write(req.row, 0, match.slots)
        self.tree.inc_lock_ref(match.node)
        self.tree.dec_lock_ref(req.last_node)
        req.last_node, req.cache_locked_len = match.node, match.length

    def _give_to_tree(self, req: Request) -> list[int]:
        """Hand the request's computed tokens and their KV to the tree (``RadixCache.cache_tokens``: its
        duplicates of what the tree held are freed); returns those token ids."""
        ids = req.token_slice(0, req.computed_len)
        slots = self.table.read(req.row, req.computed_len)
        sliding_from = max(req.sliding_from, req.cache_locked_len)  # its own tokens that still have sliding slots
        self.tree.cache_tokens(ids, slots, req.cache_namespace, req.cache_locked_len, sliding_from)
        return ids

    def _release(self, req: Request, pin_for_program: bool = False) -> None:
        """Give the request's KV to the tree (or back to the pool when caching is off) and free its row.

        With ``pin_for_program`` (the request finished) its cached path is pinned for its program run."""
        ids = self._give_to_tree(req)
        if pin_for_program and req.program_id is not None:
            self.pins.pin(req.program_id, ids, req.cache_namespace)
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        self.table.free(req.row)
        self._release_lora(req)
        req.row, req.last_node = None, None
        req.computed_len = req.cache_locked_len = req.sliding_from = 0

    def finish(self, req: Request, reason: dict) -> None:
        """Finish a running request: release its KV and drop it from the running set."""
        req.finish_reason = reason
        if reason.get("type") in ("length", "stop"):
            self._record_budget_use(req)
        self.remove(req)

    def fail(self, req: Request, message: str) -> None:
        """Finish a request with an error; the engine collects it with ``drain_failed``."""
        self.finish(req, {"type": "abort", "message": message})
        self._failed.append(req)

    def drain_failed(self) -> list[Request]:
        failed, self._failed = self._failed, []
        return failed

    def retract(self, req: Request) -> None:
        """Preempt a running request: its KV goes to the tree (evictable), it waits at the queue front.

        It resumes later by prefilling what was evicted; greedy results are unchanged.
        """
        self._release(req)
        self.running.remove(req)
        if req.wants_prompt_logprobs:
            req.input_token_logprobs.clear()
            req.input_top_logprobs.clear()
        req.status = RequestStatus.WAITING
        req.retractions += 1
        self.num_retractions += 1
        self.waiting.insert(0, req)
        logger.debug("retracted %s (%d tokens computed)", req.rid, req.total_len)

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests are running."""
        if self.running:
            return False
        self.pins.release_all()  # programs stay open; their later calls pin again
        self.tree.reset()
        return True
