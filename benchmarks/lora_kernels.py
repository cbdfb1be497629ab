"""Batched LoRA kernels on the GPU (``plait.runtime.kernels.lora``) against their bandwidth floor.

For each Llama-3.1-8B linear module (q, k, v, o, gate, up, down), batch size (``--batches``) and number
of distinct adapters in the batch (``--adapters``, at most one per token), prints the time of one
``lora_shrink`` and one ``lora_expand`` in each kernel layout (gathered / segmented, ``--kernels``),
each next to its floor: the bytes it must move (the distinct adapters' A or B, x, h, and y read and
written) over the measured device-to-device copy bandwidth. The last lines sum a decoder layer (all
seven modules) and set it beside the base model's own seven GEMMs (cuBLAS) at the same batch.

Tokens take their adapters in a random order (a decode batch; ``--sorted`` gives runs of one adapter,
as in prefill chunks). Weights, inputs and outputs rotate over enough copies to leave the L2 cache
cold, as in a model step where every layer reads new weights; each figure is a CUDA-graph replay of
back-to-back calls.

    python benchmarks/lora_kernels.py --batches 64,256 --adapters 1,8,64,256 --rank 16
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import torch

LLAMA_8B_MODULES = {  # name: (in features K, out features N)
    "q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
    "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096),
}
L2_COLD_BYTES = 256 << 20  # rotate over at least this many bytes
MAX_COPIES = 64


def _gpu_timing_helpers():
    """``copy_bandwidth`` and ``graph_time_us`` of ``benchmarks/skinny_gemm.py`` (one copy of each)."""
    path = Path(__file__).resolve().parent / "skinny_gemm.py"
    spec = importlib.util.spec_from_file_location("benchmarks_skinny_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.copy_bandwidth, module.graph_time_us


copy_bandwidth, graph_time_us = _gpu_timing_helpers()


def _copies(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(L2_COLD_BYTES / max(nbytes, 1))))


def token_slots(tokens: int, adapters: int, sorted_runs: bool, gen: torch.Generator) -> torch.Tensor:
    """int32 [tokens] over ``adapters`` slots, each used; shuffled unless ``sorted_runs``."""
    slots = torch.arange(tokens, dtype=torch.int32) % adapters
    if sorted_runs:
        return slots.sort().values.cuda()
    return slots[torch.randperm(tokens, generator=gen)].cuda()


def bench_module(k: int, n: int, tokens: int, adapters: int, rank: int, kernels: list[str], bandwidth: float,
                 sorted_runs: bool) -> tuple[dict[str, tuple[float, float]], float, float]:
    """({kernel: (shrink us, expand us)}, shrink floor us, expand floor us) for one module."""
    from plait.runtime.kernels.lora import lora_expand_triton, lora_shrink_triton

    gen = torch.Generator().manual_seed(tokens * adapters + n)
    slots = token_slots(tokens, adapters, sorted_runs, gen)
    dt = torch.bfloat16
    a_bytes, b_bytes = adapters * rank * k * 2, adapters * n * rank * 2
    na, nb = _copies(a_bytes + tokens * k * 2), _copies(b_bytes + tokens * n * 2)
    lora_a = [torch.randn(adapters, rank, k, device="cuda", dtype=dt) / 64 for _ in range(na)]
    xs = [torch.randn(tokens, k, device="cuda", dtype=dt) for _ in range(na)]
    lora_b = [torch.randn(adapters, n, rank, device="cuda", dtype=dt) / 64 for _ in range(nb)]
    ys = [torch.zeros(tokens, n, device="cuda", dtype=dt) for _ in range(nb)]
    scaling = torch.full((adapters,), 2.0, device="cuda")
    h = torch.randn(tokens, rank, device="cuda")
    shrink_floor = (a_bytes + tokens * k * 2 + tokens * rank * 4) / bandwidth * 1e6
    expand_floor = (b_bytes + tokens * rank * 4 + 2 * tokens * n * 2) / bandwidth * 1e6
    results = {}
    for kernel in kernels:
        shrink = graph_time_us(lambda i, kernel=kernel: lora_shrink_triton(xs[i % na], lora_a[i % na], slots, out=h,
                                                                           kernel=kernel),
                               max(na, 8))
        expand = graph_time_us(
            lambda i, kernel=kernel: lora_expand_triton(h, lora_b[i % nb], slots, scaling, ys[i % nb], kernel=kernel),
            max(nb, 8))
        results[kernel] = (shrink, expand)
    return results, shrink_floor, expand_floor


def base_gemm_us(k: int, n: int, tokens: int) -> float:
    """cuBLAS time of the base module's own ``x [tokens, k] @ W [n, k]^T`` (cold weights)."""
    copies = _copies(n * k * 2)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16)
    return graph_time_us(lambda i: torch.matmul(x, weights[i % copies].t(), out=out), max(copies, 8))


