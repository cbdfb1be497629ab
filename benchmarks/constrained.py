"""Constrained decoding benchmark: compile time and mask time per backend, end-to-end tokens/s.

    python benchmarks/constrained.py [--quick] [--skip-e2e]

1. Compile time p50/p99 per backend over the schema corpus (tests/runtime/constrained/schema_corpus.py)
   and over a regex set; a backend that refuses a spec (outlines: keywords it cannot translate
   exactly) is counted, not timed.
2. Mask time per token p50/p99: the corpus' valid documents walked through each backend's matcher,
   timing ``GrammarState.fill_bitmask`` (backend mask + stop-token bits) at every token.
3. End to end on the bundled model, batch 8, greedy: JSON schema (fixed keys) with and without
   jump-forward vs unconstrained generation of exactly as many tokens per request (same batch shape
   over time). Tokens/s counts generated tokens (forced ones included) per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plait.runtime.constrained import (
    ConstraintError,
    ConstraintKind,
    ConstraintSpec,
    GrammarCompiler,
    GrammarState,
)
from plait.runtime.constrained.vocab import TokenizerInfo
from tests.runtime.constrained.schema_corpus import CASES

REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[a-z]+@[a-z]+\.(com|org)", r"\(\d{3}\) \d{3}-\d{4}",
           r"[A-Z][a-z]{2,10}( [A-Z][a-z]{2,10}){0,2}", r"-?\d+(\.\d+)?", r"(true|false)", r"#[0-9a-f]{6}",
           r"\d{4}-\d{2}-\d{2}", r"[a-z_][a-z0-9_]{0,15}"]
# Names and cities in Latin letters: with any characters allowed, one request wrote katakana (several
# byte-level tokens per character), ran to max_new_tokens and set the batch's step count alone.
_WORD = {"type": "string", "pattern": "^[A-Za-z][A-Za-z .'-]{0,23}$"}
FIXED_KEYS = {"type": "object", "properties": {
    "name": _WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": _WORD, "email": {"type": "string", "format": "email", "maxLength": 40},
    "member": {"type": "boolean"}}, "required": ["name", "age", "city", "email", "member"], "additionalProperties": False}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def fmt_ms(values: list[float]) -> str:
    return f"p50 {pct(values, 50) * 1e3:8.3f} ms   p99 {pct(values, 99) * 1e3:8.3f} ms   (n={len(values)})"


def compile_times(info: TokenizerInfo, backend: str, specs: list[ConstraintSpec]) -> tuple[list[float], int, dict]:
    compiler = GrammarCompiler(info, backend=backend, cache_size=len(specs) + 8)
    compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "warm"))  # builds the backend's tokenizer view
    times, refused, grammars = [], 0, {}
    for spec in specs:
        start = time.perf_counter()
        try:
            grammars[spec] = compiler.compile(spec, timeout_s=120)
        except ConstraintError:
            refused += 1
            continue
        times.append(time.perf_counter() - start)
    compiler.shutdown()
    return times, refused, grammars


def mask_times(info: TokenizerInfo, grammars: dict, docs: dict) -> list[float]:
    import torch

    row = torch.empty(info.bitmask_words, dtype=torch.int32)
    times = []
    for spec, grammar in grammars.items():
        for text in docs.get(spec, []):
            state = GrammarState(grammar, info, frozenset({2}))
            for token in info.encode(text):
                start = time.perf_counter()
                state.fill_bitmask(row)
                times.append(time.perf_counter() - start)
                if state.accept_token(token) is not None:
                    break
    return times


def grammar_benchmarks(info: TokenizerInfo, quick: bool) -> list[str]:
    lines = []
    cases = CASES[::4] if quick else CASES
    json_specs = [ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(c.schema)) for c in cases]
    docs = {s: [json.dumps(d, ensure_ascii=False) for d in c.valid] for s, c in zip(json_specs, cases)}
    regex_specs = [ConstraintSpec(ConstraintKind.REGEX, r) for r in REGEXES]
    for kind, specs in (("json_schema", json_specs), ("regex", regex_specs)):
        for backend in ("llguidance", "outlines"):
            times, refused, grammars = compile_times(info, backend, specs)
            lines.append(f"compile  {kind:11s} {backend:10s} {fmt_ms(times)}  refused {refused}/{len(specs)}")
            print(lines[-1], flush=True)
            if kind == "json_schema":
                masks = mask_times(info, grammars, docs)
                lines.append(f"mask     {kind:11s} {backend:10s} {fmt_ms(masks)}  per token")
                print(lines[-1], flush=True)
    return lines


def e2e(quick: bool) -> list[str]:
    from plait.runtime.engine import Engine

    engine = Engine()
    chat = engine.tokenizer.apply_chat_template
    people = ["a nurse from Lyon", "a retired pilot", "a student in Osaka", "a chef", "a violinist", "a farmer",
              "a software engineer", "a librarian in Oslo"]
    prompts = [chat([{"role": "user", "content": f"Describe {p} as JSON with name, age, city, email, member."}])
               for p in people]
    n = 48 if quick else 96
    json_params = [{"temperature": 0, "max_new_tokens": n, "json_schema": FIXED_KEYS}] * 8
    lengths = [o["meta_info"]["completion_tokens"] for o in engine.generate(prompts, json_params)]  # also warms up
    runs = {
        "unconstrained": [{"temperature": 0, "max_new_tokens": k, "min_new_tokens": k} for k in lengths],
        "json_schema, jump-forward off": json_params,
        "json_schema, jump-forward on": json_params,
    }
    lines = []
    results = {}
    for name, params in runs.items():
        engine.constrained.jump_forward = "off" not in name
        best = None
        for _ in range(1 if quick else 2):
            engine.flush_cache()
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            wall = time.perf_counter() - start
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            forced = sum(o["meta_info"].get("forced_tokens", 0) for o in outs)
            if best is None or tokens / wall > best[0]:
                best = (tokens / wall, tokens, forced, wall)
        results[name] = best
        lines.append(f"e2e batch 8  {name:30s} {best[0]:7.1f} tok/s  ({best[1]} tokens, {best[2]} forced, {best[3]:.2f} s)")
        print(lines[-1], flush=True)
    base = results["unconstrained"][0]
    for name in list(runs)[1:]:
        lines.append(f"  {name}: {100 * results[name][0] / base:.0f}% of unconstrained tok/s")
        print(lines[-1], flush=True)
    engine.shutdown()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the corpus, one e2e repeat")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    from plait.runtime.models.registry import ensure_preset_dir
    from plait.runtime.tokenizer import Tokenizer

    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    info = TokenizerInfo.from_tokenizer(Tokenizer.from_dir(ensure_preset_dir("smollm2-135m-instruct")))
    grammar_benchmarks(info, args.quick)
    if not args.skip_e2e:
        e2e(args.quick)


if __name__ == "__main__":
    main()
