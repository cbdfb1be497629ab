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

``--replay FILE`` instead replays constrained requests that an engine generated
(``benchmarks/constrained_host.py --dump FILE``, e.g. on a GPU with a large model's dummy weights, whose
outputs the CPU's small models do not reproduce): each request's tokens go through a ``GrammarState``
in the order the engine takes them (the forced tokens at admission; then per sampled token: vetting,
accepting, jump-forward and the budget check), ``--repeats`` times after one untimed pass. Printed:
budget steering's searches per request in the first pass (endings learned from nothing) and in later
ones, reuses and the searches' time, the whole replay's time, and how many requests came out other than
they were recorded (0 when the replay is faithful and steering chose the same endings).
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
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from plait.runtime.constrained import ConstraintKind, ConstraintSpec, GrammarCompiler, GrammarState, TokenizerInfo
from plait.runtime.constrained.bitmask import build_batch_bitmask
from plait.runtime.constrained.budget import SearchLimits, shortest_completion
from plait.runtime.constrained.healing import TokenHealer
from plait.runtime.constrained.spec import spec_from_params
from plait.runtime.models.registry import ensure_preset_dir
from plait.runtime.tokenizer import Tokenizer
from plait.sampling import SamplingParams

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


class _Replay:
    """One recorded constrained request taken through a fresh ``GrammarState`` as ``Engine`` takes it
    (``_append_token``, ``_jump_forward``, ``_append_forced`` and ``_replaced_by_ending``), with the
    recorded tokens standing in for the sampled ones."""

    def __init__(self, state: GrammarState, stop_ids: frozenset[int], max_new_tokens: int):
        self.state, self.stop_ids, self.max_new_tokens = state, stop_ids, max_new_tokens
        self.output: list[int] = []
        self.finished = False

    def run(self, recorded: list[int], prompt_last_id: int) -> list[int]:
        self._jump_forward(prompt_last_id)
        while not self.finished and len(self.output) < len(recorded):
            self._append(recorded[len(self.output)], sampled=True)
        return self.output

    def _budget(self) -> int:
        return self.max_new_tokens - len(self.output)

    def _append(self, token: int, sampled: bool) -> None:
        if sampled and token not in self.stop_ids:
            ending = self.state.ending_instead_of(token, self._budget())
            if ending is not None:
                self._append_forced(ending)
                return
        self.output.append(token)
        if token in self.stop_ids or self.state.accept_token(token) is not None or self._budget() <= 0:
            self.finished = True
        elif sampled:
            self._jump_forward(token)

    def _append_forced(self, tokens: list[int]) -> None:
        for token in tokens:
            self._append(token, sampled=False)
            if self.finished:
                return

    def _jump_forward(self, prev_token: int) -> None:
        tokens = self.state.forced_tokens(prev_token, self._budget())
        self._append_forced(tokens)
        if tokens and not self.state.closing and self.state.steering is not None and not self.finished:
            self._append_forced(self.state.forced_tokens(tokens[-1], self._budget(), jump=False))


def replay(path: str, model_dir: str, repeats: int) -> None:
    """Replay ``constrained_host.py --dump``'s requests (see the module's docstring) and print the figures."""
    recorded = json.loads(Path(path).read_text())
    info = TokenizerInfo.from_tokenizer(Tokenizer.from_dir(model_dir), recorded["vocab_size"])
    stop_ids = frozenset(recorded["stop_ids"])
    compiler = GrammarCompiler(info, backend="llguidance")
    healer = TokenHealer(SimpleNamespace(compiler=compiler))  # the engine's token healing, on this compiler
    try:
        requests = []
        for r in recorded["requests"]:
            grammar = compiler.compile(spec_from_params(SamplingParams(json_schema=r["json_schema"])))
            healing = healer.heal(r["prompt_ids"], grammar, max_new_tokens=r["max_new_tokens"])
            requests.append((healing.grammar, healing.prompt_ids[-1], r))

        def one_pass() -> tuple[float, Counter, int]:
            totals: Counter = Counter()
            differ = 0
            start = time.perf_counter()
            for grammar, prompt_last_id, r in requests:
                state = GrammarState(grammar, info, stop_ids)
                state.steering.prepare(grammar, r["max_new_tokens"])  # on the admission thread in an engine
                out = _Replay(state, stop_ids, r["max_new_tokens"]).run(r["output_ids"], prompt_last_id)
                differ += out != r["output_ids"]
                for name in ("searches", "searches_without_ending", "search_seconds", "reused", "replaced"):
                    totals[name] += getattr(state.steering, name)
            return time.perf_counter() - start, totals, differ

        _, first, _ = one_pass()  # warm: start endings, candidates, caches, endings learned (LearnedEndings)
        walls, searched = [], []
        for _ in range(repeats):
            wall, totals, differ = one_pass()
            walls.append(wall)
            searched.append(totals["search_seconds"])
        n = len(requests)
        print(f"replayed {n} constrained requests ({sum(len(r['output_ids']) for *_, r in requests)} tokens), "
              f"{repeats} passes: a pass fastest {min(walls) * 1e3:.1f} ms, median {statistics.median(walls) * 1e3:.1f} ms; "
              f"searches {first['searches'] / n:.1f} a request in the first pass, {totals['searches'] / n:.1f} in later ones "
              f"({totals['searches_without_ending']} without an ending), "
              f"{statistics.median(searched) / max(totals['searches'], 1) * 1e3:.2f} ms a search, "
              f"{statistics.median(searched) * 1e3:.1f} ms a pass; endings reused {totals['reused'] / n:.1f} a request; "
              f"tokens replaced {totals['replaced']}; outputs other than recorded {differ}")
        if recorded.get("budget"):
            print(f"the recording engine's counters (warm-up requests included): {recorded['budget']}")
    finally:
        compiler.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a preset with a tokenizer, or a directory")
    parser.add_argument("--walks", type=int, default=3, help="random walks per schema and length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--batch-bitmask", action="store_true", help="also time build_batch_bitmask (up to 64 rows)")
    parser.add_argument("--replay", default=None, metavar="FILE", help="replay constrained_host.py --dump's requests")
    args = parser.parse_args(argv)
    model_dir = args.model if Path(args.model).is_dir() else str(ensure_preset_dir(args.model))
    if args.replay:
        replay(args.replay, model_dir, args.repeats)
        return 0
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