def check_correct(rank: int) -> None:
    """Both layouts against the torch reference on one mixed batch (with base-model tokens)."""
    from plait.runtime.kernels.lora import (
        lora_expand_reference,
        lora_expand_triton,
        lora_shrink_reference,
        lora_shrink_triton,
    )

    tokens, k, n, adapters = 200, 4096, 1024, 8
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(adapters, rank, k, device="cuda", dtype=torch.bfloat16) / 64
    b = torch.randn(adapters, n, rank, device="cuda", dtype=torch.bfloat16) / 64
    slots = torch.randint(-1, adapters, (tokens,), device="cuda", dtype=torch.int32)
    scaling = torch.rand(adapters, device="cuda")
    h_ref = lora_shrink_reference(x, a, slots)
    y_ref = torch.zeros(tokens, n, device="cuda", dtype=torch.bfloat16)
    lora_expand_reference(h_ref, b, slots, scaling, y_ref)
    for kernel in ("gathered", "segmented"):
        h = lora_shrink_triton(x, a, slots, kernel=kernel)
        y = torch.zeros_like(y_ref)
        lora_expand_triton(h, b, slots, scaling, y, kernel=kernel)
        for name, got, ref in (("shrink", h, h_ref), ("expand", y, y_ref)):
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            if err > 2e-2:
                raise SystemExit(f"{kernel} {name} is wrong: relative error {err:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256", help="tokens per batch, comma-separated")
    parser.add_argument("--adapters", default="1,8,64,256", help="distinct adapters per batch, comma-separated")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (every adapter)")
    parser.add_argument("--modules", default=",".join(LLAMA_8B_MODULES),
                        help=f"modules of {list(LLAMA_8B_MODULES)}, comma-separated")
    parser.add_argument("--kernels", default="gathered,segmented", help="kernel layouts, comma-separated")
    parser.add_argument("--sorted", action="store_true", help="tokens in runs of one adapter (prefill order)")
    args = parser.parse_args()
    modules = args.modules.split(",")
    unknown = [m for m in modules if m not in LLAMA_8B_MODULES]
    if unknown:
        parser.error(f"unknown modules {unknown}")
    kernels = args.kernels.split(",")
    if not torch.cuda.is_available():
        raise SystemExit("lora_kernels.py needs a CUDA GPU")

    check_correct(args.rank)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s; torch {torch.__version__}; "
          f"rank {args.rank}; {'sorted' if args.sorted else 'shuffled'} slots")
    print("us per call (floor / time); 'layer' sums the modules")
    header = "".join(f" {k + ' shrink':>18} {k + ' expand':>18}" for k in kernels)
    print(f"{'module':>6} {'tokens':>6} {'adapt':>5} {'floor s/e':>11}{header}")
    for tokens in (int(v) for v in args.batches.split(",")):
        base_total = sum(base_gemm_us(*LLAMA_8B_MODULES[m], tokens) for m in modules)
        for adapters in (int(v) for v in args.adapters.split(",")):
            if adapters > tokens:
                continue
            totals = {kernel: 0.0 for kernel in kernels}
            floor_total = 0.0
            for module in modules:
                k, n = LLAMA_8B_MODULES[module]
                results, fs, fe = bench_module(k, n, tokens, adapters, args.rank, kernels, bandwidth, args.sorted)
                floor_total += fs + fe
                cells = ""
                for kernel in kernels:
                    s, e = results[kernel]
                    totals[kernel] += s + e
                    cells += f" {s:9.1f} ({fs / s:.2f})  {e:9.1f} ({fe / e:.2f})"
                print(f"{module:>6} {tokens:6d} {adapters:5d} {fs:5.1f}/{fe:5.1f}{cells}", flush=True)
            line = "  ".join(f"{kernel} {us:7.1f} us ({floor_total / us:.2f}, {us / base_total:.1%} of base)"
                             for kernel, us in totals.items())
            print(f" layer {tokens:6d} {adapters:5d} floor {floor_total:6.1f} us; base GEMMs {base_total:7.1f} us; {line}",
                  flush=True)


if __name__ == "__main__":
    main()
