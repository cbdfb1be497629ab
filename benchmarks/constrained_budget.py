"""Valid output within the token budget: share of constrained outputs that parse and validate when
``max_new_tokens`` is tight, with budget steering off and on, on the bundled model.

    python benchmarks/constrained_budget.py [--seeds 3] [--slack 1 4 10] [--temperature 0.7]

For each of ~20 JSON schemas and regexes (``SPECS``), the shortest ending from the grammar's start is
found with ``shortest_completion`` (generous bounds: ``min_tokens``); each request then gets
``max_new_tokens = min_tokens + slack`` for each slack, so an ending fits the budget (by at least the
ending the search found; the true minimum may be shorter). Every (spec, budget, seed) request runs
in one batch with steering off (``engine.constrained.budget_margin = None``) and on (the default).
Reported: the share of outputs that parse and validate (JSON: ``json.loads`` + ``jsonschema``; regex:
``re.fullmatch``), finish reasons, how many requests were steered, the cost of the search per
search (each runs on the engine thread in the step that appends the request's previous token), and
the cost of planning the start state's ending when a request is admitted (``BudgetSteering.prepare``,
on the caller's thread; a generous search once per grammar, cached after).

``--busy N`` keeps N processes spinning on the CPU during both runs (a loaded machine: the searches
are bounded by matcher states, so the outputs should not change; only their wall time does).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonschema

from plait.runtime.constrained import budget as budget_mod
from plait.runtime.constrained.budget import SearchLimits, shortest_completion
from plait.runtime.engine import Engine
from plait.runtime.models.registry import ensure_preset_dir
from plait.sampling import SamplingParams

_STR = {"type": "string"}
_INT = {"type": "integer"}
SPECS: list[tuple[str, dict]] = [
    ("person", {"json_schema": {"type": "object", "properties": {"name": _STR, "age": _INT},
                                "required": ["name", "age"]}}),
    ("address", {"json_schema": {"type": "object", "properties": {
        "street": _STR, "city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "city", "zip"]}}),
    ("nested", {"json_schema": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": _INT, "email": _STR}, "required": ["id", "email"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]}}),
    ("tags", {"json_schema": {"type": "object", "properties": {
        "title": _STR, "tags": {"type": "array", "items": _STR, "minItems": 1}}, "required": ["title", "tags"]}}),
    ("matrix", {"json_schema": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}),
    ("orders", {"json_schema": {"type": "object", "properties": {"orders": {"type": "array", "items": {
        "type": "object", "properties": {"sku": _STR, "qty": _INT}, "required": ["sku", "qty"]}}},
        "required": ["orders"]}}),
    ("enum", {"json_schema": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["small", "medium", "large"]}},
        "required": ["color", "size"]}}),
    ("numbers", {"json_schema": {"type": "object", "properties": {
        "price": {"type": "number", "minimum": 0}, "rating": {"type": "number"}, "count": _INT},
        "required": ["price", "rating", "count"]}}),
    ("sku_pattern", {"json_schema": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "note": _STR}, "required": ["code", "note"]}}),
    ("optional", {"json_schema": {"type": "object", "properties": {
        "a": _STR, "b": _INT, "c": {"type": "array", "items": _INT}}, "required": ["a"]}}),
    ("string", {"json_schema": {"type": "string"}}),
    ("list_objects", {"json_schema": {"type": "array", "items": {"type": "object", "properties": {
        "k": _STR, "v": {"type": "number"}}, "required": ["k", "v"]}}}),
    ("deep", {"json_schema": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "array", "items": _STR}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]}}),
    ("any_object", {"json_schema": {"type": "object"}}),
    ("email_regex", {"regex": r"[a-z]{3,}@[a-z]+\.com"}),
    ("phone_regex", {"regex": r"\(\d{3}\) \d{3}-\d{4}"}),
    ("words_regex", {"regex": r"[A-Z][a-z]+( [a-z]+){2,}\."}),
    ("date_regex", {"regex": r"\d{4}-\d{2}-\d{2}"}),
    ("list_regex", {"regex": r"\[\d+(, \d+)*\]"}),
    ("sentence_regex", {"regex": r"(The|A) [a-z ]{5,40}\."}),
]
PROMPT = "Answer with {what} only. Make it detailed and long."


def valid(spec: dict, text: str) -> bool:
    if "regex" in spec:
        return re.fullmatch(spec["regex"], text) is not None
    try:
        jsonschema.validate(json.loads(text), spec["json_schema"])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def min_tokens(engine: Engine, spec: dict) -> int | None:
    """The length of the shortest ending found from the grammar's start (generous bounds)."""
    grammar = engine.constrained.grammar_for(SamplingParams(**spec))
    state = engine.constrained.new_state(grammar, frozenset())
    roomy = SearchLimits(max_tokens=256, max_nodes=20000, max_seconds=2.0)
    path = shortest_completion(state.matcher, state.info, roomy)
    return None if path is None else len(path)


