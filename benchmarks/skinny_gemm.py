"""Batched-decode GEMMs on the GPU: cuBLAS against the TMA kernel of ``plait.runtime.kernels.skinny_gemm``.

For each Llama-3.1-8B linear shape (or ``--shapes N:K,...``) and each row count (``--rows``), prints the
time of cuBLAS (``F.linear``, the library's default and with cuBLASLt preferred) and of the best
tiling of the TMA kernel, each against the bandwidth floor (weight, input and output bytes over the
measured device-to-device copy bandwidth). The weights rotate over enough copies to leave the L2
cache cold, as in a model step where every layer reads new weights; each figure is a CUDA-graph
replay of back-to-back calls.

    python benchmarks/skinny_gemm.py --rows 64,128,256
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

LLAMA_8B_SHAPES = {  # name: (N, K) of W [N, K]
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
L2_COLD_BYTES = 256 << 20  # rotate over at least this many weight bytes


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of a 2 GiB buffer)."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 2 * 10 / (start.elapsed_time(end) / 1e3)


def graph_time_us(fn, calls: int) -> float:
    """Mean time of one of ``calls`` back-to-back ``fn(i)`` calls, replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    del graph
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="64,128,256", help="row counts (batch sizes), comma-separated")
    parser.add_argument("--shapes", default=None, help="N:K pairs, comma-separated (default: Llama-3.1-8B's)")
    parser.add_argument("--keep", type=int, default=6,
                        help="tilings kept per row count after the first sweep on the widest shape")
    args = parser.parse_args()
    from plait.runtime.kernels.skinny_gemm import candidate_configs, skinny_gemm

    shapes = LLAMA_8B_SHAPES if args.shapes is None else {
        item: tuple(int(v) for v in item.split(":")) for item in args.shapes.split(",")}
    rows_list = [int(r) for r in args.rows.split(",")]
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s; torch {torch.__version__}")
    sweep_shape = max(shapes, key=lambda name: shapes[name][0] * shapes[name][1] if shapes[name][0] < 100_000 else 0)
    print(f"{'shape':>8} {'rows':>5} {'floor us':>9} {'cuBLAS':>14} {'cuBLASLt':>14} {'TMA kernel':>14}  tiling")
    for rows in rows_list:
        kept = None
        for name in [sweep_shape] + [s for s in shapes if s != sweep_shape]:
            n, k = shapes[name]
            copies = max(2, math.ceil(L2_COLD_BYTES / (n * k * 2)))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
            calls = max(copies, 8)
            floor_us = (n * k + rows * (n + k)) * 2 / bandwidth * 1e6
            torch.backends.cuda.preferred_blas_library("cublas")
            cublas = graph_time_us(lambda i: torch.matmul(x, weights[i % copies].t(), out=out), calls)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            cublaslt = graph_time_us(lambda i: torch.matmul(x, weights[i % copies].t(), out=out), calls)
            torch.backends.cuda.preferred_blas_library("cublas")
            reference = F.linear(x, weights[0])
            timed = []
            t0 = time.perf_counter()
            for config in kept if kept is not None else candidate_configs(rows):
                try:
                    got = skinny_gemm(x, weights[0], config)
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a tiling that does not fit this card is skipped
                    print(f"   skipped {config}: {type(exc).__name__}")
                    continue
                error = (got.float() - reference.float()).abs().max().item()
                if error > 0.05 * reference.float().abs().max().item():
                    print(f"   WRONG {config}: max error {error}")
                    continue
                timed.append((graph_time_us(lambda i, c=config: skinny_gemm(x, weights[i % copies], c, out=out),
                                            calls), config))
            timed.sort(key=lambda item: item[0])
            if kept is None:
                kept = [config for _, config in timed[: args.keep]]
                print(f"   ({len(timed)} tilings swept on {name} in {time.perf_counter() - t0:.0f} s)")
            best_us, best = timed[0]

            def cell(us: float) -> str:
                return f"{us:7.1f} ({floor_us / us:.2f})"

            print(f"{name:>8} {rows:5d} {floor_us:9.1f} {cell(cublas):>14} {cell(cublaslt):>14} {cell(best_us):>14}  "
                  f"{best.block_m}x{best.block_n}x{best.block_k} s{best.num_stages} w{best.num_warps}", flush=True)
            del weights


if __name__ == "__main__":
    main()
