"""The engine thread's time per step on the structured mix, by part: what bounds constrained batches on a GPU.

    python benchmarks/constrained_host.py [--model PRESET|DIR] [--requests 64] [--ratio 0.5] [--output 128] [--temperature 0]

On a GPU the structured mix (``benchmarks/serving.py --dataset structured``) is paced by the engine
thread, not the device (benchmarks/RESULTS.md, 2026-12-02): settling a step (grammars, jump-forward,
budget steering, detokenizing), building the masks, scheduling. This runs the same kind of batch
in-process on the CPU -- ``--requests`` requests at once, a share ``--ratio`` constrained by the
serving benchmark's JSON schemas, the others unconstrained with ``ignore_eos`` -- on dummy weights (so
that documents run to their budget, as they do there) with overlap scheduling on, and prints the
engine thread's milliseconds a step in each part. The forward and sampling are the CPU's and are
listed apart: on a GPU they run on the device. Parts nest (a search runs inside a vetting or a
check), so the rows do not add up. On a GPU a step with constrained rows waits for the settling
before the sampling launch and for the masks; the rest of the settling overlaps the device.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import plait.runtime.step as step_module
from plait.runtime.constrained import budget
from plait.runtime.constrained.matcher import GrammarState
from plait.runtime.engine import Engine
from plait.runtime.models.registry import ensure_preset_dir

# (owner, attribute, part): the engine-thread work timed, by where it is done
_CLASS_PARTS = [
    (GrammarState, "accept_token", "grammar: accept a token"),
    (GrammarState, "forced_tokens", "jump-forward and budget checks"),
    (GrammarState, "ending_instead_of", "budget steering: vet a sampled token"),
    (budget.BudgetSteering, "_search", "budget steering: searches"),
    (budget.BudgetSteering, "_reusable", "budget steering: reuse checks"),
]


def _serving_module():
    """``benchmarks/serving.py`` (not a package), loaded once."""
    module = sys.modules.get("serving_schemas")
    if module is None:
        spec = importlib.util.spec_from_file_location("serving_schemas", Path(__file__).with_name("serving.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _schemas() -> dict:
    """The structured workload's schemas (``benchmarks/serving.py``)."""
    return _serving_module().SCHEMAS


def _prompts(args: argparse.Namespace, model_dir: str) -> list[str]:
    """The requests' prompts: near-identical short ones, or (``--prompt-tokens N``) the serving
    benchmark's structured prompts, N tokens of random text each (different outputs per request)."""
    if not args.prompt_tokens:
        return [f"Extract record {i} as JSON from this text: " + "lorem ipsum dolor " * 30 for i in range(args.requests)]
    import random

    maker = _serving_module().TextMaker(random.Random(args.seed), model_dir)
    return [f"Extract a record as JSON from this text:\n{maker.text(args.prompt_tokens)}" for _ in range(args.requests)]


@contextlib.contextmanager
def timed(targets: list[tuple[object, str, str]]) -> Iterator[tuple[defaultdict, Counter]]:
    """Wrap each ``owner.attribute`` to add its wall time and calls to its part; restored on exit."""
    seconds: defaultdict = defaultdict(float)
    calls: Counter = Counter()
    saved = []  # (owner, name, whether the owner itself held it, what it held)
    for owner, name, part in targets:
        original = getattr(owner, name)
        saved.append((owner, name, name in vars(owner), vars(owner).get(name)))

        def wrapper(*args, __original=original, __part=part, **kwargs):
            start = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                seconds[__part] += time.perf_counter() - start
                calls[__part] += 1

        setattr(owner, name, functools.wraps(original)(wrapper))
    try:
        yield seconds, calls
    finally:
        for owner, name, held, value in reversed(saved):
            if held:
                setattr(owner, name, value)
            else:
                delattr(owner, name)  # an instance's method: the class's again


