"""Scheduler admission on a bare pool, tree and table: the KV reserved for running requests' outputs.

Each step here is what the engine does around the scheduler: ``schedule()``, the new slots written to
the table, ``complete()``, then a token appended to every request whose chunk ended its pending tokens
(the sampled token).
"""

from __future__ import annotations

import pytest

from plait.runtime import scheduler as scheduler_module
from plait.runtime.config import EngineConfig
from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.radix import RadixCache
from plait.runtime.kvcache.table import ReqToSlotTable
from plait.runtime.request import Request, RequestStatus
from plait.runtime.scheduler import Scheduler
from plait.sampling import SamplingParams


def make_scheduler(num_slots: int, conservativeness: float = 1.0, max_running: int = 64) -> Scheduler:
    config = EngineConfig(max_running_requests=max_running, chunked_prefill_size=4096,
                          schedule_conservativeness=conservativeness)
    pool = KVPool(num_slots, num_layers=1, num_kv_heads=1, head_dim=1, debug=True)
    table = ReqToSlotTable(max_running + 1, 4096)
    return Scheduler(config, pool, table, RadixCache(pool, disabled=True))


def make_request(i: int, prompt_len: int, max_new_tokens: int) -> Request:
    # distinct first tokens: no prefix sharing between requests
    prompt = [1000 + i] + [(i * 7 + j) % 500 for j in range(prompt_len - 1)]
    return Request(f"r{i}", prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True), frozenset())


def step(sched: Scheduler) -> list:
    """One engine step: schedule, complete, sample a token for each request that reached its end, and
    finish the requests that reached ``max_new_tokens``."""
    items = sched.schedule()
    for item in items:  # the step builder's write of the new tokens' slots
        sched.table.write(item.req.row, item.start, item.slots)
    sched.complete(items)
    for item in items:
        req = item.req
        if req.status is RequestStatus.RUNNING and item.samples:
            req.output_ids.append(7)
            if len(req.output_ids) >= req.params.max_new_tokens:
                sched.finish(req, {"type": "length", "length": req.params.max_new_tokens})
    return items


def run_all(sched: Scheduler, requests: list[Request], max_steps: int = 10_000) -> int:
    """Steps until every request finished; returns the most requests that ran at once."""
    for req in requests:
        sched.add_request(req)
    peak = 0
    for _ in range(max_steps):
        if not sched.has_work():
            return peak
        step(sched)
        peak = max(peak, len(sched.running))
    raise AssertionError("requests did not finish")


def test_admission_reserves_the_outputs_of_running_requests():
    """Prompts of 10 tokens fit 10 at a time in 100 slots, but with outputs of 40 tokens each only a
    few can finish; reserving 0.7 of each output admits 2 (10 + 28 = 38 slots each), not 10."""
    sched = make_scheduler(100)
    for i in range(10):
        sched.add_request(make_request(i, 10, 40))
    step(sched)
    assert len(sched.running) == 2
    greedy = make_scheduler(100, conservativeness=0)
    for i in range(10):
        greedy.add_request(make_request(i, 10, 40))
    step(greedy)
    assert len(greedy.running) == 9  # 9 prompts + 9 decode tokens of the next step fit 100 slots


def test_a_request_that_fits_alone_is_admitted_even_if_its_reservation_does_not_fit():
    sched = make_scheduler(50)
    sched.add_request(make_request(0, 10, 1000))  # reserves 700 > 50, but nothing else runs
    step(sched)
    assert len(sched.running) == 1


def test_reservation_avoids_the_retractions_of_greedy_admission():
    """Requests that all run to max_new_tokens: greedy admission fills the pool with prompts and then
    retracts; the reservation (whose decay stops at the budget share finished requests used, here all
    of it) does not, and every request still finishes."""
    def run(conservativeness: float) -> tuple[int, int]:
        sched = make_scheduler(400, conservativeness=conservativeness)
        peak = run_all(sched, [make_request(i, 20, 60) for i in range(30)])
        assert sched.pool.num_free == sched.pool.capacity and sched.peak_running == peak
        return sched.num_retractions, peak

    greedy_retractions, greedy_peak = run(0)
    reserved_retractions, reserved_peak = run(1.0)
    assert greedy_retractions > 0
    assert reserved_retractions < greedy_retractions
    assert 1 < reserved_peak <= greedy_peak


