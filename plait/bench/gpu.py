"""The GPU benchmark: measure the card, then plait's engine, in one run; print one markdown table.

Every figure stands next to the floor it implies on this machine (DESIGN.md, "Performance model"):
the copy bandwidth and matmul rate are measured first, in the same run, and the floors come from them.

- decode step floor = max(bytes read / bandwidth, FLOPs / matmul rate), bytes read = weights (input
  embedding excluded unless tied to the head) + batch * average context * KV bytes per token;
- prefill floor = FLOPs / matmul rate, FLOPs = 2 * GEMM parameters per token + causal attention;
- a workload floor (rows c, d) = its prefill floor + its decode steps at their step floors, in waves of
  at most ``max_running_requests``.

Engines: one engine serves rows a, b, c, f and the cache-on half of d; it is then shut down and freed
before a second one (``disable_radix_cache=True``) runs the cache-off half of d. Row e reuses the last
engine's weight tensors (shared, not copied) after that engine is shut down and its KV cache freed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from plait.bench.gpu_workloads import Row, Workloads, shared_prefix_rows, synchronize
from plait.bench.model_facts import ModelFacts  # noqa: F401 -- re-exported: the floors live there

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; ``FULL`` is the issue's benchmark, ``QUICK`` a tiny CPU version with every row."""

    decode_prompt: int = 128  # rows a, b (short prompts), e
    decode_new_tokens: int = 256  # row a and e at batch 1
    batch_new_tokens: int = 128  # rows b and e at batch > 1
    batch_sizes: tuple[int, ...] = (64, 128, 256)
    long_prompt: int = 1024  # rows b (long contexts) and f
    offline_requests: int = 1000
    offline_input: int = 256
    offline_output: int = 256
    groups: int = 64
    group_size: int = 16
    system_len: int = 2048
    question_len: int = 128
    shared_output: int = 256
    hf_batch_sizes: tuple[int, ...] = (1, 64)
    ttft_repeats: int = 5
    copy_mib: int = 1024  # buffer of the copy-bandwidth measurement
    matmul_n: int = 8192  # n of the n^3 matmul


FULL = Sizes()
QUICK = Sizes(
    decode_prompt=16, decode_new_tokens=8, batch_new_tokens=8, batch_sizes=(1, 2, 4), long_prompt=64,
    offline_requests=8, offline_input=16, offline_output=8, groups=2, group_size=4, system_len=64,
    question_len=8, shared_output=8, hf_batch_sizes=(1, 2), ttft_repeats=3, copy_mib=64, matmul_n=512,
)


