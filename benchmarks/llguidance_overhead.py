"""plait's llguidance path against raw llguidance: compile and per-token mask time, Python callbacks.

    python benchmarks/llguidance_overhead.py [--quick] [--repeats N]

On the bundled tokenizer, over the JSON schemas of tests/runtime/constrained/schema_corpus.py:

- raw: llguidance alone, as its own docs use it: ``llguidance.hf.from_tokenizer``, compile =
  ``grammar_from_json_schema`` + ``LLMatcher``; mask = ``unsafe_compute_mask_ptr`` into a torch row,
  then ``consume_token``.
- plait native / plait wrapper: ``GrammarCompiler(backend="llguidance").compile`` (translation,
  validation, a probe matcher and its first mask, the shared matcher) and ``GrammarState.fill_bitmask``
  (backend mask + stop-token bits) then ``accept_token``; with the LLTokenizer built natively from the
  tokenizer's JSON or from the Python ``_Vocabulary`` wrapper (what every tokenizer used before).

Masks are timed at every token of the corpus' valid documents. The paths alternate schema by schema
and document by document so that a busy machine slows them alike. Callbacks: calls of the wrapper's
Python ``__call__`` (tokenization requested by llguidance), per masked token and per compile.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from plait.runtime.constrained import ConstraintKind, ConstraintSpec, GrammarCompiler, GrammarState
from plait.runtime.constrained.backends import llguidance_backend
from plait.runtime.constrained.vocab import TokenizerInfo
from tests.runtime.constrained.schema_corpus import CASES

PATHS = ("raw", "plait native", "plait wrapper")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


class Counter:
    """Counts the wrapper's Python ``__call__`` (patched on the class, so every instance counts)."""

    def __init__(self) -> None:
        self.calls = 0
        original = llguidance_backend._Vocabulary.__call__

        def counted(vocab, text):
            self.calls += 1
            return original(vocab, text)

        llguidance_backend._Vocabulary.__call__ = counted


class Raw:
    def __init__(self, info: TokenizerInfo):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(info.tokenizer.hf, n_vocab=info.vocab_size,
                                                eos_token=sorted(info.stop_ids))

    def compile(self, spec: ConstraintSpec):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(spec.source, overrides=llguidance_backend.JSON_OPTIONS)
        return self.llg.LLMatcher(self.tok, grammar, log_level=0)

    def walk(self, matcher, tokens: list[int], row: torch.Tensor, times: list[float]) -> None:
        m = matcher.deep_copy()
        ptr, size = row.data_ptr(), row.numel() * row.element_size()
        for token in tokens:
            start = time.perf_counter()
            m.unsafe_compute_mask_ptr(ptr, size)
            times.append(time.perf_counter() - start)
            if not m.consume_token(token):
                break


class Plait:
    def __init__(self, info: TokenizerInfo, native: bool):
        self.info, self.native = info, native
        self.compiler = GrammarCompiler(info, backend="llguidance", cache_size=100_000)
        with self._vocabulary():
            self.compiler.compile(ConstraintSpec(ConstraintKind.REGEX, "warm"))  # builds the LLTokenizer
        backend = self.compiler._backends["llguidance"]
        if hasattr(backend, "vocabulary_kind"):  # older plait: always the wrapper (to measure "before")
            assert backend.vocabulary_kind(info) == ("native" if native else "wrapper")

    def _vocabulary(self):
        native = self.native

        class Scope:
            def __enter__(self):
                llguidance_backend.LLGuidanceBackend.native_vocabulary = native

            def __exit__(self, *exc):
                llguidance_backend.LLGuidanceBackend.native_vocabulary = True

        return Scope()

    def compile(self, spec: ConstraintSpec):
        return self.compiler.compile(spec, timeout_s=120)

    def walk(self, grammar, tokens: list[int], row: torch.Tensor, times: list[float]) -> None:
        state = GrammarState(grammar, self.info, frozenset(self.info.stop_ids))
        for token in tokens:
            start = time.perf_counter()
            state.fill_bitmask(row)
            times.append(time.perf_counter() - start)
            if state.accept_token(token) is not None:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a third of the corpus")
    parser.add_argument("--repeats", type=int, default=3, help="mask walks per document and path")
    args = parser.parse_args()

    from plait.runtime.models.registry import ensure_preset_dir
    from plait.runtime.tokenizer import Tokenizer

    info = TokenizerInfo.from_tokenizer(Tokenizer.from_dir(ensure_preset_dir("smollm2-135m-instruct")))
    counter = Counter()
    build: dict[str, float] = {}
    paths = {}
    for name in PATHS:
        start = time.perf_counter()
        paths[name] = Raw(info) if name == "raw" else Plait(info, native=name == "plait native")
        build[name] = time.perf_counter() - start

    cases = CASES[::3] if args.quick else CASES
    specs = [ConstraintSpec(ConstraintKind.JSON_SCHEMA, json.dumps(c.schema)) for c in cases]
    docs = {s: [info.encode(json.dumps(d, ensure_ascii=False)) for d in c.valid] for s, c in zip(specs, cases)}
    compile_t = {n: [] for n in PATHS}
    mask_t = {n: [] for n in PATHS}
    calls = {n: {"compile": 0, "mask": 0} for n in PATHS}
    compiled = {n: {} for n in PATHS}
    for spec in specs:
        for name in PATHS:
            before = counter.calls
            start = time.perf_counter()
            try:
                compiled[name][spec] = paths[name].compile(spec)
            except Exception as exc:  # noqa: BLE001 -- counted, reported below
                print(f"{name}: refused {spec.source[:60]}: {exc}", file=sys.stderr)
                continue
            compile_t[name].append(time.perf_counter() - start)
            calls[name]["compile"] += counter.calls - before
    row = torch.zeros(info.bitmask_words, dtype=torch.int32)
    for _ in range(args.repeats):
        for spec in specs:
            for tokens in docs[spec]:
                for name in PATHS:
                    if spec in compiled[name]:
                        before = counter.calls
                        paths[name].walk(compiled[name][spec], tokens, row, mask_t[name])
                        calls[name]["mask"] += counter.calls - before

    print(f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"llguidance {llguidance_backend._import().__version__}, vocabulary {info.vocab_size}")
    print(f"# {len(specs)} JSON schemas, {sum(len(d) for d in docs.values())} documents x {args.repeats} walks")
    print("| path | tokenizer build | compile p50 / p99 | mask p50 / p99 per token | callbacks per compile | "
          "callbacks per masked token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in PATHS:
        c, m = compile_t[name], mask_t[name]
        print(f"| {name} | {build[name]:.2f} s | {pct(c, 50) * 1e3:.3f} / {pct(c, 99) * 1e3:.3f} ms (n={len(c)}) | "
              f"{pct(m, 50) * 1e6:.1f} / {pct(m, 99) * 1e6:.0f} us (n={len(m)}) | "
              f"{calls[name]['compile'] / max(1, len(c)):.2f} | {calls[name]['mask'] / max(1, len(m)):.3f} |")
    raw_c, raw_m = compile_t["raw"], mask_t["raw"]
    for name in PATHS[1:]:
        c, m = compile_t[name], mask_t[name]
        print(f"# {name} / raw: compile p50 {pct(c, 50) / pct(raw_c, 50):.2f}x p99 {pct(c, 99) / pct(raw_c, 99):.2f}x; "
              f"mask p50 {pct(m, 50) / pct(raw_m, 50):.2f}x p99 {pct(m, 99) / pct(raw_m, 99):.2f}x")
    for name in PATHS[1:]:
        paths[name].compiler.shutdown()


if __name__ == "__main__":
    main()
