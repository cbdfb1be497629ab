"""Program-aware caching: ProgramPins on a bare radix tree, then in the engine under eviction pressure."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from plait.runtime.kvcache.pins import ProgramPins
from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.radix import RadixCache
from tests.runtime.engine_helpers import assert_no_leak


# ---------------------------------------------------------------------- ProgramPins on a bare tree
def make(num_slots: int = 64, budget: int = 32) -> tuple[KVPool, RadixCache, ProgramPins]:
    pool = KVPool(num_slots, num_layers=1, num_kv_heads=1, head_dim=1, debug=True)
    tree = RadixCache(pool)
    return pool, tree, ProgramPins(tree, max_tokens_per_program=budget)


def cache(pool: KVPool, tree: RadixCache, tokens: list[int]) -> None:
    """Insert ``tokens`` the way a finishing request hands its KV to the tree."""
    slots = pool.alloc(len(tokens))
    assert slots is not None
    pool.free(slots[: tree.insert(tokens, slots)])


def check(pool: KVPool, tree: RadixCache, pins: ProgramPins) -> None:
    tree.check_integrity()
    pins.check_integrity()
    assert pool.num_free + tree.total_size() == pool.capacity


def test_pinned_path_survives_eviction_that_takes_an_unpinned_one():
    pool, tree, pins = make()
    program, other = [1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5]
    cache(pool, tree, program)
    cache(pool, tree, other)
    pins.open("p")
    pins.pin("p", program)
    assert pins.pinned_tokens("p") == 6 and pins.stats()["pinned_programs"] == 1
    assert tree.evict(pool.capacity) == len(other)  # everything evictable goes; the pinned path stays
    assert tree.match_prefix(program).length == 6
    assert tree.match_prefix(other).length == 0
    check(pool, tree, pins)
    pins.close("p")
    assert pins.pinned_tokens() == 0 and tree.evictable_size() == 6
    assert tree.evict(pool.capacity) == 6
    check(pool, tree, pins)


def test_pin_needs_an_open_program_and_closing_twice_is_harmless():
    pool, tree, pins = make()
    cache(pool, tree, [1, 2, 3])
    pins.pin("never-opened", [1, 2, 3])
    pins.open("p")
    pins.close("p")
    pins.close("p")
    pins.pin("p", [1, 2, 3])  # a request finishing after its run ended pins nothing
    assert pins.pinned_tokens() == 0 and tree.protected_size() == 0
    check(pool, tree, pins)


def test_longer_path_replaces_its_prefix_and_shared_prefixes_count_once():
    pool, tree, pins = make()
    pins.open("p")
    cache(pool, tree, [1, 2, 3])
    pins.pin("p", [1, 2, 3])
    cache(pool, tree, [1, 2, 3, 4, 5])
    pins.pin("p", [1, 2, 3, 4, 5])  # the turn extends the previous one: one lock, not two
    pins.pin("p", [1, 2])  # already covered
    assert pins.pinned_tokens("p") == 5
    cache(pool, tree, [1, 2, 7, 8])  # a fork: shares [1, 2]
    pins.pin("p", [1, 2, 7, 8])
    assert pins.pinned_tokens("p") == 7  # 1 2 | 3 4 5 | 7 8
    assert tree.protected_size() == 7
    check(pool, tree, pins)
    pins.close("p")
    assert tree.protected_size() == 0
    check(pool, tree, pins)


def test_budget_caps_a_long_path_and_trims_the_oldest_paths():
    pool, tree, pins = make(budget=6)
    pins.open("p")
    long = list(range(10, 20))
    cache(pool, tree, long)
    pins.pin("p", long)
    assert pins.pinned_tokens("p") == 6 and tree.protected_size() == 6  # the first 6 tokens
    tree.evict(pool.capacity)
    assert tree.match_prefix(long).length == 6
    cache(pool, tree, [30, 31, 32])
    pins.pin("p", [30, 31, 32])  # 6 + 3 > 6: the older path is unpinned
    assert pins.pinned_tokens("p") == 3 and pins.stats()["pin_trims"] == 1
    check(pool, tree, pins)


def test_yield_unpins_the_least_recently_used_program_first():
    pool, tree, pins = make()
    for pid, tokens in (("a", [1, 2, 3]), ("b", [4, 5, 6, 7])):
        pins.open(pid)
        cache(pool, tree, tokens)
        pins.pin(pid, tokens)
    pins.open("a")  # "a" is used again: "b" is now the least recently used
    assert pins.yield_lru()
    assert pins.pinned_tokens("b") == 0 and pins.pinned_tokens("a") == 3
    assert pins.is_open("b")  # still open: its next call pins again
    assert pins.yield_lru() and not pins.yield_lru()
    assert pins.stats()["pin_yields"] == 2
    check(pool, tree, pins)


def test_budget_zero_or_disabled_cache_pins_nothing():
    pool, tree, pins = make(budget=0)
    pins.open("p")
    cache(pool, tree, [1, 2, 3])
    pins.pin("p", [1, 2, 3])
    assert tree.protected_size() == 0
    with pytest.raises(ValueError, match="max_tokens_per_program"):
        ProgramPins(tree, max_tokens_per_program=-1)


def test_release_all_lets_the_tree_reset_without_leaks():
    pool, tree, pins = make()
    for pid in ("a", "b"):
        pins.open(pid)
    cache(pool, tree, [1, 2, 3, 4])
    pins.pin("a", [1, 2, 3, 4])
    pins.pin("b", [1, 2])
    with pytest.raises(RuntimeError):
        tree.reset()
    pins.release_all()
    tree.reset()
    assert pool.num_free == pool.capacity
    check(pool, tree, pins)


def test_scheduler_yields_pins_only_when_that_can_make_room():
    from plait.runtime.config import EngineConfig
    from plait.runtime.kvcache.table import ReqToSlotTable
    from plait.runtime.scheduler import Scheduler

    pool, tree, pins = make(num_slots=64)
    scheduler = Scheduler(EngineConfig(), pool, ReqToSlotTable(4, 64), tree, pins)
    pins.open("p")
    cache(pool, tree, list(range(10)))
    pins.pin("p", list(range(10)))
    held_by_requests = pool.alloc(50)  # what running requests hold: pins cannot give that back
    assert pool.num_free == 4
    scheduler._yield_pins_for(20)  # 4 free + 10 pinned < 20: unpinning would not help
    assert pins.pinned_tokens() == 10 and pins.stats()["pin_yields"] == 0
    scheduler._yield_pins_for(12)
    assert pins.pinned_tokens() == 0 and tree.evictable_size() == 10 and pins.stats()["pin_yields"] == 1
    pool.free(held_by_requests)
    check(pool, tree, pins)


# ---------------------------------------------------------------------- in the engine
POOL = 320  # KV slots: a few 100-token prompts fill it, so LRU eviction happens between calls
BUDGET = 160
GREEDY2 = {"temperature": 0.0, "max_new_tokens": 2, "min_new_tokens": 2}


def prompt(start: int, n: int = 100) -> list[int]:
    """``n`` distinct token ids: prompts built from different starts share no prefix."""
    return list(range(start, start + n))


@pytest.fixture(scope="module")
def small_engine(bundled_model_dir):
    from plait.runtime.engine import Engine

    eng = Engine(model=str(bundled_model_dir), max_total_tokens=POOL, max_pinned_tokens_per_program=BUDGET)
    yield eng
    eng.shutdown()


def run(engine, ids: list[int], program_id: str | None = None, timeout: float = 120.0) -> dict:
    """engine.generate in a worker thread, so a deadlock fails the test instead of hanging it."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(engine.generate, input_ids=ids, sampling_params=GREEDY2, program_id=program_id).result(timeout)


