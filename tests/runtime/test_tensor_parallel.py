"""Tensor parallelism on the CPU: the bundled model split over 2 ranks (gloo) computes what it computes whole.

``Engine(tp_size=2)`` runs rank 0 in the test's process and rank 1 in a process of its own, each
holding its part of the model (the 3 KV heads split 2 + 1, their query heads with them; the MLP's
columns and the vocabulary halved). Hand-built steps on rank 0's runner (a batched prefill of two
prompts of different lengths, then decode steps that read the KV cache it wrote) must give the whole
model's float32 logits at every position (summation order differs: all-reduces add the ranks'
partial sums); the engine's greedy tokens must be transformers' through retraction, chunked prefill
and prefix hits; a killed rank must end requests with a clear error, never a hang.
``TensorParallelLayout`` is also checked on its own for uneven and replicated splits.
"""

from __future__ import annotations

import pytest
import torch

from plait.runtime.distributed import TensorParallelLayout, split_range
from plait.runtime.models.config import ModelConfig

pytestmark = pytest.mark.model

PROMPTS = [[1, 9690, 28, 2683, 359, 253, 5356, 5646, 30, 2], [1, 4794, 314, 260, 3575, 282, 4649, 47]]
DECODE_STEPS = 2


def _config(**changes) -> ModelConfig:
    base = dict(model_type="llama", hidden_size=64, num_layers=1, num_heads=9, num_kv_heads=3, head_dim=8,
                intermediate_size=96, vocab_size=101, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64)
    return ModelConfig(**{**base, **changes})


def test_split_range_covers_everything_once():
    for total in range(0, 20):
        for parts in range(1, 6):
            ranges = [split_range(total, parts, i) for i in range(parts)]
            assert sum(count for _, count in ranges) == total
            assert [start for start, _ in ranges] == [sum(c for _, c in ranges[:i]) for i in range(parts)]
            assert max(c for _, c in ranges) - min(c for _, c in ranges) <= 1


def test_layout_keeps_query_heads_with_their_kv_head():
    cfg = _config()  # 9 query heads in 3 groups of 3
    ranks = [TensorParallelLayout.for_model(cfg, r, 2) for r in range(2)]
    assert [(lay.kv_head_start, lay.kv_head_count) for lay in ranks] == [(0, 2), (2, 1)]
    assert [(lay.head_start, lay.head_count) for lay in ranks] == [(0, 6), (6, 3)]
    assert [(lay.intermediate_start, lay.intermediate_count) for lay in ranks] == [(0, 48), (48, 48)]
    assert [(lay.vocab_start, lay.vocab_count, lay.vocab_rows) for lay in ranks] == [(0, 51, 51), (51, 50, 51)]
    local = ranks[1].local_config(cfg)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (3, 1, 48, 101)
    assert TensorParallelLayout.for_model(cfg).local_config(cfg) is cfg


