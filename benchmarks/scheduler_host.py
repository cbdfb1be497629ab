"""Host time of the scheduler per engine step, with no model: row c's shape (many requests at once).

    python benchmarks/scheduler_host.py [--requests 1000 --prompt 1024 --output 1024 --repeats 3]

Runs the scheduler, the radix tree and the request table over a bare KV pool exactly as the engine
drives them (``schedule()``, the new slots written in one vectorized write, ``complete()``, a token
appended to each request whose chunk ended), once with one pool for all layers and once with the
hybrid layout of a sliding-window model (GPT-OSS's window of 128, its pool sizes on an H200 in bf16),
and prints the time spent in ``schedule()`` + the write + ``complete()`` per step (the best of
``--repeats`` runs: this is host work that the engine overlaps with the device's step).
"""

from __future__ import annotations

import argparse
import time

import torch

from plait.runtime.config import EngineConfig
from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.radix import RadixCache
from plait.runtime.kvcache.table import ReqToSlotTable
from plait.runtime.request import Request, RequestStatus
from plait.runtime.scheduler import SLIDING_FREE_BATCH, Scheduler
from plait.sampling import SamplingParams

WINDOW = 128
MAX_RUNNING = 1024
# GPT-OSS-120B on an H200, bf16 KV: one pool of ~741k tokens, or the hybrid layout's ~1.15M full tokens
# and the sliding pool's floor (docs/architecture.md)
PLAIN_SLOTS, HYBRID_SLOTS = 741_000, 1_150_000


def run(hybrid: bool, requests: int, prompt: int, output: int) -> tuple[float, int, int]:
    """(seconds per step in the scheduler, steps, most requests running at once)."""
    config = EngineConfig(max_running_requests=MAX_RUNNING, chunked_prefill_size=2048)
    layout = {}
    if hybrid:
        layout = dict(sliding_layers=(0, 2), sliding_window=WINDOW,
                      num_sliding_slots=MAX_RUNNING * (2 * WINDOW + SLIDING_FREE_BATCH) + 2 * 2048)
    pool = KVPool(HYBRID_SLOTS if hybrid else PLAIN_SLOTS, 3, 1, 1, **layout)
    table = ReqToSlotTable(MAX_RUNNING + 1, prompt + output + 8, full_to_sliding=pool.full_to_sliding)
    sched = Scheduler(config, pool, table, RadixCache(pool))
    for i in range(requests):
        ids = [1000 + i] + [(i * 7 + j) % 500 for j in range(prompt - 1)]
        sched.add_request(Request(f"r{i}", ids, SamplingParams(max_new_tokens=output, ignore_eos=True), frozenset()))
    spent, steps, peak = 0.0, 0, 0
    while sched.has_work():
        start = time.perf_counter()
        items = sched.schedule()
        if items:  # the step builder's one write of the new tokens' slots
            rows = torch.cat([torch.full((it.length,), it.req.row) for it in items])
            positions = torch.cat([torch.arange(it.start, it.start + it.length) for it in items])
            table.write_at(rows, positions, torch.cat([it.slots for it in items]))
        sched.complete(items)
        spent += time.perf_counter() - start
        for item in items:
            req = item.req
            if req.status is RequestStatus.RUNNING and item.samples:
                req.output_ids.append(7)
                if len(req.output_ids) >= output:
                    sched.finish(req, {"type": "length", "length": output})
        steps += 1
        peak = max(peak, len(sched.running))
    return spent / steps, steps, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--output", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(False, 64, 64, 8)  # warm up (torch's first calls)
    for hybrid in (False, True):
        results = [run(hybrid, args.requests, args.prompt, args.output) for _ in range(args.repeats)]
        best, steps, peak = min(results)
        name = "hybrid KV layout" if hybrid else "one pool"
        print(f"{name}: {best * 1e3:.2f} ms a step (best of {args.repeats}), {steps} steps, at most {peak} running")


if __name__ == "__main__":
    main()
