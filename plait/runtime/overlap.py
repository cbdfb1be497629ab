"""Overlap scheduling: the CPU schedules and launches step N+1 while the device still runs step N.

A step's sampled tokens stay on the device; the next step's decode rows read their input token from
there (``build_forward_batch(..., inflight_ids=...)``). Only after step N+1 is launched does the engine
read step N's tokens back (one host-device sync per step, waiting for work that is already done) and
do the per-request CPU work (detokenizing, stop checks, streaming) while the device computes.

Consequences the scheduler and engine handle: a request has up to one token in flight
(``Request.inflight``); one that finishes on its in-flight token (EOS, stop string) was already
scheduled for one more step, whose token is dropped; requests whose in-flight token is their last by
length are not scheduled again. Steps that need values on the host right away (logprobs, penalties
that count the in-flight token, prompt scoring) run synchronously instead.

Constrained requests (a grammar) overlap too, in another order (SGLang's overlap does the same): a
grammar's mask for step N+1 needs step N's token, so the engine launches step N+1's forward, then
settles step N's constrained requests (the grammars take its tokens) while the device computes, then
builds the masks and launches the sampling (``settle_first``), then settles step N's other requests
while the device samples (``Engine._settle_for_masks``). What the settling did to a request decides
its row of step N+1 (``keep_sampling``): jump-forward appended forced tokens after its token (the
row's logits are not needed: dropped), or budget steering appended an ending *instead* of its token
(the KV that step N+1 computed from that token is rewound, ``Scheduler.rewind``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.runtime.executor.sampler import Sampler
from plait.runtime.request import Request, RequestStatus
from plait.runtime.scheduler import ScheduledItem
from plait.runtime.step import LogitsPlan, sampling_inputs


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens have not been read back yet."""

    reqs: list[Request]  # in the row order of ``next_ids``
    next_ids: torch.Tensor  # [n] int64 on the device
    host_ids: torch.Tensor  # [n] int64 on the host, filled asynchronously
    done: torch.cuda.Event | None  # recorded after the device-to-host copy (None on CPU)

    def read_back(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host_ids.tolist()


def overlappable(items: list[ScheduledItem]) -> bool:
    """Whether a step can run without reading its results back right away."""
    for item in items:
        req, p = item.req, item.req.params
        if req.return_logprob or p.max_new_tokens == 0:
            return False
        if p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0:
            return False  # penalties must count the token still in flight, whose value is not known yet
    return True


def settle_first(plan: LogitsPlan) -> bool:
    """Whether the previous step must be settled before this step's sampling is launched: a sampled
    row is constrained, and its mask depends on the token still in flight."""
    return any(item.req.grammar is not None for item in plan.sample_items)


def keep_sampling(plan: LogitsPlan) -> None:
    """After the previous step was settled: drop the sampled rows whose request finished or no longer
    ends at this step's last token (jump-forward or an ending appended tokens after it); their logits
    are not needed."""
    keep = [k for k, item in enumerate(plan.sample_items)
            if item.req.status is RequestStatus.RUNNING and item.samples]
    if len(keep) < len(plan.sample_items):
        plan.sample_rows = [plan.sample_rows[k] for k in keep]
        plan.sample_items = [plan.sample_items[k] for k in keep]


def launch_sampling(plan: LogitsPlan, logits: torch.Tensor, sampler: Sampler, vocab_size: int) -> InFlightStep:
    """Sample on the device and start copying the tokens to the host; no sync."""
    sampled = [item.req for item in plan.sample_items]
    # Seeds and min_new_tokens depend on how many tokens were generated: count the one in flight.
    # (vocab_size is a placeholder id that penalties ignore; steps with penalties do not overlap.)
    output_ids = [
        r.output_ids + [vocab_size] * r.inflight if r.inflight and (r.params.seed is not None or r.params.min_new_tokens)
        else r.output_ids
        for r in sampled
    ]
    reqs, rows, sbatch = sampling_inputs(plan, logits, output_ids)
    next_ids = sampler.sample(rows, sbatch).next_token_ids
    done = None
    if next_ids.is_cuda:
        host_ids = next_ids.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host_ids = next_ids
    for row, req in enumerate(reqs):
        req.inflight += 1
        req.inflight_row = row
    return InFlightStep(reqs, next_ids, host_ids, done)