def run(args: argparse.Namespace) -> dict:
    """Run the batch once to warm up (grammars compiled), then once timed; returns the figures."""
    # a directory, or a preset: its files (the bundled model's), or with --tokenizer its name (dummy weights)
    model_dir = args.model if Path(args.model).is_dir() or args.tokenizer else str(ensure_preset_dir(args.model))
    tokenizer_dir = args.tokenizer or model_dir
    engine = Engine(model=model_dir, load_format="dummy", tokenizer_path=tokenizer_dir, enable_overlap=True,
                    max_total_tokens=max(16384, 2 * args.requests * (args.output + 256)))  # all admitted at once
    try:
        schemas = list(_schemas().values())
        params = []
        for i in range(args.requests):
            p = {"temperature": args.temperature, "seed": i, "max_new_tokens": args.output}
            if i < round(args.ratio * args.requests):
                p["json_schema"] = json.dumps(schemas[i % len(schemas)])
            else:
                p["ignore_eos"] = True
            params.append(p)
        prompts = _prompts(args, tokenizer_dir)
        engine.generate(prompts[: min(8, len(prompts))], params[: min(8, len(params))])
        runner = engine.runner
        targets = _CLASS_PARTS + [
            (engine, "_apply_tokens", "settle a step (all of its requests)"),
            (engine, "_settle_for_masks", "settle before the sampling launch (constrained requests)"),
            (step_module, "build_batch_bitmask", "masks"),  # the name sampling_inputs calls
            (engine.scheduler, "schedule", "schedule"),
            (runner, "forward", "forward (the device's on a GPU)"),
            (engine.sampler, "sample", "sampling (the device's on a GPU)"),
        ]
        steps_before = engine.stats()["steps"]
        with timed(targets) as (seconds, calls):
            start = time.perf_counter()
            outputs = engine.generate(prompts, params)
            wall = time.perf_counter() - start
        steps = engine.stats()["steps"] - steps_before
        if args.dump:
            dump(args.dump, engine, prompts, params, outputs)
        return {"steps": steps, "wall_s": wall, "tokens": sum(len(o["output_ids"]) for o in outputs),
                "seconds": dict(seconds), "calls": dict(calls)}
    finally:
        engine.shutdown()


def dump(path: str, engine: Engine, prompts: list[str], params: list[dict], outputs: list[dict]) -> None:
    """Write the constrained requests of the timed run as JSON (``benchmarks/budget_search.py --replay``
    replays their tokens through the grammar and budget steering on another machine): the model's
    vocabulary size, the stop tokens, and per request its schema, budget, prompt and output tokens; with the engine's budget steering counters."""
    requests = [{"json_schema": p["json_schema"], "max_new_tokens": p["max_new_tokens"],
                 "prompt_ids": engine.tokenizer.encode(prompt), "output_ids": out["output_ids"],
                 "finish_reason": out["meta_info"]["finish_reason"]}
                for prompt, p, out in zip(prompts, params, outputs) if "json_schema" in p]
    stats = engine.stats()
    Path(path).write_text(json.dumps({
        "vocab_size": engine.model_config.vocab_size, "stop_ids": sorted(engine.tokenizer.eos_token_ids),
        "budget": {key: value for key, value in stats.items() if key.startswith("budget_")},
        "requests": requests}))


def print_table(args: argparse.Namespace, result: dict) -> None:
    steps = max(result["steps"], 1)
    print(f"structured mix on the CPU: {args.requests} requests, {args.ratio:.0%} constrained, {args.output} tokens, "
          f"temperature {args.temperature}; {result['steps']} steps, {result['tokens']} tokens, {result['wall_s']:.1f} s")
    print("| part | ms a step | calls |")
    print("| --- | ---: | ---: |")
    for part, sec in sorted(result["seconds"].items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {1000 * sec / steps:.2f} | {result['calls'][part]} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a preset with a tokenizer, or a directory with a config and a tokenizer")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the model's)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5, help="share of requests constrained by a JSON schema")
    parser.add_argument("--output", type=int, default=128, help="max_new_tokens")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="prompts of this many tokens of random text, as benchmarks/serving.py's (0: short, alike)")
    parser.add_argument("--seed", type=int, default=0, help="the random prompts' seed")
    parser.add_argument("--dump", default=None, metavar="FILE",
                        help="write the constrained requests' outputs as JSON (budget_search.py --replay reads them)")
    args = parser.parse_args(argv)
    print_table(args, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