def check_engine(engine) -> None:
    engine.tree.check_integrity()
    engine.pins.check_integrity()


@pytest.mark.model
def test_program_prefix_survives_pressure_that_evicts_unrelated_prefix(small_engine):
    eng = small_engine
    assert_no_leak(eng)
    program, unrelated = prompt(1000), prompt(3000)
    run(eng, program + [5], program_id="p")
    run(eng, unrelated + [5])
    assert eng.stats()["pinned_tokens"] >= 100
    for start in (4000, 5000, 6000):  # traffic that needs the whole unpinned part of the cache
        run(eng, prompt(start))
    again = run(eng, program + [6, 7], program_id="p")
    assert again["meta_info"]["cached_tokens"] >= 100  # the program's prefix was kept
    assert run(eng, unrelated + [6, 7])["meta_info"]["cached_tokens"] == 0  # the unpinned one was evicted
    check_engine(eng)
    eng.end_program("p")
    stats = eng.stats()
    assert stats["pinned_tokens"] == 0 and stats["open_programs"] == 0
    assert_no_leak(eng)


@pytest.mark.model
def test_pins_give_way_instead_of_deadlocking(small_engine):
    eng = small_engine
    run(eng, prompt(1000, 150), program_id="a")
    run(eng, prompt(2000, 120), program_id="b")
    assert eng.stats()["pinned_tokens"] >= 270  # most of the 320 slots
    yields = eng.stats()["pin_yields"]
    out = run(eng, prompt(3000, 200))  # needs more than free + evictable while the pins hold
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert eng.stats()["pin_yields"] > yields
    assert eng.pins.pinned_tokens("a") == 0  # "a" was the least recently used: it yielded first
    check_engine(eng)
    for pid in ("a", "b"):
        eng.end_program(pid)
    assert_no_leak(eng)


