"""Does the outlines-core fallback rescue what llguidance refuses? Measured on MaskBench.

    python benchmarks/outlines_fallback.py DATA_DIR [--sample N --seed S] [--timeout 20]

For every MaskBench schema that llguidance (plait's first JSON-schema backend, through plait's own
path) refuses to compile, the same schema goes to plait's outlines-core backend alone, compiled in an
isolated worker process with a timeout (a runaway compile is killed), and is judged by MaskBench's
pass rule (``benchmarks/maskbench.py``: every valid instance accepted token by token, every invalid
one refused). Prints how many it rescues, refuses, times out on or gets wrong, and its compile times:
the figures behind ``DEFAULT_BACKENDS`` (plait/runtime/constrained/compiler.py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from maskbench import LimitError, PlaitSide, instances, load_cases, pct  # noqa: E402

from plait.runtime.constrained import GrammarCompiler  # noqa: E402
from plait.runtime.constrained.limits import GrammarLimits  # noqa: E402
from plait.runtime.constrained.vocab import TokenizerInfo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--sample", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="outlines compile timeout, seconds")
    args = ap.parse_args()
    from plait.runtime.models.registry import ensure_preset_dir
    from plait.runtime.tokenizer import Tokenizer

    info = TokenizerInfo.from_tokenizer(Tokenizer.from_dir(ensure_preset_dir("smollm2-135m-instruct")))
    limits = GrammarLimits()
    first = PlaitSide(info, "llguidance", 30.0, limits)
    fallback = PlaitSide(info, "outlines", args.timeout, limits)
    fallback.compiler.shutdown()
    fallback.compiler = GrammarCompiler(info, backend="outlines", timeout_s=args.timeout, cache_size=4,
                                        max_workers=1, isolate=True)
    if not fallback.compiler.workers.wait_ready(120):
        raise SystemExit("the compile worker did not start")
    start = time.perf_counter()
    cases = load_cases(args.data_dir, args.sample, args.seed)
    refused: list[tuple[str, dict]] = []
    for name, case in cases:
        try:
            first.compile(case["schema"])
        except LimitError:
            continue  # refused by plait's limits before any backend: not the fallback's business
        except Exception:  # noqa: BLE001 -- llguidance refused or failed: the fallback's case
            refused.append((name, case))
    first.compiler.shutdown()
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    slow: list[tuple[float, str, str]] = []
    for n, (name, case) in enumerate(refused, 1):
        t0 = time.perf_counter()
        kind = fallback.run(case["schema"], instances(case, info))
        seconds = time.perf_counter() - t0
        outcomes["rescued" if kind is None else kind] += 1
        if kind == "compile":
            reasons[fallback.detail.split(":")[-1].strip()[:70]] += 1
        slow.append((seconds, name, kind or "rescued"))
        if n % 200 == 0:
            print(f"  {n}/{len(refused)} {dict(outcomes)}", file=sys.stderr, flush=True)
    fallback.compiler.shutdown()
    print(f"outlines-core fallback on MaskBench, {platform.machine()}, sample {args.sample or 'all'} "
          f"(seed {args.seed}), {time.perf_counter() - start:.0f} s")
    print(f"schemas {len(cases)}; llguidance refuses {len(refused)}; outlines-core on those: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    times = [s for s, _, _ in slow]
    print(f"time per refused schema (compile, and walks where it compiled): p50 {pct(times, 50) * 1e3:.1f} ms, "
          f"p99 {pct(times, 99) * 1e3:.0f} ms, max {max(times, default=0):.1f} s")
    print("outlines-core's most common refusals: " + "; ".join(f"{r} ({c})" for r, c in reasons.most_common(6)))
    for seconds, name, kind in sorted(slow, reverse=True)[:5]:
        print(f"  {seconds:.1f} s {kind}: {name}")


if __name__ == "__main__":
    main()
