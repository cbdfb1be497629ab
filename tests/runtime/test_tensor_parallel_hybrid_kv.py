"""Tensor parallelism with GPT-OSS's hybrid KV layout on the CPU (2 gloo ranks, float32).

The sliding-window layers (window 8) keep their KV in a sliding pool far smaller than the full one on
every rank; only rank 0's scheduler allocates and frees sliding slots, so the other ranks get them with
each step (``StepMessage``: the table writes' sliding slots and the new tokens'). Checked: every rank's
pool is hybrid with the same sizes (the smallest rank's sliding pool: rank 1 is sized with the default
``SLIDING_FREE_BATCH``, rank 0 with 2), and ``Engine(tp_size=2)`` gives the greedy tokens and output
logprobs (within 1e-4: the ranks' partial sums are added in another order) of a one-rank engine with
the same settings, through sliding pressure (windows left behind, sliding slots freed and handed out
again, cached prefixes losing theirs), prefill chunks shorter than the window, and prefix hits past
the window; leak-free afterwards.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plait.runtime.engine import Engine
from tests.runtime.engine_helpers import assert_no_leak

pytestmark = pytest.mark.model

pytest.importorskip("transformers")

from tests.runtime.models.moe_helpers import PROMPTS, WINDOW, build_hf, greedy  # noqa: E402

NEW = 12  # each request leaves tokens behind its window
LONG = [[1] + [(7 * i + 3) % 250 + 3 for i in range(50)], [1] + [(11 * i + 5) % 250 + 3 for i in range(40)]]
FIRST = LONG + [PROMPTS[0], PROMPTS[3]]
VARIANTS = [LONG[0][:36] + [9, 9], LONG[0] + [4], LONG[1][:30] + [5], LONG[1] + [6, 7]]
SETTINGS = dict(max_total_tokens=2048, max_running_requests=4, chunked_prefill_size=WINDOW - 3,
                swa_full_tokens_ratio=0.01)
SLIDING_SLOTS = 4 * (2 * WINDOW + 2) + 2 * (WINDOW - 3)  # rank 0's floor (SLIDING_FREE_BATCH 2): the smaller


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(Engine(tp_size=2), a one-rank engine) on a tiny random GPT-OSS, sliding slots freed behind the
    windows every 2 tokens and evicted a few at a time on rank 0 (the defaults never trigger here).
    Rank 1 runs one OpenMP thread: two ranks spinning two threads each on a shared 2-CPU host made
    every step ~7x slower."""
    import plait.runtime.scheduler as scheduler

    path = tmp_path_factory.mktemp("gpt_oss_tp_hybrid")
    build_hf("gpt_oss").save_pretrained(path, safe_serialization=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scheduler, "SLIDING_FREE_BATCH", 2)
        patch.setattr(scheduler, "SLIDING_EVICT_MIN", 4)
        patch.setenv("OMP_NUM_THREADS", "1")  # read by the spawned rank as it starts
        whole = Engine(model=str(path), **SETTINGS)
        try:
            tp = Engine(model=str(path), tp_size=2, **SETTINGS)
        except BaseException:
            whole.shutdown()
            raise
        yield tp, whole
        tp.shutdown()
        whole.shutdown()


def _generate(engine: Engine, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor, int]]:
    """Each prompt's (greedy tokens, their logprobs, cached tokens)."""
    outs = engine.generate(input_ids=prompts, sampling_params=greedy(NEW), return_logprob=True)
    return [(o["output_ids"], torch.tensor([lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]),
             o["meta_info"]["cached_tokens"]) for o in outs]


def _assert_same(ours: list, refs: list) -> None:
    for (ids, lps, _), (ref_ids, ref_lps, _) in zip(ours, refs, strict=True):
        assert ids == ref_ids
        assert torch.allclose(lps, ref_lps, atol=1e-4), (lps - ref_lps).abs().max().item()


