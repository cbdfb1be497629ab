"""``plait bench``: the one GPU benchmark (card speed, then plait's engine on Llama-3.1-8B, one run, one table).

This module holds only the command-line options (no torch import, so ``plait --help`` stays fast);
the benchmark itself is in ``plait.bench.gpu`` (orchestration, machine measurements, floors, table),
``plait.bench.gpu_workloads`` (rows a-d and f) and ``plait.bench.hf_reference`` (row e).

Entry points: ``plait bench [options]`` and ``python benchmarks/gpu.py [options]`` run the same code.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROW_KEYS = ("a", "b", "c", "d", "e", "f")
ROW_HELP = (
    "a: batch-1 decode tok/s vs the bandwidth floor; "
    "b: decode tok/s at batch 64/128/256 with 128- and 1024-token prompts; "
    "c: offline throughput, 1000 requests of 256 in / 256 out (--offline-lengths); "
    "d: shared-prefix workload (64 groups x 16 prompts, 2048-token system prompt), prefix cache on vs off; "
    "e: transformers' generate on the same weights at batch 1 and 64; "
    "f: time to first token for a 1024-token prompt"
)


def parse_only(text: str) -> tuple[str, ...]:
    """``"a,b,f"`` -> ``("a", "b", "f")``; unknown letters are an argparse error."""
    keys = tuple(dict.fromkeys(k.strip().lower() for k in text.split(",") if k.strip()))
    bad = [k for k in keys if k not in ROW_KEYS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"--only takes a comma-separated subset of {','.join(ROW_KEYS)}, got {text!r}")
    return keys


def parse_lengths(text: str) -> tuple[int, int]:
    """``"1024,1024"`` -> ``(1024, 1024)``: positive prompt and output lengths."""
    parts = text.split(",")
    try:
        lengths = tuple(int(p) for p in parts)
    except ValueError:
        lengths = ()
    if len(lengths) != 2 or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--offline-lengths takes IN,OUT (two positive integers), got {text!r}")
    return lengths  # type: ignore[return-value]


def parse_engine_arg(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``; the value is read as JSON (numbers, true/false/null), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--engine-arg takes KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (shared by ``plait bench`` and ``benchmarks/gpu.py``)."""
    parser.add_argument("--model", default="llama-3.1-8b", help="model preset or path (default: llama-3.1-8b)")
    parser.add_argument("--load-format", default="dummy", help="engine load_format (default: dummy, random weights)")
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes for CPU tests (batches 1/2/4, 8 requests, short prompts, 8 new tokens); every row still runs",
    )
    parser.add_argument("--only", type=parse_only, default=ROW_KEYS, metavar="a,b,...",
                        help="run only these rows of a-f (the card's copy bandwidth and matmul rate are always "
                        "measured)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table as markdown to FILE")
    parser.add_argument("--engine-arg", dest="engine_args", type=parse_engine_arg, action="append", default=[],
                        metavar="KEY=VALUE", help="an Engine setting, repeatable (e.g. attention_backend=triton)")
    parser.add_argument("--tp", "--tp-size", dest="engine_args", type=lambda v: ("tp_size", int(v)), action="append",
                        metavar="N", help="tensor parallelism over N ranks (the engine setting tp_size)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per decode/throughput measurement, median taken (default 1; TTFT uses 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    parser.add_argument("--offline-requests", type=int, metavar="N", help="row c's request count (default 1000)")
    parser.add_argument("--offline-lengths", type=parse_lengths, metavar="IN,OUT",
                        help="row c's prompt and output lengths (default 256,256; GPT-OSS is compared at 1024,1024)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; prints the table, returns the exit status."""
    from plait.bench.gpu import run_benchmark

    return run_benchmark(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python benchmarks/gpu.py``."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu.py", description="plait's GPU benchmark: one run, one table. " + ROW_HELP
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