@dataclass(frozen=True)
class Machine:
    """What this machine measured: copy bandwidth (bytes/s, read + write) and matmul rate (FLOP/s)."""

    device: torch.device
    name: str
    bandwidth: float
    matmul_rate: float
    matmul_dtype: torch.dtype
    matmul_n: int


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(device: torch.device, sizes: Sizes) -> Machine:
    """Device-to-device copy of a large buffer (GB/s counting read + write) and an n^3 matmul (bf16 on CUDA)."""
    src = torch.empty(sizes.copy_mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), device, 10)
    del src, dst
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = sizes.matmul_n if device.type == "cuda" else min(sizes.matmul_n, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = _best_time(lambda: torch.mm(a, b), device, 10 if device.type == "cuda" else 3)
    del a, b
    release_gpu_memory(device)  # give the buffers back before the engine sizes its KV cache
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return Machine(device, name, 2 * sizes.copy_mib * 2**20 / copy_s, 2 * n**3 / mm_s, dtype, n)


def machine_rows(machine: Machine, facts: ModelFacts | None) -> list[Row]:
    """The two card rows, each with the floor it implies for the model."""
    gb = machine.bandwidth / 1e9
    tflops = machine.matmul_rate / 1e12
    bw_note = mm_note = ""
    if facts is not None:
        step = facts.weight_bytes / machine.bandwidth
        bw_note = (f"decode floor at batch 1: {facts.weight_bytes / 1e9:.2f} GB of weights per step -> "
                   f"{step * 1e3:.2f} ms/step, {1 / step:,.0f} tok/s")
        if facts.is_moe:
            bw_note += (f" (dense {facts.dense_weight_bytes / 1e9:.2f} GB + {facts.moe_layers} MoE layers x "
                        f"{facts.top_k} of {facts.num_experts} experts x {facts.expert_bytes / 1e6:.1f} MB)")
        per_token = 2 * facts.gemm_params
        mm_note = (f"prefill floor: {per_token / 1e9:.2f} GFLOP/token (GEMMs) -> "
                   f"{machine.matmul_rate / per_token:,.0f} tok/s")
    dtype = str(machine.matmul_dtype).removeprefix("torch.")
    return [
        Row("card", "copy bandwidth (device-to-device, read + write)", f"{gb:,.1f} GB/s", notes=bw_note),
        Row("card", f"{dtype} matmul {machine.matmul_n}^3", f"{tflops:,.2f} TFLOP/s", notes=mm_note),
    ]


def render(header: list[str], rows: list[Row], notes: list[str]) -> str:
    """The report as markdown: header lines, the table, then notes."""
    lines = [*header, "", "| row | measurement | result | floor | of floor | target / notes |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        cells = [r.key, r.name, r.result, r.floor, r.of_floor, r.notes]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join([*lines, "", *notes]) + "\n"


def release_gpu_memory(device: torch.device) -> None:
    """After the caller dropped its last engine reference: collect it and return cached GPU memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Run:
    """One benchmark run: the rows so far (also rewritten to ``out`` after each, so a run cut short keeps
    its results), and a guard that turns a failing row into a table row."""

    def __init__(self, out: Path | None) -> None:
        self.rows: list[Row] = []
        self.header: list[str] = []
        self.notes: list[str] = []
        self.out = out
        self.started = time.perf_counter()

    def add(self, rows: list[Row]) -> None:
        for row in rows:
            elapsed = time.perf_counter() - self.started
            print(f"[bench {elapsed:6.1f} s] {row.key} {row.name}: {row.result} {row.notes}".rstrip(),
                  file=sys.stderr, flush=True)
        self.rows.extend(rows)
        self.write()

    def text(self) -> str:
        return render(self.header, self.rows, self.notes + FLOOR_NOTES)

    def write(self) -> None:
        if self.out is not None and self.header:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.text())

    def guard(self, key: str, name: str, fn: Callable[[], list[Row]]) -> None:
        """Run ``fn`` and add its rows; on an error add one "failed" row instead."""
        try:
            self.add(fn())
        except Exception as exc:  # one broken row must not lose the rest of a long GPU run
            logger.exception("row %s failed", key)
            self.add([Row(key, name, failure(exc))])


def failure(exc: BaseException) -> str:
    """``"failed: Type: first line of the message"``, for a table cell."""
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"failed: {type(exc).__name__}: {message}"


def _engine_settings(args: argparse.Namespace) -> dict:
    from plait.runtime.config import EngineConfig

    settings = dict(args.engine_args)
    known = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "load_format"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"--engine-arg: unknown setting(s) {unknown} (use --model / --load-format for those); "
                         f"known: {', '.join(sorted(known))}")
    EngineConfig.from_kwargs(model=args.model, load_format=args.load_format, **settings)  # validate values now
    return settings


def run_benchmark(args: argparse.Namespace) -> int:
    """Measure the card, run the selected rows, print the table (and write it to ``args.out``)."""
    from plait import __version__
    from plait.runtime.config import EngineConfig
    from plait.runtime.engine import Engine

    sizes, settings = (QUICK if args.quick else FULL), _engine_settings(args)
    if getattr(args, "offline_requests", None):
        if args.offline_requests < 1:
            raise ValueError(f"--offline-requests must be >= 1, got {args.offline_requests}")
        sizes = dataclasses.replace(sizes, offline_requests=args.offline_requests)
    if getattr(args, "offline_lengths", None):
        sizes = dataclasses.replace(sizes, offline_input=args.offline_lengths[0],
                                    offline_output=args.offline_lengths[1])
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    device = torch.device(EngineConfig.from_kwargs(model=args.model, **settings).resolved_device())
    started = datetime.datetime.now().astimezone()
    machine = measure_machine(device, sizes)
    run, only = _Run(args.out), set(args.only)

    def build(**extra) -> Engine:
        return Engine(model=args.model, load_format=args.load_format, **{**settings, **extra})

    engine = work = facts = None
    try:
        engine = build()
        facts = ModelFacts.from_engine(engine)
    except Exception as exc:  # e.g. out of memory: say so in the table
        logger.exception("building the engine failed")
        run.add([Row("-", "building the engine", failure(exc))])
    run.header = _header(machine, engine, args, settings, started, __version__)
    run.add(machine_rows(machine, facts))
    if engine is not None:
        work = Workloads(engine, facts, machine, sizes, args.repeats, args.seed)
        for key, name, method in [("a", "decode tok/s, batch 1", "decode_batch1"),
                                  ("b", "decode tok/s, batched", "decode_batched"),
                                  ("c", "offline throughput", "offline"), ("f", "time to first token", "ttft")]:
            if key in only:  # (no bound method outlives the loop: it would keep the engine alive)
                run.guard(key, name, getattr(work, method))
    if engine is not None and "d" in only:
        on, rates = _attempt(work.shared_prefix), work.plait_rates
        engine.shutdown()
        engine = work = None  # free the cache-on engine before building the cache-off one
        release_gpu_memory(device)
        try:
            engine = build(disable_radix_cache=True)
            work = Workloads(engine, facts, machine, sizes, args.repeats, args.seed, plait_rates=rates)
            off = work.shared_prefix()
        except Exception as exc:  # e.g. out of memory building the second engine
            logger.exception("the cache-off half of row d failed")
            off = failure(exc)
        run.add(shared_prefix_rows(on, off, facts, machine, sizes))
    source = None
    if engine is not None:
        if "e" in only:  # keep the weights; drop the engine, its KV pool and anything else it holds
            source = (engine.runner.model, engine.model_source.config, dict(work.plait_rates))
        engine.shutdown()
        engine = work = None
        release_gpu_memory(device)
    if "e" in only:
        run.guard("e", "transformers generate",
                  lambda: _hf_rows(source, device, facts, machine, sizes, args, run.notes))
    run.write()
    print(run.text(), end="")
    return 0


def _attempt(fn: Callable[[], object]) -> object:
    """``fn()``, or a failure message (not the exception: its traceback would keep the engine alive)."""
    try:
        return fn()
    except Exception as exc:  # reported as a failed row by the caller
        logger.exception("%s failed", getattr(fn, "__name__", fn))
        return failure(exc)


def _hf_rows(source, device, facts, machine, sizes, args, notes: list[str]) -> list[Row]:
    """Row e: transformers on the plait engine's weight tensors (the engine is already shut down)."""
    if source is None:
        raise RuntimeError("no plait engine, so no weights to compare on")
    from plait.bench.hf_reference import hf_decode_rows

    model, hf_config, rates = source
    return hf_decode_rows(model, hf_config, device, facts, machine, sizes, rates, args.seed, notes,
                          repeats=args.repeats)


def _header(machine: Machine, engine, args, settings: dict, started, version: str) -> list[str]:
    lines = [f"# plait benchmark: {machine.name}, {started:%Y-%m-%d %H:%M %Z}", ""]
    what = f"model `{args.model}` (load_format {args.load_format}"
    if engine is not None:
        dtype = str(engine.runner.dtype).removeprefix("torch.")
        what += f", {dtype}, {engine.model_config.num_parameters() / 1e9:.3g}B parameters"
        pool = engine.runner.pool
        what += f"; KV cache {pool.capacity:,} tokens"
        if pool.hybrid:
            what += f" (sliding-window layers: {pool.num_sliding_slots:,} slots of their own)"
        what += f"; max_running_requests {engine.config.max_running_requests}"
    what += ")"
    cuda = f", CUDA {torch.version.cuda}" if machine.device.type == "cuda" else ""
    lines.append(f"{what}; plait {version}, torch {torch.__version__}{cuda}; "
                 f"engine args {settings or 'default'}; sizes {'quick' if args.quick else 'full'}; "
                 f"random prompts (seed {args.seed}), greedy, ignore_eos; timed runs: median of {args.repeats}.")
    return lines


FLOOR_NOTES = [
    "Floors: decode step = max((weights + batch * avg context * KV bytes/token) / copy bandwidth, "
    "FLOPs / matmul rate), avg context = prompt + new tokens / 2; prefill = (2 * GEMM params per token + "
    "causal attention) / matmul rate; rows c, d: prefill floor + decode steps in waves of "
    "max_running_requests. `of floor` = floor time / measured time (1.0 = at the floor).",
    "Decode tok/s = batch * (N - 1) / (time(N new tokens) - time(1 new token)), both runs with the prompts' KV "
    "already cached (one token of prefill per request), so neither prefill nor decode steps riding along in "
    "chunked-prefill steps enter the figure.",
    "MoE models: a step reads the dense weights plus, per MoE layer, the experts its tokens are routed to: "
    "top_k at batch 1, E * (1 - (1 - k/E)^B) expected distinct experts at batch B under uniform routing "
    "(random router weights route near-uniformly; real routing is skewed, touching fewer experts, so its "
    "floor is lower). FLOPs count only the active experts. Sliding-window layers read at most their window of KV.",
]