def test_replayed_table_writes_carry_rank_0s_sliding_slots():
    """Rank 0's table writes, journaled, replayed on a table whose pool allocated nothing (another
    rank's): both tables equal, the sliding one as rank 0 translated each write at its time (a
    sliding slot freed behind a window before a write reads 0 there, one freed after keeps its slot)."""
    from plait.runtime.executor.tensor_parallel import StepMessage
    from plait.runtime.kvcache.pool import KVPool
    from plait.runtime.kvcache.table import ReqToSlotTable

    def hybrid_pool() -> KVPool:
        return KVPool(32, 2, 1, 4, sliding_layers=(0,), num_sliding_slots=12, sliding_window=4)

    pools = [hybrid_pool(), hybrid_pool()]
    rank0, other = (ReqToSlotTable(2, 16, full_to_sliding=pool.full_to_sliding) for pool in pools)
    rank0.journal = []
    pool = pools[0]
    first = pool.alloc(8)
    pool.free(pool.alloc(3))  # the sliding free list no longer follows the full one
    rank0.write(0, 0, first)
    pool.free_sliding(first[:5])  # left behind a window
    second = pool.alloc(6)
    rank0.write(1, 0, first)  # a cached prefix: 5 tokens without a sliding slot
    rank0.write(1, 8, second)
    rank0.write(1, 14, second[:0])
    new = pool.alloc(1)  # a decode token at position 14 of row 1, as the step builder writes it
    rank0.write_at(torch.tensor([1]), torch.tensor([14]), new)
    message = StepMessage(rank0.journal, [5], [14], new.tolist(), [1], [14], [1], [15], [0], [0],
                          pool.full_to_sliding[new].tolist())
    batch = message.batch_on(SimpleNamespace(device=torch.device("cpu"), slot_table=other, pool=pools[1]))
    assert torch.equal(other.table, rank0.table) and torch.equal(other.sliding_table, rank0.sliding_table)
    table, new_sliding = batch.kv_slots(4)  # what a sliding layer of the other rank uses
    assert table is other.sliding_table and new_sliding.tolist() == [int(rank0.sliding_table[1, 14])] != [0]
    assert rank0.sliding_table[0, :5].min() > 0 and rank0.sliding_table[1, :5].eq(0).all()
    assert torch.equal(rank0.sliding_table[1, 8:14], pool.full_to_sliding[second])
    assert pools[1].full_to_sliding.eq(0).all()  # the other rank's map stays empty


def test_every_rank_builds_the_hybrid_layout_with_the_same_sizes(engines):
    tp, whole = engines
    pool = tp.runner.pool
    assert pool.hybrid and pool.sliding_layers == {0, 2} and pool.sliding_window == WINDOW
    assert tp.runner.rank_pool_sizes == [(2048, SLIDING_SLOTS)] * 2  # rank 1's own floor was larger
    assert whole.runner.rank_pool_sizes == [(2048, SLIDING_SLOTS)]
    assert [b.shape[0] for b in pool.k_buffers] == [SLIDING_SLOTS + 1, 2049, SLIDING_SLOTS + 1]
    assert tp.stats()["kv_sliding_slots_total"] == SLIDING_SLOTS


def test_tokens_and_logprobs_of_one_rank_through_sliding_pressure_and_prefix_hits(engines):
    """Two long prompts and two shorter ones at once (windows left behind, slots freed and reused, the
    prefill in chunks of 5 < W), then variants that share long cached prefixes whose sliding slots were
    partly evicted: rank 0's sliding slots and table writes must reach rank 1 every step."""
    tp, whole = engines
    handed_out, evicted = [0], [0]
    pool, tree = tp.runner.pool, tp.tree
    alloc, evict_sliding = pool.alloc, tree.evict_sliding

    def counting_alloc(n):
        slots = alloc(n)
        handed_out[0] += 0 if slots is None else n
        return slots

    def counting_evict(*args, **kwargs):
        before = pool.num_sliding_free
        result = evict_sliding(*args, **kwargs)
        evicted[0] += pool.num_sliding_free - before
        return result

    pool.alloc, tree.evict_sliding = counting_alloc, counting_evict
    try:
        _assert_same(_generate(tp, FIRST), _generate(whole, FIRST))
        assert handed_out[0] > 2 * SLIDING_SLOTS  # more than the pool holds: freed and handed out again
        ours, refs = _generate(tp, VARIANTS), _generate(whole, VARIANTS)
        _assert_same(ours, refs)
    finally:
        del pool.alloc, tree.evict_sliding
    assert evicted[0] > 0  # cached prefixes lost sliding slots
    assert max(cached for _, _, cached in ours) > 3 * WINDOW
    tp.tree.check_integrity()
    assert_no_leak(tp)
    assert_no_leak(whole)
