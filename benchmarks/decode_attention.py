"""Decode attention (``plait.runtime.kernels.decode_attention``) against its bandwidth floor, and a sweep
of its launch settings, at the decode batches a loaded server runs (GPU only).

    python benchmarks/decode_attention.py                       # Llama-3.1-8B heads, bf16, the defaults
    python benchmarks/decode_attention.py --sweep               # every (block_n, warps, stages)
    python benchmarks/decode_attention.py --heads 64 --head-dim 64   # GPT-OSS heads

Each case is B requests of ``seq`` keys (32 query heads, 8 KV heads, D=128 by default); every request's
keys sit in consecutive pool slots, as after a prefill. Times are CUDA-graph replays of 20 launches
(a launch of a ~20 us kernel from Python costs more than the kernel), median of 5. The floor is the K
and V bytes over the card's device-to-device copy bandwidth (read + write), measured first as
``plait bench`` measures it.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from plait.bench.gpu import Sizes, measure_machine
from plait.runtime.kernels.decode_attention import (
    MIN_TOKENS_PER_SPLIT,
    alloc_decode_workspace,
    decode_attention,
    decode_attention_bytes,
    num_kv_splits_cap,
)


def graph_time(fn, launches: int = 20, repeats: int = 5) -> float:
    """Seconds per call of ``fn``, from replays of a CUDA graph of ``launches`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return statistics.median(times)


class Case:
    """One batch shape: queries, a pool holding every request's keys in consecutive slots, metadata."""

    def __init__(self, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_kv_splits: int):
        self.batch, self.seq, self.kv_heads, self.max_kv_splits = batch, seq, kv_heads, max_kv_splits
        slots = batch * seq
        self.q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
        self.k = torch.randn(slots + 1, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.randn(slots + 1, kv_heads, head_dim, dtype=dtype, device=device)
        self.table = (1 + torch.arange(slots, dtype=torch.int32, device=device)).view(batch, seq)
        self.rows = torch.arange(batch, dtype=torch.int64, device=device)
        self.lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
        self.workspace = alloc_decode_workspace(batch, heads, head_dim, max_kv_splits, device)
        self.out = torch.empty_like(self.q)
        self.bytes = decode_attention_bytes(batch * seq, kv_heads, head_dim, self.k.element_size())

    def run(self, grid_splits: int | None = None, **settings) -> float:
        """Seconds a launch; ``grid_splits`` None: the engine's grid (``num_kv_splits_cap``: one pass
        when that is 1), else a two-pass grid of that many splits. Requests get the engine's splits."""
        cap = num_kv_splits_cap(self.batch, self.kv_heads, self.max_kv_splits, self.q.device)
        splits = torch.full((self.batch,), max(1, min(cap, -(-self.seq // MIN_TOKENS_PER_SPLIT))),
                            dtype=torch.int32, device=self.q.device)
        scale = self.q.shape[-1] ** -0.5
        return graph_time(lambda: decode_attention(
            self.q, self.k, self.v, self.table, self.rows, self.lens, scale, num_kv_splits=splits,
            max_kv_splits=grid_splits or cap, workspace=self.workspace, out=self.out, **settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    parser.add_argument("--seqs", type=int, nargs="+", default=[192, 1088])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--max-kv-splits", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="time every setting, print the best five per case")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = measure_machine(device, Sizes()).bandwidth  # the bench's copy bandwidth (read + write)
    print(f"{torch.cuda.get_device_name(device)}; copy bandwidth {bandwidth / 1e9:,.1f} GB/s")
    print("| batch | seq | setting | us | floor us | of floor |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for batch, seq in itertools.product(args.batches, args.seqs):
        case = Case(batch, seq, args.heads, args.kv_heads, args.head_dim, torch.bfloat16, device,
                    args.max_kv_splits)
        floor = case.bytes / bandwidth

        def row(name: str, seconds: float) -> None:
            print(f"| {batch} | {seq} | {name} | {seconds * 1e6:.1f} | {floor * 1e6:.1f} | {floor / seconds:.2f} |")

        cap = num_kv_splits_cap(batch, args.kv_heads, args.max_kv_splits, device)
        row(f"engine ({'one pass' if cap == 1 else f'{cap} splits at most'}), default settings", case.run())
        if not args.sweep:
            continue
        row(f"two passes, grid of {args.max_kv_splits} splits, block_n 64, warps 4, stages 3",
            case.run(args.max_kv_splits, block_n=64, num_warps=4, num_stages=3))
        timed = []
        for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
            try:
                seconds = case.run(block_n=block_n, num_warps=warps, num_stages=stages)
            except Exception as exc:  # e.g. out of shared memory for this tile
                print(f"<!-- block_n {block_n} warps {warps} stages {stages}: {type(exc).__name__} -->")
                continue
            timed.append((seconds, f"engine's grid, block_n {block_n}, warps {warps}, stages {stages}"))
            print(f"<!-- {batch} {seq} {block_n} {warps} {stages}: {seconds * 1e6:.1f} us -->")
        for seconds, name in sorted(timed)[:5]:
            row(name, seconds)
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
