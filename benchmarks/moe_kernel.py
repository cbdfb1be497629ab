"""fused_moe kernel benchmark (CUDA): time per call next to the floor it implies, measured in the same run.

Shapes: GPT-OSS-120B (E=128, top-4, H=I=2880, MXFP4 experts, swiglu_oai, biases), GPT-OSS-20B (E=32,
same experts) and Qwen3-30B-A3B (E=128, top-8, H=2048, I=768, bf16, silu), at T = 1 .. 4096 tokens
with uniform random routing (distinct experts per token).

Time: ``ROUTINGS`` calls with different routings and tokens captured in one CUDA graph (so the
experts touched differ from call to call and the L2 does not keep them), median of the replays over
the calls. Floor: the larger of
  bytes  = expected distinct experts E * (1 - (1 - k/E)^T) * bytes per expert + x and out, over the
           device-to-device copy bandwidth (read + write) measured first;
  FLOPs  = 6 * T * k * H * I (the two GEMMs), over a measured 8192^3 bf16 matmul rate.

Usage: python benchmarks/moe_kernel.py [--models gpt-oss-120b,qwen3-30b-a3b] [--tokens 1,64]
       python benchmarks/moe_kernel.py --tune [--models ...] [--tokens ...]
MXFP4 experts are K-swizzled as the engine holds them on a GPU (``mxfp4.swizzle_k``); for MXFP4 shapes
each T is also timed with the other implementation of the swapped GEMM (``fused_moe_triton.USE_GLUON``
flipped: the Gluon kernel where it applies), with the other MXFP4 decode (``swap_ab`` flipped) on the
same tiling, and with the table's tiling on codes in the natural (checkpoint) order. --tune times candidate tilings per shape and token count (coordinate search: swap_ab for
MXFP4, block_m, then the up
GEMM's tile, then the down GEMM's, then group_m) and prints the winners as entries for
``plait/runtime/kernels/fused_moe_config.py``'s TUNED table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, replace

import torch

from plait.runtime.kernels import fused_moe_triton
from plait.runtime.kernels.fused_moe import fused_moe
from plait.runtime.kernels.fused_moe_config import FusedMoeConfig, MoeShape, TileConfig, get_config, token_bucket
from plait.runtime.kernels.mxfp4 import Mxfp4Weight, random_mxfp4

ROUTINGS = 8


@dataclass(frozen=True)
class Model:
    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    weight_format: str  # "mxfp4" or "bfloat16"
    activation: str
    bias: bool

    @property
    def shape(self) -> MoeShape:
        return MoeShape(self.num_experts, self.hidden, self.intermediate, self.top_k, self.weight_format)

    @property
    def expert_bytes(self) -> float:
        params = 3 * self.hidden * self.intermediate
        per_param = 0.5 + 1 / 32 if self.weight_format == "mxfp4" else 2
        return params * per_param + (2 * (2 * self.intermediate + self.hidden) if self.bias else 0)


MODELS = {m.name: m for m in (
    Model("gpt-oss-120b", 128, 4, 2880, 2880, "mxfp4", "swiglu_oai", True),
    Model("gpt-oss-20b", 32, 4, 2880, 2880, "mxfp4", "swiglu_oai", True),
    Model("qwen3-30b-a3b", 128, 8, 2048, 768, "bfloat16", "silu", False),
)}
TOKENS = (1, 8, 64, 256, 1024, 4096)


def measure_machine() -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), medians of CUDA-event timings."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _median_s(lambda: dst.copy_(src), 10)
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_s = _median_s(lambda: torch.mm(a, b), 10)
    return 2 * (2 << 30) / copy_s, 2 * n**3 / mm_s


def _median_s(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def make_weights(model: Model, gen: torch.Generator, pack: bool = False):
    """(w13, w2, b13, b2) on the GPU; MXFP4 codes K-swizzled and row-paired (``pack``: also fragment-packed),
    as the engine's MoE layer holds them."""
    E, H, I = model.num_experts, model.hidden, model.intermediate
    if model.weight_format == "mxfp4":
        w13 = random_mxfp4(E, 2 * I, H, gen, "cuda").swizzled(pack=pack)
        w2 = random_mxfp4(E, H, I, gen, "cuda").swizzled(pack=pack)
    else:
        w13 = torch.randn(E, 2 * I, H, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E, H, I, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    b13 = torch.randn(E, 2 * I, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.1 if model.bias else None
    b2 = torch.randn(E, H, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.1 if model.bias else None
    return w13, w2, b13, b2


def make_calls(model: Model, T: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """ROUTINGS (x, topk_weights, topk_ids) triples with independent uniform routing."""
    calls = []
    for _ in range(ROUTINGS):
        x = torch.randn(T, model.hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
        ids = torch.rand(T, model.num_experts, device="cuda", generator=gen).topk(model.top_k, dim=-1).indices
        tw = torch.softmax(torch.randn(T, model.top_k, device="cuda", generator=gen), dim=-1)
        calls.append((x, tw, ids.to(torch.int32)))
    return calls


def time_config(model: Model, weights, calls, config: FusedMoeConfig | None, replays: int = 7) -> float:
    """Seconds per call: all ``calls`` in one CUDA graph, median replay over the number of calls."""
    w13, w2, b13, b2 = weights

    def run_all():
        return [fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=model.activation, config=config)
                for x, tw, ids in calls]

    run_all()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    seconds = _median_s(graph.replay, replays) / len(calls)
    del graph
    return seconds


def floor_s(model: Model, T: int, copy_bw: float, mm_rate: float) -> tuple[float, float]:
    """(bytes floor, FLOPs floor) in seconds."""
    E, k = model.num_experts, model.top_k
    distinct = E * (1 - (1 - k / E) ** T)
    nbytes = distinct * model.expert_bytes + 2 * T * model.hidden * 2  # experts touched, x in, out
    flops = 6 * T * k * model.hidden * model.intermediate
    return nbytes / copy_bw, flops / mm_rate


def benchmark(models: list[Model], tokens: list[int], pack: bool = False) -> list[str]:
    copy_bw, mm_rate = measure_machine()
    lines = [f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s (read + write), "
             f"bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s", "",
             "| model | T | fused_moe us | floor us (bytes / FLOPs) | of floor | weights GB/s | TFLOP/s | tiling |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in models:
        weights = make_weights(model, gen, pack=pack and model.weight_format == "mxfp4")
        natural = unpaired = packed = None
        if model.weight_format == "mxfp4":
            w13, w2, b13, b2 = weights
            natural = (Mxfp4Weight(w13.natural_blocks(), w13.scales), Mxfp4Weight(w2.natural_blocks(), w2.scales),
                       b13, b2)
            unpaired = (natural[0].swizzled(pair=False), natural[1].swizzled(pair=False), b13, b2)
            packed = (natural[0].swizzled(pack=True), natural[1].swizzled(pack=True), b13, b2)
        for T in tokens:
            calls = make_calls(model, T, gen)
            mem_s, flop_s = floor_s(model, T, copy_bw, mm_rate)
            fl = max(mem_s, flop_s)
            distinct = model.num_experts * (1 - (1 - model.top_k / model.num_experts) ** T)
            config = get_config(model.shape, T)
            default = fused_moe_triton.USE_GLUON
            variants = [(config, weights, "", default)]
            if model.weight_format == "mxfp4":  # the other swapped GEMM; the other MXFP4 decode; natural order
                if config.swap_ab:  # the Gluon GEMM reads codes that are not row-paired
                    variants.append((config, unpaired, " (Triton kernel, codes not row-paired)" if default
                                     else " (Gluon kernel where usable, codes not row-paired)", not default))
                if not weights[0].fragment_packed:  # packed codes are read by the swapped product only
                    variants.append((replace(config, swap_ab=not config.swap_ab), weights, " (not the table choice)",
                                     default))
                variants.append((config, natural, " (codes in natural order)", default))
                variants.append((config, unpaired, " (codes K-swizzled, not row-paired)", default))
                if config.swap_ab and not weights[0].fragment_packed:  # the sm_90 decode of packed codes
                    variants.append((config, packed, " (codes fragment-packed)", default))
            for variant, held, note, use_gluon in variants:
                fused_moe_triton.USE_GLUON = use_gluon
                try:
                    s = time_config(model, held, calls, variant)
                finally:
                    fused_moe_triton.USE_GLUON = default
                lines.append(
                    f"| {model.name} | {T} | {s * 1e6:.1f} | {fl * 1e6:.1f} ({mem_s * 1e6:.1f} / {flop_s * 1e6:.1f}) "
                    f"| {fl / s:.0%} | {distinct * model.expert_bytes / s / 1e9:.0f} | "
                    f"{6 * T * model.top_k * model.hidden * model.intermediate / s / 1e12:.0f} | "
                    f"{variant.short()}{note} |")
                print(lines[-1], flush=True)
        del weights, natural, unpaired, packed
        torch.cuda.empty_cache()
    return lines


def tile_candidates(decode: bool) -> list[TileConfig]:
    """Tilings tried for one GEMM: narrow ones with long K chunks for decode, wide ones for prefill."""
    if decode:
        return [TileConfig(*c) for c in ((32, 128, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3), (64, 256, 4, 3),
                                         (128, 128, 4, 3), (16, 256, 4, 3), (64, 128, 4, 5), (32, 128, 2, 4),
                                         (32, 128, 4, 3, 2), (32, 128, 4, 3, 4), (64, 128, 4, 3, 4),
                                         (64, 256, 4, 3, 4), (128, 128, 4, 3, 8), (64, 128, 4, 4, 8),
                                         (16, 128, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3),
                                         (16, 128, 4, 3, 2), (32, 64, 2, 3), (64, 128, 4, 3, 2), (64, 256, 4, 4, 2),
                                         (128, 64, 4, 3, 2), (128, 128, 4, 3, 2), (64, 64, 4, 4))]
    # (8-warp decode tilings, two warpgroups a program, lost by 8-60% at GPT-OSS-120B's T = 1, 4, 64 on an
    # H200, 2026-11-30: not tried any more)
    return [TileConfig(*c) for c in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 128, 4, 3),
                                     (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 5), (128, 128, 8, 4))]


REGISTER_CAPS = (None, 168, 128, 96)


def tune_one(model: Model, weights, calls, T: int) -> tuple[FusedMoeConfig, float, float]:
    """Coordinate search from the current choice; returns (best, its seconds, the start's seconds)."""
    start = get_config(model.shape, T)
    w13, w2, b13, b2 = weights
    x, tw, ids = calls[0]
    reference = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=model.activation, config=start).float()

    def cost(cfg: FusedMoeConfig) -> float:
        try:
            out = fused_moe(x, w13, w2, tw, ids, b13=b13, b2=b2, activation=model.activation, config=cfg).float()
        except Exception as exc:  # a tiling that does not compile (shared memory, registers) is skipped
            print(f"  skip {cfg.short()}: {type(exc).__name__}", file=sys.stderr)
            return float("inf")
        if ((out - reference).norm() / reference.norm()).item() > 2e-2:
            print(f"  skip {cfg.short()}: wrong result", file=sys.stderr)
            return float("inf")
        seconds = time_config(model, weights, calls, cfg, replays=5)
        print(f"  {cfg.short()}: {seconds * 1e6:.1f} us", file=sys.stderr, flush=True)
        return seconds

    best, best_s = start, cost(start)
    start_s = best_s
    rows_per_expert = T * model.top_k / model.num_experts
    decode = rows_per_expert <= 16
    steps = [  # each proposes variations of the best so far
        lambda b: [replace(b, swap_ab=not b.swap_ab)] if model.weight_format == "mxfp4" else [],
        # decode sizes try 32 rows a block too once an expert averages more than 4 pairs: with 16, the
        # experts that draw more than 16 pairs (many, at 8-16 on average) get two row blocks and have
        # their weights decoded twice (GPT-OSS-120B's T=512 took 35% longer than T=256 on 16-row blocks)
        lambda b: [replace(b, block_m=m) for m in ((16, 32, 64, 128) if not decode
                                                   else (16, 32) if rows_per_expert > 4 else (16,))],
        lambda b: [replace(b, up=t) for t in tile_candidates(b.block_m <= 16)],
        lambda b: [replace(b, down=t) for t in tile_candidates(b.block_m <= 16)],
        lambda b: [] if decode else [replace(b, group_m=g) for g in (1, 4, 8)],
        # a register cap on the winners: more programs an SM where registers limit them
        lambda b: [replace(b, up=replace(b.up, max_registers=r)) for r in REGISTER_CAPS],
        lambda b: [replace(b, down=replace(b.down, max_registers=r)) for r in REGISTER_CAPS],
    ]
    for propose in steps:
        for cfg in propose(best):
            if cfg == best:
                continue
            s = cost(cfg)
            if s < best_s:
                best, best_s = cfg, s
    return best, best_s, start_s


def _tile_source(t: TileConfig) -> str:
    """A TileConfig as the table's source text."""
    return (f"TileConfig({t.block_n}, {t.block_k}, {t.num_warps}, {t.num_stages}, {t.split_k}"
            + (f", max_registers={t.max_registers})" if t.max_registers is not None else ")"))


def tune(models: list[Model], tokens: list[int], pack: bool = False) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("TUNED entries (printed as found, so a run cut short keeps what it measured):", flush=True)
    entries = []
    for model in models:
        weights = make_weights(model, gen, pack=pack and model.weight_format == "mxfp4")
        for T in tokens:
            calls = make_calls(model, T, gen)
            best, best_s, start_s = tune_one(model, weights, calls, T)
            print(f"{model.name} T={T}: {best.short()} {best_s * 1e6:.1f} us (was {start_s * 1e6:.1f})", flush=True)
            u, d = best.up, best.down
            entries.append(
                f"    ({model.shape!r}, {token_bucket(T)}): FusedMoeConfig({best.block_m}, "
                f"{_tile_source(u)}, {_tile_source(d)}, "
                f"group_m={best.group_m}"
                + (", swap_ab=True" if best.swap_ab else "") + "),")
            print(entries[-1], flush=True)
        del weights
        torch.cuda.empty_cache()
    return entries + [f"{len(entries)} entries tuned"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--tune", action="store_true", help="time candidate tilings, print the winners")
    parser.add_argument("--out", help="also write the output lines to this file")
    parser.add_argument("--packed", action="store_true",
                        help="MXFP4 codes fragment-packed (mxfp4.pack_fragments) for the timed table choice and the "
                        "tuner; the benchmark also times them as a variant either way")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    models = [MODELS[name] for name in args.models.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    lines = tune(models, tokens, args.packed) if args.tune else benchmark(models, tokens, args.packed)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
