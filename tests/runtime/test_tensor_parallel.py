"""Tensor parallelism on the CPU: the bundled model split over 2 ranks (gloo) computes what it computes whole.

Each rank is a process of its own that builds a ``ModelRunner`` for its part of the model (the 3 KV
heads split 2 + 1, their query heads with them; the MLP's columns and the vocabulary halved) and runs
the same hand-built steps: a batched prefill of two prompts of different lengths, then two decode
steps that read the KV cache the prefill wrote. Every position's float32 logits must match the whole
model's (summation order differs: all-reduces add the ranks' partial sums) and so must the greedy
tokens. ``TensorParallelLayout`` is also checked on its own for uneven and replicated splits.
"""

from __future__ import annotations

import multiprocessing
import socket

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(runner) -> list[torch.Tensor]:
    """The prefill's logits at every prompt position, then each greedy decode step's logits."""
    from plait.runtime.executor.forward_batch import ForwardBatch

    pool, table = runner.pool, runner.slot_table
    rows, lens = [], []
    for ids in PROMPTS:
        row = table.alloc()
        table.write(row, 0, pool.alloc(len(ids)))
        rows.append(row)
        lens.append(len(ids))
    starts = [sum(lens[:i]) for i in range(len(lens))]
    total = sum(lens)
    batch = ForwardBatch(
        input_ids=torch.tensor([t for ids in PROMPTS for t in ids]),
        positions=torch.cat([torch.arange(n) for n in lens]),
        out_cache_loc=torch.cat([table.table[row, :n] for row, n in zip(rows, lens)]),
        req_rows=torch.tensor(rows), prefix_lens=[0] * len(rows), extend_lens=list(lens), seq_lens=list(lens),
        extend_starts=starts, logits_indices=torch.arange(total), pool=pool, slot_table=table.table,
    )
    outputs = [runner.forward(batch)]
    tokens = outputs[0][torch.tensor([s + n - 1 for s, n in zip(starts, lens)])].argmax(-1)
    for _ in range(DECODE_STEPS):
        slots = []
        for row, n in zip(rows, lens):
            slot = pool.alloc(1)
            table.write(row, n, slot)
            slots.append(slot)
        batch = ForwardBatch(
            input_ids=tokens, positions=torch.tensor(lens), out_cache_loc=torch.cat(slots), req_rows=torch.tensor(rows),
            prefix_lens=list(lens), extend_lens=[1] * len(rows), seq_lens=[n + 1 for n in lens],
            extend_starts=list(range(len(rows))), logits_indices=torch.arange(len(rows)), pool=pool,
            slot_table=table.table,
        )
        outputs.append(runner.forward(batch))
        tokens = outputs[-1].argmax(-1)
        lens = [n + 1 for n in lens]
    return outputs


def _runner():
    from plait.runtime.config import EngineConfig
    from plait.runtime.executor.model_runner import ModelRunner
    from plait.runtime.models.registry import resolve_model

    config = EngineConfig.from_kwargs(model="smollm2-135m-instruct", device="cpu", dtype="float32",
                                      max_total_tokens=256, max_running_requests=4)
    return ModelRunner(config, resolve_model(config.model))


def _rank_main(rank: int, size: int, port: int, results) -> None:
    import torch.distributed as dist

    from plait.runtime.distributed import TensorParallelGroup, set_tensor_parallel

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        set_tensor_parallel(TensorParallelGroup(rank, size))
        runner = _runner()
        weights = sum(p.numel() for p in runner.model.parameters())
        results.put((rank, weights, [t.numpy() for t in _steps(runner)]))
        dist.destroy_process_group()
    except BaseException as exc:  # reported to the test, which names the rank
        results.put((rank, None, f"{type(exc).__name__}: {exc}"))


def test_two_ranks_over_gloo_compute_the_whole_models_logits(bundled_model_dir):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    ranks = [ctx.Process(target=_rank_main, args=(r, 2, port, results), daemon=True) for r in range(2)]
    for process in ranks:
        process.start()
    whole = _runner()
    expected = _steps(whole)
    whole_weights = sum(p.numel() for p in whole.model.parameters())
    del whole
    got = {}
    for _ in ranks:
        rank, weights, outputs = results.get(timeout=300)
        assert weights is not None, f"rank {rank} failed: {outputs}"
        got[rank] = (weights, outputs)
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    # each rank holds about half the weights (norms are replicated, the vocabulary and heads split)
    assert all(weights < 0.6 * whole_weights for weights, _ in got.values())
    for rank, (_, outputs) in got.items():
        assert len(outputs) == len(expected)
        for step, (out, ref) in enumerate(zip(outputs, expected)):
            out = torch.from_numpy(out)
            assert out.shape == ref.shape, (rank, step)
            assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (rank, step, (out - ref).abs().max().item())
            assert torch.equal(out.argmax(-1), ref.argmax(-1)), (rank, step)
            logprobs, ref_logprobs = out.log_softmax(-1), ref.log_softmax(-1)
            assert (logprobs - ref_logprobs).abs().max().item() < 1e-4, (rank, step)