def run(engine: Engine, jobs: list[tuple], margin: int | None, temperature: float) -> list[dict]:
    engine.constrained.budget_margin = margin
    prompts, params = [], []
    for name, spec, budget, seed in jobs:
        what = "a JSON value" if "json_schema" in spec else f"text matching {spec['regex']}"
        prompts.append(engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT.format(what=what)}]))
        params.append({**spec, "max_new_tokens": budget, "temperature": temperature, "seed": seed})
    return engine.generate(prompts, params)


def _spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--slack", type=int, nargs="+", default=[1, 4, 10])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--search-ms", type=float, default=None,
                    help="time bound of one search (default: the engine's, SearchLimits().max_seconds)")
    ap.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU during the runs")
    args = ap.parse_args()

    searches: list[budget_mod.BudgetSteering] = []
    init = budget_mod.BudgetSteering.__init__

    def tracked_init(self, *a, **k):  # keep every request's steering to read its search counters
        init(self, *a, **k)
        searches.append(self)

    budget_mod.BudgetSteering.__init__ = tracked_init
    prepares: list[float] = []  # seconds of each request's BudgetSteering.prepare
    prepare = budget_mod.BudgetSteering.prepare

    def timed_prepare(self, *a, **k):
        start = time.perf_counter()
        prepare(self, *a, **k)
        prepares.append(time.perf_counter() - start)

    budget_mod.BudgetSteering.prepare = timed_prepare
    engine = Engine(model=str(ensure_preset_dir("smollm2-135m-instruct")), dtype="float32")
    if args.search_ms is not None:
        engine.constrained.budget_limits = SearchLimits(max_seconds=args.search_ms / 1e3)
    print(f"search bounds: {engine.constrained.budget_limits}")
    jobs = []
    min_tokens_cache: dict[str, int] = {}
    for name, spec in SPECS:
        base = min_tokens(engine, spec)
        print(f"{name:16s} shortest ending from the start: {base} tokens")
        if base is None:
            continue
        min_tokens_cache[name] = base
        jobs += [(name, spec, base + slack, seed) for slack in args.slack for seed in range(args.seeds)]
    print(f"\n{len(jobs)} requests ({len(SPECS)} specs x slack {args.slack} x {args.seeds} seeds), "
          f"temperature {args.temperature}\n")
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for proc in spinners:
        proc.start()
    if spinners:
        print(f"{len(spinners)} processes spinning on the CPU during the runs\n")
    for label, margin in (("steering off", None), ("steering on", engine.constrained.budget_margin)):
        searches.clear()
        prepares.clear()
        start = time.perf_counter()
        outs = run(engine, jobs, margin, args.temperature)
        wall = time.perf_counter() - start
        ok = [valid(spec, out["text"]) for (_, spec, _, _), out in zip(jobs, outs)]
        reasons = collections.Counter(out["meta_info"]["finish_reason"]["type"] for out in outs)
        honest = all(out["meta_info"]["incomplete"] == (not v) for v, out in zip(ok, outs))
        steered = sum(out["meta_info"].get("budget_closed", False) for out in outs)
        replaced = sum(s.replaced for s in searches)
        print(f"{label:13s}: valid {sum(ok)}/{len(ok)} ({100 * sum(ok) / len(ok):.1f}%)  finish {dict(reasons)}  "
              f"steered {steered} (a sampled token replaced: {replaced})  incomplete == invalid: {honest}  "
              f"wall {wall:.1f} s")
        per_slack = collections.defaultdict(list)
        for (name, _, budget, _), v in zip(jobs, ok):
            per_slack[budget - min_tokens_cache[name]].append(v)
        print("   by slack: " + ", ".join(f"+{s}: {sum(v)}/{len(v)}" for s, v in sorted(per_slack.items())))
        bad = sorted({name for (name, *_), v in zip(jobs, ok) if not v})
        print(f"   specs with an invalid output: {bad}")
        used = [s for s in searches if s.searches]
        if used:
            total = sum(s.search_seconds for s in used)
            count = sum(s.searches for s in used)
            most = max(s.searches for s in used)
            slowest = max(s.search_max_seconds for s in used)
            print(f"   search: {count} searches over {len(used)} requests (max {most} per request), "
                  f"mean {total / count * 1e3:.2f} ms, slowest {slowest * 1e3:.2f} ms; "
                  f"{total:.2f} s in all ({100 * total / wall:.1f}% of the wall time)")
        if prepares:
            print(f"   planned at admission (start state's ending, off the engine thread): {len(prepares)} requests, "
                  f"{sum(prepares):.2f} s in all, slowest {max(prepares) * 1e3:.1f} ms (a grammar's first, "
                  f"generous search), median {sorted(prepares)[len(prepares) // 2] * 1e3:.2f} ms")
    for proc in spinners:
        proc.terminate()
    engine.shutdown()


if __name__ == "__main__":
    main()
