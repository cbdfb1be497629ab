"""The language's run_batch: N few-shot programs sharing a K-shot prefix, prefix cache on vs off, same run.

Workload (bundled SmolLM2-135M-Instruct on the CPU by default): one ``@pl.function`` few-shot program
(instructions + ``--shots`` worked examples + a question), run with ``run_batch`` over ``--programs``
different arithmetic questions, greedy, at most ``--max-new-tokens`` tokens each (stop at a newline).
Two engines in this process, identical but for ``disable_radix_cache``:

- cache on: ``run_batch`` prefills the traced constant prefix once, then every program's prompt finds
  it in the radix cache;
- cache off: every program computes its whole prompt.

Greedy decoding on the same weights: both modes must produce the same answers (checked).

The best possible hit rate is computed from the trace, not measured: ``batch_prefix(items)`` is the
text every program starts with and ``trace(**item).constant_prefix`` (every argument fixed) is each
program's exact prompt; tokenized, the tokens a prompt shares with the prefix are what the cache can
serve. A second bound also counts what prompts share with each other beyond the prefix (the distinct
tokens of all prompts, computed once each: the most any prefix cache could save).

Prints, per mode (medians over ``--repeats``; the hit rate with the cache on varies a little from run
to run: which programs' prompts are computed in the same step decides what they can share beyond
the prefix): wall time and process CPU time of ``run_batch``, the program calls' hit rate (cached / prompt tokens, from each state's call records), the engine-wide hit
rate (which also counts the prefix prefill request itself), and the tokens generated.

Usage: python benchmarks/lang_batch.py [--programs 64] [--shots 5] [--max-new-tokens 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import plait as pl
from plait.lang import Program

INSTRUCTIONS = (
    "You are a careful calculator. Read each word problem, work out the arithmetic exactly and reply with "
    "the final number only, without units or explanation. The examples show the format.\n\n"
)
SHOT_POOL = [
    ("A library has 128 books on one shelf and 57 on another. How many books are on both shelves?", "185"),
    ("A baker makes 12 trays of 24 cookies each. How many cookies does the baker make?", "288"),
    ("A train travels 90 kilometres per hour for 3 hours. How far does it travel in kilometres?", "270"),
    ("Maria had 250 dollars and spent 86 dollars on shoes. How many dollars does she have left?", "164"),
    ("A farm has 15 rows of apple trees with 11 trees in each row. How many apple trees are there?", "165"),
    ("A school orders 9 boxes of 36 pencils. How many pencils does it order?", "324"),
    ("A tank holds 500 litres and 137 litres are used. How many litres remain?", "363"),
    ("Tom reads 18 pages a day for 14 days. How many pages does he read?", "252"),
]
QUESTION_FORMS = [
    "A warehouse stores {a} crates and receives {b} more. How many crates does it store now?",
    "{a} students each bring {b} stamps. How many stamps do they bring in total?",
    "A cyclist rides {a} kilometres on Monday and {b} on Tuesday. How many kilometres in all?",
    "A shop had {a} oranges and sold {b}. How many oranges are left?",
]


def make_program(shots: int) -> Program:
    examples = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in SHOT_POOL[:shots])

    @pl.function
    def few_shot_arithmetic(s, question):
        s += INSTRUCTIONS + examples
        s += "Q: " + question + "\nA:" + pl.gen("answer", stop="\n")

    return few_shot_arithmetic


def make_questions(n: int, seed: int = 0) -> list[str]:
    """``n`` different questions, the same for a given seed."""
    rng = random.Random(seed)
    questions: list[str] = []
    while len(questions) < n:
        form = QUESTION_FORMS[len(questions) % len(QUESTION_FORMS)]
        question = form.format(a=rng.randint(10, 999), b=rng.randint(2, 99))
        if question not in questions:
            questions.append(question)
    return questions


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def best_hit_rates(program: Program, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, float]:
    """Optimal hit rates of the program calls, from the trace and the token counts of the prompts."""
    prefix_ids = tokenizer.encode(program.batch_prefix(items))
    prompts = [tokenizer.encode(program.trace(**item).constant_prefix) for item in items]
    total = sum(len(p) for p in prompts)
    from_prefix = sum(common_prefix_len(prefix_ids, p) for p in prompts)
    # Distinct tokens over all prompts = nodes of their prefix trie (sorted, each prompt adds what it does
    # not share with its predecessor). Each must be computed once, except the trie nodes on the prefilled
    # prefix's path (as deep as the prompt that matches the prefix furthest).
    ordered = sorted(prompts)
    distinct = len(ordered[0]) + sum(len(b) - common_prefix_len(a, b) for a, b in itertools.pairwise(ordered))
    on_prefix_path = max(common_prefix_len(prefix_ids, p) for p in prompts)
    return {
        "prompt_tokens": total,
        "prefix_tokens": len(prefix_ids),
        "best_from_prefix": from_prefix / total,
        "best_overall": (total - (distinct - on_prefix_path)) / total,
    }


def run_mode(runtime: Any, program: Program, items: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    engine = runtime.engine
    assert engine.flush_cache(), "the engine must be idle between runs"
    before = engine.stats()
    t0, cpu0 = time.perf_counter(), time.process_time()
    states = program.run_batch(items, backend=runtime, num_threads=len(items), temperature=0,
                               max_new_tokens=args.max_new_tokens)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = engine.stats()
    calls = [call for state in states for call in state.calls]
    prompt = sum(c.prompt_tokens for c in calls)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "hit_rate": sum(c.cached_tokens for c in calls) / prompt,
        "prompt_tokens": prompt,
        "engine_hit_rate": (after["cached_tokens"] - before["cached_tokens"])
        / (after["prompt_tokens"] - before["prompt_tokens"]),
        "output_tokens": sum(c.completion_tokens for c in calls),
        "answers": [state["answer"] for state in states],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--programs", type=int, default=64)
    ap.add_argument("--shots", type=int, default=5, choices=range(1, len(SHOT_POOL) + 1))
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.programs < 2:
        ap.error("--programs must be at least 2 (run_batch shares a prefix between programs)")

    program = make_program(args.shots)
    items = [{"question": q} for q in make_questions(args.programs)]
    runtimes = {
        "off": pl.Runtime(args.model, device=args.device, disable_radix_cache=True),
        "on": pl.Runtime(args.model, device=args.device),
    }
    best = best_hit_rates(program, items, runtimes["on"].engine.tokenizer)
    print(f"model {args.model} on {runtimes['on'].engine.runner.device} "
          f"({platform.processor() or platform.machine()}); {args.programs} programs, {args.shots}-shot prefix of "
          f"{best['prefix_tokens']} tokens, {best['prompt_tokens']} prompt tokens in all, greedy, "
          f"<= {args.max_new_tokens} new tokens each")
    for runtime in runtimes.values():  # warm-up (allocator, MKL, thread pools); not counted
        program.run_batch(items[:4], backend=runtime, temperature=0, max_new_tokens=args.max_new_tokens)
    results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            results[mode].append(run_mode(runtimes[mode], program, items, args))
    for runtime in runtimes.values():
        runtime.shutdown()

    same = all(r["answers"] == results["off"][0]["answers"] for runs in results.values() for r in runs)
    print(f"\n{'cache':<6} {'wall s':>8} {'CPU s':>8} {'hit rate':>9} {'best (prefix)':>13} {'best (all)':>10} "
          f"{'engine hit rate':>15} {'prompt tok':>10} {'output tok':>10}   (medians of {args.repeats})")
    for mode in ("off", "on"):
        runs = results[mode]
        first = runs[0]
        print(f"{mode:<6} {statistics.median(r['wall_s'] for r in runs):>8.2f} "
              f"{statistics.median(r['cpu_s'] for r in runs):>8.2f} "
              f"{statistics.median(r['hit_rate'] for r in runs):>9.1%} {best['best_from_prefix']:>13.1%} "
              f"{best['best_overall']:>10.1%} {statistics.median(r['engine_hit_rate'] for r in runs):>15.1%} "
              f"{first['prompt_tokens']:>10} {first['output_tokens']:>10}")
    for key, what in (("wall_s", "wall time"), ("cpu_s", "CPU time")):
        off, on = (statistics.median(r[key] for r in results[m]) for m in ("off", "on"))
        print(f"{what}: cache off / on = {off / on:.2f}x")
    print(f"same answers in both modes: {'yes' if same else 'NO (exactness broken)'}")
    print("first answers:", [a.strip() for a in results["on"][0]["answers"][:6]])


if __name__ == "__main__":
    main()