@pytest.mark.model
def test_budget_and_explicit_begin_end(small_engine):
    eng = small_engine
    eng.begin_program("r")
    assert eng.stats()["open_programs"] == 1
    run(eng, prompt(1000, 250), program_id="r")
    assert eng.pins.pinned_tokens("r") == BUDGET  # the first BUDGET tokens stay, the rest is evictable
    check_engine(eng)
    assert_no_leak(eng)  # flush drops pins (the run stays open) and frees every slot
    assert eng.stats()["open_programs"] == 1 and eng.stats()["pinned_tokens"] == 0
    eng.end_program("r")
    eng.end_program("never-begun")  # ignored
    with pytest.raises(TypeError, match="program_id"):
        eng.generate("hi", {"max_new_tokens": 1}, program_id=7)
    with pytest.raises(ValueError, match="program_id"):
        eng.begin_program("")
    assert eng.stats()["open_programs"] == 0


@pytest.mark.model
def test_async_generate_carries_the_program_id(small_engine):
    import asyncio

    eng = small_engine
    out = asyncio.run(eng.async_generate(input_ids=prompt(7000, 40), sampling_params=GREEDY2, program_id="async"))
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert eng.pins.pinned_tokens("async") == 41  # 40 prompt tokens + the first output token's KV
    eng.end_program("async")
    assert_no_leak(eng)


def test_pins_find_the_path_in_the_request_namespace():
    pool, tree, pins = make()
    program = [1, 2, 3, 4]
    slots = pool.alloc(4)
    pool.free(slots[: tree.insert(program, slots, "tenant")])
    pins.open("p")
    pins.pin("p", program)  # the default namespace has no such path: nothing to pin
    assert pins.pinned_tokens("p") == 0
    pins.pin("p", program, "tenant")
    assert pins.pinned_tokens("p") == 4 and tree.evict(pool.capacity) == 0
    check(pool, tree, pins)
    pins.close("p")
    assert tree.evict(pool.capacity) == 4
    check(pool, tree, pins)
