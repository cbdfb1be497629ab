"""Program-aware caching under eviction pressure: hints on vs off, same engine, same run.

Workload (bundled SmolLM2-135M-Instruct on the CPU by default): ``--programs`` multi-turn programs,
each with its own few-shot context, run round-robin for ``--turns`` turns; turn k's prompt is the
previous prompt + its answer + a new question (what a chat or agent program sends). After every
program call a burst of unrelated requests arrives. The KV cache (``--kv-tokens``) holds the
programs' prefixes but not the programs plus the unrelated traffic, so plain LRU evicts a program's
prefix between its turns.

- hints off: requests carry no program id (plain LRU radix cache);
- hints on: every request of a program run carries its id, inside ``begin_program`` /
  ``end_program``, so the engine keeps the run's prefix pinned until it ends.

Greedy decoding with a fixed number of new tokens: both modes compute exactly the same tokens; only
what the cache holds differs. Modes alternate within each repeat (cache flushed before each run).
Prints, per mode: the program calls' hit rate (cached / prompt tokens) against the best possible
(everything but each turn's new question and the first turn's context), all requests' hit rate,
wall time and process CPU time (all threads; steadier than wall time on a shared machine) of the
whole workload, the wall time spent in program calls alone (medians over repeats), and pin yields.

Usage: python benchmarks/program_cache.py [--programs 4] [--turns 4] [--kv-tokens 1536] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from plait.runtime.engine import Engine

WORDS = ("river", "lamp", "copper", "violet", "orchard", "signal", "harbor", "maple", "granite", "echo",
         "lantern", "meadow", "saffron", "quartz", "willow", "ember", "falcon", "cedar", "tide", "marble")


def sentence(seed: int, n: int = 12) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 3)) % len(WORDS)] for i in range(n)) + "."


def program_context(p: int) -> str:
    facts = " ".join(f"Fact {p}.{i}: {sentence(p * 31 + i)}" for i in range(10))
    return f"You are librarian number {p}. Answer from the facts below in a few words.\n{facts}\n"


def unrelated_prompt(i: int) -> str:
    return f"Document {i}: " + " ".join(sentence(1000 + i * 13 + k) for k in range(9)) + "\nSummary:"


def run_workload(engine: Engine, args: argparse.Namespace, hints: bool) -> dict[str, float]:
    assert engine.flush_cache()
    start_counters = engine.stats()
    prompts = {p: program_context(p) for p in range(args.programs)}
    program_prompt = program_cached = best_cached = 0
    program_time = 0.0
    unrelated_index = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    if hints:
        for p in prompts:
            engine.begin_program(f"prog-{p}")
    for turn in range(args.turns):
        for p in range(args.programs):
            question = f"Question {turn}: which words appear in fact {p}.{turn}?\nAnswer:"
            before = prompts[p]
            prompts[p] = before + question
            t_call = time.perf_counter()
            out = engine.generate(prompts[p], args.sampling, program_id=f"prog-{p}" if hints else None)
            program_time += time.perf_counter() - t_call
            meta = out["meta_info"]
            program_prompt += meta["prompt_tokens"]
            program_cached += meta["cached_tokens"]
            if turn > 0:  # at best, everything the previous turn sent and got back is cached
                best_cached += len(engine.tokenizer.encode(before))
            prompts[p] += out["text"] + "\n"
            burst = [unrelated_prompt(unrelated_index + k) for k in range(args.burst)]
            unrelated_index += args.burst
            engine.generate(burst, args.unrelated_sampling)
    if hints:
        for p in prompts:
            engine.end_program(f"prog-{p}")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stats = engine.stats()
    all_prompt = stats["prompt_tokens"] - start_counters["prompt_tokens"]
    all_cached = stats["cached_tokens"] - start_counters["cached_tokens"]
    return {
        "time_s": elapsed,
        "cpu_s": cpu,
        "program_s": program_time,
        "program_hit_rate": program_cached / program_prompt,
        "best_program_hit_rate": best_cached / program_prompt,
        "all_hit_rate": all_cached / all_prompt,
        "program_prompt_tokens": program_prompt,
        "pin_yields": stats["pin_yields"] - start_counters["pin_yields"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--programs", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--burst", type=int, default=2, help="unrelated requests after each program call")
    ap.add_argument("--kv-tokens", type=int, default=1536, help="KV cache size (max_total_tokens)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    args.sampling = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    args.unrelated_sampling = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}

    engine = Engine(model=args.model, max_total_tokens=args.kv_tokens, device=args.device)
    print(f"model {args.model} on {engine.runner.device} ({platform.processor() or platform.machine()}), "
          f"KV cache {engine.runner.pool.capacity} tokens, pin budget {engine.pins.max_tokens_per_program} "
          f"tokens/program; {args.programs} programs x {args.turns} turns, {args.burst} unrelated requests "
          f"after each call, {args.new_tokens} new tokens per call")
    run_workload(engine, args, hints=True)  # warm-up (allocator, MKL); not counted
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for hints in (False, True):
            results[hints].append(run_workload(engine, args, hints))
    engine.shutdown()

    print(f"{'hints':<6} {'program hit rate':>16} {'(best possible)':>15} {'all hit rate':>12} "
          f"{'wall s':>8} {'CPU s':>8} {'program calls s':>15} {'pin yields':>10}   (times: medians)")
    for hints in (False, True):
        runs = results[hints]
        first = runs[0]
        assert all(r["program_hit_rate"] == first["program_hit_rate"] for r in runs), "hit rate varied across repeats"
        print(f"{'on' if hints else 'off':<6} {first['program_hit_rate']:>16.1%} {first['best_program_hit_rate']:>15.1%} "
              f"{first['all_hit_rate']:>12.1%} {statistics.median(r['time_s'] for r in runs):>8.2f} "
              f"{statistics.median(r['cpu_s'] for r in runs):>8.2f} "
              f"{statistics.median(r['program_s'] for r in runs):>15.2f} {first['pin_yields']:>10.0f}")
    for key, what in (("time_s", "wall time"), ("cpu_s", "CPU time"), ("program_s", "program calls' time")):
        off, on = (statistics.median(r[key] for r in results[h]) for h in (False, True))
        print(f"{what} with hints / without: {on / off:.2f}")


if __name__ == "__main__":
    main()
