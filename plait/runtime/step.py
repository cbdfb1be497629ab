"""One engine step: build the ForwardBatch from scheduled items, run it, sample, apply the results.

Kept apart from the engine's threading so it reads top to bottom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.runtime.constrained.bitmask import build_batch_bitmask
from plait.runtime.executor.forward_batch import ForwardBatch, host_to_device, values_to_device
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.executor.sampler import Sampler, SamplingBatch, log_softmax_logprobs, top_k_logprobs
from plait.runtime.request import Request
from plait.runtime.scheduler import ScheduledItem


@dataclass
class LogitsPlan:
    """Which logits rows belong to whom: sampled rows and prompt-logprob rows."""

    sample_rows: list[int]  # logits row of each sampling item, in order of ``sample_items``
    sample_items: list[ScheduledItem]
    prompt_rows: list[tuple[ScheduledItem, int, int]]  # (item, first logits row, first prompt position)
    prompt_counts: list[int]


def build_forward_batch(
    items: list[ScheduledItem], runner: ModelRunner, inflight_ids: torch.Tensor | None = None
) -> tuple[ForwardBatch, LogitsPlan]:
    """Flatten the scheduled items into one ForwardBatch (one host-to-device copy for all index
    tensors) and map the new tokens' slots into the request-to-slot table in one write.

    With overlap scheduling a decode row's input may be the token sampled by the previous step, not
    yet read back: it is gathered on the device from ``inflight_ids`` (that step's sampled tokens).
    """
    device = runner.device
    inflight_pos: list[int] = []
    inflight_src: list[int] = []
    input_ids: list[int] = []
    positions: list[int] = []
    token_rows: list[int] = []
    starts, logits_idx = [], []
    lora_slots: list[int] | None = None  # each token's adapter slot, once some item has an adapter
    plan = LogitsPlan([], [], [], [])
    for item in items:
        req, start, n = item.req, item.start, item.length
        offset = len(input_ids)
        starts.append(offset)
        if n == 1:
            if start == req.total_len:  # its input is the token sampled last step, still on the device
                input_ids.append(0)
                inflight_pos.append(offset)
                inflight_src.append(req.inflight_row)
            else:
                input_ids.append(req.token_slice(start, start + 1)[0])
            positions.append(start)
            token_rows.append(req.row)
        else:
            input_ids.extend(req.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            token_rows.extend([req.row] * n)
        if req.lora_slot >= 0 and lora_slots is None:
            lora_slots = [-1] * offset
        if lora_slots is not None:
            lora_slots.extend([req.lora_slot] * n)
        if req.wants_prompt_logprobs:
            # logits at prompt position p score prompt token p + 1
            lo = max(start, max(req.logprob_start_len - 1, 0))
            hi = min(start + n, len(req.prompt_ids) - 1)
            if hi > lo:
                plan.prompt_rows.append((item, len(logits_idx), lo))
                plan.prompt_counts.append(hi - lo)
                logits_idx.extend(range(offset + lo - start, offset + hi - start))
        if item.samples:
            plan.sample_rows.append(len(logits_idx))
            plan.sample_items.append(item)
            logits_idx.append(offset + n - 1)
    T, B = len(input_ids), len(items)
    L, F = len(logits_idx), len(inflight_pos)
    host = torch.tensor(
        input_ids + positions + token_rows + [item.req.row for item in items] + logits_idx + inflight_pos
        + inflight_src + (lora_slots or []),
        dtype=torch.int64,
    )
    packed = host_to_device(host, device)
    lora_t = packed[packed.shape[0] - T:].to(torch.int32) if lora_slots is not None else None
    input_t, pos_t, rows_t = packed[:T], packed[T : 2 * T], packed[2 * T : 3 * T]
    req_rows_t, logits_t = packed[3 * T : 3 * T + B], packed[3 * T + B : 3 * T + B + L]
    if F:
        if inflight_ids is None:
            raise RuntimeError("a decode row needs a token still in flight, but no in-flight step was given")
        fill_pos, fill_src = packed[3 * T + B + L : 3 * T + B + L + F], packed[3 * T + B + L + F : 3 * T + B + L + 2 * F]
        input_t[fill_pos] = inflight_ids[fill_src]
    out_cache_loc = torch.cat([item.slots for item in items]) if len(items) > 1 else items[0].slots
    runner.slot_table.write_at(rows_t, pos_t, out_cache_loc)  # the new tokens' slots, all rows at once
    batch = ForwardBatch(
        input_ids=input_t,
        positions=pos_t,
        out_cache_loc=out_cache_loc,
        req_rows=req_rows_t,
        prefix_lens=[item.start for item in items],
        extend_lens=[item.length for item in items],
        seq_lens=[item.start + item.length for item in items],
        extend_starts=starts,
        logits_indices=logits_t,
        pool=runner.pool,
        slot_table=runner.slot_table.table,
        sliding_slot_table=runner.slot_table.sliding_table,
        sliding_out_cache_loc=(None if runner.pool.full_to_sliding is None
                               else runner.pool.full_to_sliding[out_cache_loc]),
        lora_slots=lora_t,
    )
    return batch, plan


def record_prompt_logprobs(plan: LogitsPlan, logits: torch.Tensor) -> None:
    """Append prompt-token logprobs (and top alternatives) for the prompt positions computed this step."""
    for (item, row, first_pos), count in zip(plan.prompt_rows, plan.prompt_counts):
        req = item.req
        targets = torch.tensor(req.prompt_ids[first_pos + 1 : first_pos + 1 + count], device=logits.device)
        rows = logits[row : row + count]
        lps = log_softmax_logprobs(rows, targets).tolist()
        req.input_token_logprobs.extend(zip(lps, targets.tolist()))
        if req.top_logprobs_num > 0:
            req.input_top_logprobs.extend(top_k_logprobs(rows, req.top_logprobs_num))
        else:
            req.input_top_logprobs.extend([None] * count)


def finish_prompt_logprobs(items: list[ScheduledItem]) -> None:
    """Close the prompt logprobs of requests whose prompt was fully computed this step.

    The first prompt token has no logprob (nothing precedes it): it leads the list as (None, id)."""
    for item in items:
        req = item.req
        if not (item.samples and req.wants_prompt_logprobs):
            continue
        if req.logprob_start_len == 0:
            req.input_token_logprobs.insert(0, (None, req.prompt_ids[0]))
            req.input_top_logprobs.insert(0, None)
        req.prompt_logprobs_done = True


def sampling_inputs(
    plan: LogitsPlan, logits: torch.Tensor, output_ids: list[list[int]] | None = None
) -> tuple[list[Request], torch.Tensor, SamplingBatch]:
    """The requests to sample, their logits rows and their SamplingBatch. ``output_ids`` replaces the
    requests' own token lists (overlap scheduling counts a token still in flight)."""
    reqs = [item.req for item in plan.sample_items]
    sbatch = SamplingBatch(
        params=[r.params for r in reqs],
        output_ids=output_ids if output_ids is not None else [r.output_ids for r in reqs],
        prompt_ids=[r.prompt_ids for r in reqs],
        eos_token_ids=[r.eos_token_ids for r in reqs],
        top_logprobs_num=[r.top_logprobs_num if r.return_logprob else 0 for r in reqs],
        need_logprobs=any(r.return_logprob for r in reqs),
    )
    if any(r.grammar is not None for r in reqs):  # constrained decoding: one packed bitmask for the batch
        words = (logits.shape[-1] + 31) // 32
        sbatch.token_bitmask, sbatch.bitmask_rows = build_batch_bitmask(
            [r.grammar for r in reqs], words, pin=logits.is_cuda)
    rows = logits
    if len(plan.sample_rows) < logits.shape[0]:  # (an index copied without waiting for the step to finish)
        rows = logits.index_select(0, values_to_device(plan.sample_rows, torch.int64, logits.device))
    return reqs, rows, sbatch


def sample_next_tokens(plan: LogitsPlan, logits: torch.Tensor, sampler: Sampler) -> list[tuple[Request, int]]:
    """Sample one token for each request whose step reached its last token; record output logprobs."""
    if not plan.sample_items:
        return []
    reqs, rows, sbatch = sampling_inputs(plan, logits)
    out = sampler.sample(rows, sbatch)
    next_ids = out.next_token_ids.tolist()
    if sbatch.need_logprobs:  # some row returns logprobs
        lps = out.logprobs.tolist()
        for i, req in enumerate(reqs):
            if req.return_logprob:
                req.output_token_logprobs.append((lps[i], next_ids[i]))
                req.output_top_logprobs.append(out.top_logprobs[i])
    return list(zip(reqs, next_ids))
