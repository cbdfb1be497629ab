"""Budget steering's search alone: ``shortest_completion`` from many JSON states, timed.

    python benchmarks/budget_search.py [--model PRESET|DIR] [--walks 3] [--seed 0] [--repeats 9] [--profile]

On the GPU the structured mix's engine thread spent a quarter of its time in these searches
(benchmarks/RESULTS.md, 2026-12-02); this times them without an engine. The states: for each of the
serving benchmark's JSON schemas (``benchmarks/serving.py``), ``--walks`` random walks of 10, 30, 60,
100 and 150 tokens, each token drawn uniformly from what the grammar allows (a model that writes
anything valid: deep and unfinished structure). From every state one search runs with the engine's
bounds (``SearchLimits()``); the whole set is timed ``--repeats`` times (after one untimed pass). Printed:
the fastest and the median pass, the median and largest search, how many found no ending, and a
fingerprint of the endings found (equal fingerprints: the same endings, for checking that a change to
the search changed only its speed). ``--profile`` adds cProfile's top functions of one pass.
``--batch-bitmask`` also times the step's mask (``build_batch_bitmask``) for a batch of up to 64 rows,
every other one constrained by one of these states (the structured mix's half), 200 calls a repeat.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from plait.runtime.constrained import ConstraintKind, ConstraintSpec, GrammarCompiler, GrammarState, TokenizerInfo
from plait.runtime.constrained.bitmask import build_batch_bitmask
from plait.runtime.constrained.budget import SearchLimits, shortest_completion
from plait.runtime.models.registry import ensure_preset_dir
from plait.runtime.tokenizer import Tokenizer

WALK_LENGTHS = (10, 30, 60, 100, 150)


def _schemas() -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from constrained_host import _schemas as serving_schemas

    return serving_schemas()


def random_walk_states(info: TokenizerInfo, compiler: GrammarCompiler, walks: int, seed: int) -> list[GrammarState]:
    """Grammar states reached by random walks over the allowed tokens (stop tokens excluded)."""
    rng = random.Random(seed)
    row = torch.empty(info.bitmask_words, dtype=torch.int32)
    bits = row.numpy().view(np.uint32)
    stops = np.array(sorted(info.stop_ids), dtype=np.int64)
    states = []
    for schema in _schemas().values():
        grammar = compiler.compile(ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(schema)))
        for length in WALK_LENGTHS:
            for _ in range(walks):
                state = GrammarState(grammar, info, frozenset(info.stop_ids), budget_margin=None)
                for _ in range(length):
                    state.fill_bitmask(row)
                    flags = np.unpackbits(bits.view(np.uint8), bitorder="little")[: info.vocab_size]
                    flags[stops] = 0
                    allowed = np.flatnonzero(flags)
                    if not len(allowed) or state.accept_token(int(allowed[rng.randrange(len(allowed))])) is not None:
                        break
                states.append(state)
    return states


def search_all(states: list[GrammarState], info: TokenizerInfo) -> tuple[list[float], list[list[int] | None]]:
    """One search from every state: (seconds of each, ending of each)."""
    seconds, endings = [], []
    for state in states:
        start = time.perf_counter()
        endings.append(shortest_completion(state.matcher, info, SearchLimits()))
        seconds.append(time.perf_counter() - start)
    return seconds, endings


def time_batch_bitmask(states: list[GrammarState], info: TokenizerInfo, repeats: int, rows: int = 64,
                       calls: int = 200) -> tuple[int, float, float]:
    """(rows, median seconds, fastest seconds) of one ``build_batch_bitmask`` over at most ``rows`` rows,
    every other one constrained by the next of ``states`` (each state once: a row has its own matcher),
    the others unconstrained."""
    constrained = states[: rows // 2]
    batch = [row for state in constrained for row in (state, None)]
    build_batch_bitmask(batch, info.bitmask_words)  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            build_batch_bitmask(batch, info.bitmask_words)
        times.append((time.perf_counter() - start) / calls)
    return len(batch), statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a preset with a tokenizer, or a directory")
    parser.add_argument("--walks", type=int, default=3, help="random walks per schema and length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--batch-bitmask", action="store_true", help="also time build_batch_bitmask (up to 64 rows)")
    args = parser.parse_args(argv)
    model_dir = args.model if Path(args.model).is_dir() else str(ensure_preset_dir(args.model))
    info = TokenizerInfo.from_tokenizer(Tokenizer.from_dir(model_dir))
    compiler = GrammarCompiler(info, backend="llguidance")
    try:
        states = random_walk_states(info, compiler, args.walks, args.seed)
        _, endings = search_all(states, info)  # warm: candidates, forced-token cache
        passes, per_search = [], []
        for _ in range(args.repeats):
            seconds, again = search_all(states, info)
            assert again == endings, "a search found another ending on a second pass"
            passes.append(sum(seconds))
            per_search.extend(seconds)
        fingerprint = hashlib.sha256(json.dumps(endings).encode()).hexdigest()[:12]
        found = [e for e in endings if e is not None]
        print(f"{len(states)} searches a pass, {args.repeats} passes: fastest pass {min(passes) * 1e3:.1f} ms, "
              f"median pass {statistics.median(passes) * 1e3:.1f} ms; a search: median {statistics.median(per_search) * 1e3:.2f} "
              f"ms, largest {max(per_search) * 1e3:.2f} ms; without an ending {len(endings) - len(found)}; mean ending "
              f"{statistics.mean(len(e) for e in found) if found else 0:.1f} tokens; endings fingerprint {fingerprint}")
        if args.batch_bitmask:
            rows, median, fastest = time_batch_bitmask(states, info, args.repeats)
            print(f"batch bitmask, {rows} rows ({rows // 2} constrained): median {median * 1e6:.0f} us, "
                  f"fastest {fastest * 1e6:.0f} us")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            search_all(states, info)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())
    finally:
        compiler.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