def test_layout_replicates_kv_heads_over_more_ranks():
    cfg = _config(num_heads=8, num_kv_heads=2)
    ranks = [TensorParallelLayout.for_model(cfg, r, 4) for r in range(4)]
    assert [(lay.head_start, lay.head_count) for lay in ranks] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [(lay.kv_head_start, lay.kv_head_count) for lay in ranks] == [(0, 1), (0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("changes, size, message", [
    (dict(num_heads=9, num_kv_heads=3), 4, "multiple"),  # 3 KV heads over 4 ranks
    (dict(num_heads=6, num_kv_heads=2), 4, "divide"),  # 6 query heads over 4 ranks
    (dict(intermediate_size=1), 2, "intermediate"),
])
def test_layout_refuses_splits_it_cannot_make(changes, size, message):
    with pytest.raises(ValueError, match=message):
        TensorParallelLayout.for_model(_config(**changes), 0, size)


def _steps(runner) -> list[torch.Tensor]:
    """The prefill's logits at every prompt position, then each greedy decode step's logits (the slots
    and rows it takes are given back at the end)."""
    from plait.runtime.executor.forward_batch import ForwardBatch

    pool, table = runner.pool, runner.slot_table
    rows, lens, taken = [], [], []
    for ids in PROMPTS:
        row = table.alloc()
        slots = pool.alloc(len(ids))
        table.write(row, 0, slots)
        rows.append(row)
        lens.append(len(ids))
        taken.append(slots)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    batch = ForwardBatch(
        input_ids=torch.tensor([t for ids in PROMPTS for t in ids]),
        positions=torch.cat([torch.arange(n) for n in lens]),
        out_cache_loc=torch.cat(taken), req_rows=torch.tensor(rows), prefix_lens=[0] * len(rows),
        extend_lens=list(lens), seq_lens=list(lens), extend_starts=starts, logits_indices=torch.arange(sum(lens)),
        pool=pool, slot_table=table.table,
    )
    outputs = [runner.forward(batch)]
    tokens = outputs[0][torch.tensor([s + n - 1 for s, n in zip(starts, lens)])].argmax(-1)
    for _ in range(DECODE_STEPS):
        slots = [pool.alloc(1) for _ in rows]
        taken.extend(slots)
        for row, n, slot in zip(rows, lens, slots):  # what the engine's step builder does before a forward
            table.write(row, n, slot)
        batch = ForwardBatch(
            input_ids=tokens, positions=torch.tensor(lens), out_cache_loc=torch.cat(slots), req_rows=torch.tensor(rows),
            prefix_lens=list(lens), extend_lens=[1] * len(rows), seq_lens=[n + 1 for n in lens],
            extend_starts=list(range(len(rows))), logits_indices=torch.arange(len(rows)), pool=pool,
            slot_table=table.table,
        )
        outputs.append(runner.forward(batch))
        tokens = outputs[-1].argmax(-1)
        lens = [n + 1 for n in lens]
    for slots in taken:
        pool.free(slots)
    for row in rows:
        table.free(row)
    return outputs


def _runner():
    from plait.runtime.config import EngineConfig
    from plait.runtime.executor.model_runner import ModelRunner
    from plait.runtime.models.registry import resolve_model

    config = EngineConfig.from_kwargs(model="smollm2-135m-instruct", device="cpu", dtype="float32",
                                      max_total_tokens=256, max_running_requests=4)
    return ModelRunner(config, resolve_model(config.model))


@pytest.fixture(scope="module")
def tp_engine(bundled_model_dir, varied_prompt_ids):
    """Engine(tp_size=2) with a pool too small for every varied prompt at once (retractions follow);
    ``test_shutdown_stops_the_other_ranks`` ends it."""
    from plait.runtime.engine import Engine

    total = max(len(ids) for ids in varied_prompt_ids) + 40
    engine = Engine(model=str(bundled_model_dir), tp_size=2, max_total_tokens=total, chunked_prefill_size=16,
                    schedule_conservativeness=0)
    yield engine
    engine.shutdown()


def test_two_ranks_over_gloo_compute_the_whole_models_logits(tp_engine):
    """Rank 0's runner (which sends each step to rank 1) against the whole model, position by position."""
    expected = _steps(_runner())
    outputs = _steps(tp_engine.runner)
    assert tp_engine.runner.model.layout.size == 2
    assert len(outputs) == len(expected)
    for step, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.shape == ref.shape, step
        assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (step, (out - ref).abs().max().item())
        assert torch.equal(out.argmax(-1), ref.argmax(-1)), step
        assert (out.log_softmax(-1) - ref.log_softmax(-1)).abs().max().item() < 1e-4, step


def test_a_tensor_parallel_engine_matches_transformers_through_retraction_and_prefix_hits(
        tp_engine, varied_prompt_ids, hf_greedy):
    """Engine(tp_size=2): the scheduler runs once (rank 0) and the other rank follows each step. With
    a pool too small for every request (evictions, retractions), chunked prefill, then the same prompts
    again from the prefix cache, the greedy tokens are transformers'."""
    from tests.runtime.engine_helpers import assert_no_leak, greedy_params

    assert tp_engine.overlap is False
    outs = tp_engine.generate(input_ids=varied_prompt_ids, sampling_params=greedy_params())
    assert [o["output_ids"] for o in outs] == hf_greedy
    assert tp_engine.stats()["retractions"] > 0
    again = tp_engine.generate(input_ids=varied_prompt_ids[:2], sampling_params=greedy_params())
    assert [o["output_ids"] for o in again] == hf_greedy[:2]
    assert sum(o["meta_info"]["cached_tokens"] for o in again) > 0
    assert_no_leak(tp_engine)


def test_shutdown_stops_the_other_ranks(tp_engine):
    """(Shuts the module's engine down: it runs after the tests that use it.)"""
    rank = tp_engine._tp.processes[0]
    tp_engine.shutdown()
    rank.join(timeout=30)
    assert rank.exitcode == 0
    tp_engine.shutdown()  # a second shutdown is harmless


def test_a_dead_rank_fails_requests_clearly_and_nothing_hangs(bundled_model_dir, chat_ids):
    import threading

    from plait.runtime.engine import Engine

    engine = Engine(model=str(bundled_model_dir), tp_size=2, max_total_tokens=512, max_running_requests=2)
    longest = engine.runner.pool.capacity - len(chat_ids) - 1  # still running when its rank is killed
    stream = engine.generate(input_ids=chat_ids, sampling_params={"max_new_tokens": longest, "ignore_eos": True},
                             stream=True)
    next(stream)
    engine._tp.processes[0].kill()
    finished = []
    reader = threading.Thread(target=lambda: finished.extend(stream), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the stream hung after a rank died"
    reason = finished[-1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and ("rank 1" in reason["message"] or "group" in reason["message"]), reason
    with pytest.raises(RuntimeError, match="died"):
        engine.generate(input_ids=chat_ids, sampling_params={"max_new_tokens": 2})
    done = threading.Thread(target=engine.shutdown, daemon=True)
    done.start()
    done.join(timeout=60)
    assert not done.is_alive(), "shutdown hung after a rank died"