def test_ratio_decays_to_the_share_of_budgets_used(monkeypatch):
    monkeypatch.setattr(scheduler_module, "NEW_TOKEN_RATIO_DECAY_STEPS", 10)
    sched = make_scheduler(10_000)
    assert sched.new_token_ratio == pytest.approx(0.7)
    # requests that stop early: after 3 steps (3 tokens) of a 40-token budget
    for i in range(4):
        sched.add_request(make_request(i, 5, 40))
    for _ in range(3):
        step(sched)
    for req in list(sched.running):
        sched.finish(req, {"type": "stop"})
    assert sched.used_budget_share == pytest.approx(3 / 40)
    sched.add_request(make_request(9, 5, 1000))
    for _ in range(40):
        step(sched)
    assert sched.new_token_ratio == pytest.approx(scheduler_module.MIN_NEW_TOKEN_RATIO)
    # requests that use their whole budget raise where the decay stops
    for _ in range(200):
        sched._record_budget_use(_finished(10))
    assert sched._ratio_floor() == pytest.approx(1.0, abs=0.01)


def _finished(max_new_tokens: int) -> Request:
    req = make_request(0, 1, max_new_tokens)
    req.output_ids = [7] * max_new_tokens
    return req


def test_retraction_raises_the_ratio():
    sched = make_scheduler(60, conservativeness=1.0)
    sched.new_token_ratio = sched._init_ratio = sched._min_ratio = 0.0  # admit greedily
    sched._ratio_decay = 0.0
    for i in range(5):
        sched.add_request(make_request(i, 10, 30))
    for _ in range(40):
        step(sched)
        if sched.num_retractions:
            break
    assert sched.num_retractions > 0
    assert sched.new_token_ratio > 0.5  # (decoded + 20 a request) / budgets, clipped to 1


def test_conservativeness_is_validated():
    with pytest.raises(ValueError, match="schedule_conservativeness"):
        EngineConfig(schedule_conservativeness=-1)


H200_MEMORY, H100_MEMORY = 141 * 10**9, 80 * 10**9


@pytest.mark.parametrize(("device", "is_moe", "memory", "expected"), [
    ("cpu", False, 0, (256, 256)), ("cpu", True, 0, (256, 256)), ("cuda", False, H200_MEMORY, (256, 256)),
    ("cuda", True, H200_MEMORY, (1024, 1024)), ("cuda", True, H100_MEMORY, (256, 256)),
])
def test_batch_limits_default_by_device_and_model(device, is_moe, memory, expected):
    config = EngineConfig().with_batch_limits(device, is_moe, memory)
    assert (config.max_running_requests, config.cuda_graph_max_bs) == expected


def test_batch_limits_given_are_kept_and_graphs_never_exceed_the_running_limit():
    assert EngineConfig(max_running_requests=64).with_batch_limits("cuda", True, H200_MEMORY).cuda_graph_max_bs == 64
    config = EngineConfig(max_running_requests=300, cuda_graph_max_bs=128).with_batch_limits("cuda", True, H200_MEMORY)
    assert (config.max_running_requests, config.cuda_graph_max_bs) == (300, 128)
    with pytest.raises(ValueError, match="max_running_requests"):
        EngineConfig(max_running_requests=0)


@pytest.mark.model
def test_the_engine_runs_on_resolved_limits(bundled_model_dir):
    from plait.runtime.engine import Engine

    with Engine(model=str(bundled_model_dir), max_total_tokens=512) as eng:  # dense, CPU
        assert eng.config.max_running_requests == 256 and eng.scheduler.config is eng.config
        assert eng.runner.slot_table.max_requests == 257
