"""MaskBench: plait's constrained path and raw llguidance side by side on the public JSON-schema mask
benchmark (the ``maskbench/data`` files of the JSONSchemaBench repository).

    python benchmarks/maskbench.py DATA_DIR [--sample N --seed S] [--backend llguidance|auto]

``DATA_DIR`` holds the unpacked ``*.json`` files (each: ``schema`` and ``tests``, a list of
``{"data", "valid"}``). The pass rule is upstream's: each instance is serialized with
``json.dumps(data, ensure_ascii=False)`` (separators ``", "`` / ``": "``), tokenized without special
tokens by the bundled model's tokenizer, and walked token by token: compute the mask, check the
token's bit, consume it. A schema passes when it compiles, every valid instance is accepted to the end
(in an accepting state), and every invalid instance is refused at some token or ends non-accepting.

Two sides:

- plait: ``spec_from_params`` (plait's limits and normalization), ``GrammarCompiler.compile`` (in this
  process, with the compile timeout), ``GrammarState`` (mask with stop-token bits, ``accept_token``).
- llguidance: the same package called directly with its default JSON options
  (``grammar_from_json_schema`` + ``LLMatcher`` on the same token table). ``--llguidance-options plait``
  gives it plait's JSON options instead (``json_schema_grammar``: fixed separators, at most one space
  between JSON tokens): the same grammar on both sides, so that the difference is plait's own work
  rather than the cost of its grammar.

A schema that no backend compiles exactly compiles relaxed in plait (docs/constrained.md, "Relaxed
schemas"); for the exact pass figure that is a ``compile`` failure, as before. The second figure,
*usable*, counts the schemas that pass exactly, plus those whose relaxed grammar accepts every valid
instance and whose validator (``jsonschema`` against the original schema) passes each of them: a valid
document can be produced and is recognised as valid. An invalid instance that the relaxed grammar accepts
and the validator passes would be delivered as valid: those are counted (``invalid delivered as
valid``, must be 0) and the schema is not usable. llguidance fixes the order of an object's properties
(its JSON schema docs: "order of properties is fixed to the order in schema"; with ``anyOf`` branches,
sibling properties first), so an instance whose keys come in another order is refused although the
same document with its keys reordered is valid and can be generated; a third figure, *usable in key
order*, also counts a relaxed schema whose refused valid instances are accepted once their object keys
are put in an order the grammar allows (``KeyOrderWalk``: a backtracking search over key orders,
bounded by steps and by 1 s per instance, so it undercounts).

Failure kinds: ``limit`` (plait refuses the schema before compiling: past ``GrammarLimits``, e.g. the
128 KiB ``grammar_max_bytes``; ``--max-bytes`` raises it), ``compile`` (refused or failed to compile),
``timeout`` (plait's compile timeout), ``valid_rejected``, ``invalid_accepted``. Compile time is per
schema (plait: ``SamplingParams``, spec normalization and the compile, on the calling thread, which
checks the grammar allows some output with its first mask and keeps that mask as every request's
first; llguidance: schema translation and the matcher); mask time is per token. Since plait's compile
computes a first mask that llguidance's does not (plait's first ``fill_bitmask`` then copies it),
"compile + first mask" adds the first mask of the schema's first instance to each side's compile: the
time until a request's first token can be sampled.

Fairness: both sides are timed with ``time.perf_counter`` around the same calls of the same
``Side.run``; both get one untimed warm-up (a small schema compiled and walked: plait's token table
and backend, llguidance's tokenizer); which side runs first alternates from schema to schema
(the second finds caches warm: with plait always first, as before, llguidance's matchers built ~8%
faster than plait's backend built the same kind of matcher, and its first masks ran ~3x faster); the
garbage collector stays on for both, as in a server.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from plait.runtime.constrained import ConstraintError, GrammarCompiler, GrammarState, spec_from_params  # noqa: E402
from plait.runtime.constrained.limits import GrammarLimits  # noqa: E402
from plait.runtime.constrained.vocab import TokenizerInfo  # noqa: E402
from plait.sampling import SamplingParams  # noqa: E402

class LimitError(Exception):
    """plait refused the schema before compiling it (its limits, or a malformed schema)."""


class RelaxedOnly(Exception):
    """plait compiled the schema only relaxed: not an exact pass (the grammar is in ``PlaitSide.relaxed``)."""


KINDS = ("limit", "compile", "timeout", "valid_rejected", "invalid_accepted")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def load_cases(data_dir: Path, sample: int | None, seed: int) -> list[tuple[str, dict]]:
    """(file name, parsed file) for every ``*.json`` in ``data_dir``, or a seeded sample of them."""
    files = sorted(data_dir.glob("*.json"))
    if not files:
        raise SystemExit(f"no *.json files in {data_dir} (unpack the MaskBench archive there)")
    if sample is not None and sample < len(files):
        files = sorted(random.Random(seed).sample(files, sample))
    return [(f.name, json.loads(f.read_text(encoding="utf-8"))) for f in files]


def instances(case: dict, info: TokenizerInfo) -> list[tuple[list[int], bool]]:
    """(tokens, valid) of each test instance, serialized and tokenized as upstream does."""
    return [(info.encode(json.dumps(t["data"], indent=None, ensure_ascii=False)), bool(t["valid"]))
            for t in case.get("tests", [])]


class Side:
    """One way of constraining: ``compile(schema)`` -> matcher factory; matchers walk tokens."""

    name = ""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.row = torch.zeros(info.bitmask_words, dtype=torch.int32)
        self.mask_s: list[float] = []
        self.compile_s: list[float] = []
        self.first_s: list[float] = []  # compile + the first instance's first mask

    def walk(self, matcher, tokens: list[int]) -> bool:
        """Whether every token is allowed by the mask and consumed, ending in an accepting state."""
        row = self.row
        for token in tokens:
            start = time.perf_counter()
            self.fill(matcher, row)
            self.mask_s.append(time.perf_counter() - start)
            if not (int(row[token >> 5]) >> (token & 31)) & 1 or not self.consume(matcher, token):
                return False
        return self.accepting(matcher)

    def run(self, schema: object, tests: list[tuple[list[int], bool]]) -> str | None:
        """None when the schema passes, else its failure kind (and the detail in ``self.detail``)."""
        self.detail = ""
        start = time.perf_counter()
        try:
            new_matcher = self.compile(schema)
        except TimeoutError as exc:
            self.detail = str(exc)
            return "timeout"
        except LimitError as exc:
            self.detail = str(exc)
            return "limit"
        except RelaxedOnly as exc:
            self.detail = str(exc)
            return "compile"
        except Exception as exc:  # noqa: BLE001 -- any refusal or library error is a compile failure
            self.detail = str(exc)[:200]
            return "compile"
        compiled = time.perf_counter() - start
        self.compile_s.append(compiled)
        first = len(self.mask_s)
        try:
            for i, (tokens, valid) in enumerate(tests):
                if self.walk(new_matcher(), tokens) != valid:
                    self.detail = f"instance {i}"
                    return "valid_rejected" if valid else "invalid_accepted"
            return None
        finally:
            if len(self.mask_s) > first:
                self.first_s.append(compiled + self.mask_s[first])


class KeyOrderWalk:
    """Whether a matcher accepts a JSON value with its objects' keys in some order (the first order the
    grammar allows, found by backtracking with ``rollback``; at most ``budget`` steps and ``limit_s``
    seconds, past which the value counts as refused)."""

    def __init__(self, info: TokenizerInfo, budget: int = 5000, limit_s: float = 1.0):
        self.info, self.budget, self.limit_s = info, budget, limit_s
        self.row = torch.zeros(info.bitmask_words, dtype=torch.int32)

    def accepts(self, matcher, value: object) -> bool:
        self.left, self.deadline = self.budget, time.perf_counter() + self.limit_s
        try:
            return self._value(matcher, value) is not None and matcher.can_terminate()
        except (_OutOfBudget, RuntimeError):  # RuntimeError: a rollback the matcher could not do
            return False

    def _feed(self, m, text: str) -> int | None:
        """Consume ``text``'s tokens: their count, or None (and ``m`` unchanged) if one is refused."""
        ids, row = self.info.encode(text), self.row
        for i, token in enumerate(ids):
            m.fill_bitmask(row)  # checked first: a refused token may leave the matcher in error
            if not (int(row[token >> 5]) >> (token & 31)) & 1 or not m.consume(token):
                if i:
                    m.rollback(i)
                return None
        return len(ids)

    def _value(self, m, v: object) -> int | None:
        self._spend()
        if isinstance(v, dict):
            n = self._feed(m, "{")
            if n is None:
                return None
            rest = self._members(m, v, list(v), True)
            if rest is None:
                m.rollback(n)
                return None
            return n + rest
        if isinstance(v, list):
            used = self._feed(m, "[")
            if used is None:
                return None
            for i, item in enumerate(v):
                step = self._item(m, item, i > 0)
                if step is None:
                    m.rollback(used)
                    return None
                used += step
            end = self._feed(m, "]")
            if end is None:
                m.rollback(used)
                return None
            return used + end
        return self._feed(m, json.dumps(v, ensure_ascii=False))

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0 or time.perf_counter() > self.deadline:
            raise _OutOfBudget

    def _item(self, m, item: object, separated: bool) -> int | None:
        a = self._feed(m, ", ") if separated else 0
        if a is None:
            return None
        b = self._value(m, item)
        if b is None and a:
            m.rollback(a)
        return None if b is None else a + b

    def _members(self, m, v: dict, keys: list, first: bool) -> int | None:
        if not keys:
            return self._feed(m, "}")
        for key in keys:
            self._spend()
            a = self._feed(m, ("" if first else ", ") + json.dumps(key, ensure_ascii=False) + ": ")
            if a is None:
                continue
            b = self._value(m, v[key])
            c = None if b is None else self._members(m, v, [k for k in keys if k != key], False)
            if c is not None:
                return a + b + c
            m.rollback(a + (b or 0))
        return None


class _OutOfBudget(Exception):
    pass


class PlaitSide(Side):
    name = "plait"

    def __init__(self, info: TokenizerInfo, backend: str, timeout_s: float, limits: GrammarLimits):
        super().__init__(info)
        self.limits = limits
        self.compiler = GrammarCompiler(info, backend=backend, timeout_s=timeout_s, cache_size=4, max_workers=1)
        self.stop_ids = frozenset(info.stop_ids)
        self.relaxed = None  # the last schema's grammar when it compiled only relaxed
        self.key_order = KeyOrderWalk(info)

    def compile(self, schema: object):
        self.relaxed = None
        try:
            spec = spec_from_params(SamplingParams(json_schema=json.dumps(schema)), self.limits)
        except ConstraintError as exc:
            raise LimitError(str(exc)) from None
        try:
            grammar = self.compiler.compile(spec)
        except ConstraintError as exc:
            if "took longer than" in str(exc):
                raise TimeoutError(str(exc)) from None
            raise
        if grammar.relaxation is not None:
            self.relaxed = grammar
            raise RelaxedOnly(f"compiles only relaxed: {', '.join(grammar.relaxation.keywords)}")
        return lambda: GrammarState(grammar, self.info, self.stop_ids, jump_forward=False)

    def usable_relaxed(self, tests: list[tuple[list[int], bool]], data: list) -> tuple[bool, bool, int, str]:
        """For the schema that compiled only relaxed: (usable, usable in key order, invalid instances the
        grammar accepts and the validator passes, why not usable). Usable: every valid instance is
        accepted and validates; in key order: the same once refused instances' keys are reordered."""
        grammar, why, delivered, reordered = self.relaxed, "", 0, True
        validator = grammar.relaxation.validator
        for i, ((tokens, valid), value) in enumerate(zip(tests, data)):
            text = json.dumps(value, indent=None, ensure_ascii=False)
            accepted = self.walk(GrammarState(grammar, self.info, self.stop_ids, jump_forward=False), tokens)
            validates = validator.error(text) is None
            if valid and not (accepted and validates):
                why = why or f"valid instance {i} {'not validated' if accepted else 'refused by the relaxed grammar'}"
                reordered = reordered and validates and not accepted and self.key_order.accepts(grammar.new_matcher(), value)
            if not valid and accepted and validates:
                delivered += 1
                why = why or f"invalid instance {i} accepted and validated"
        return not why, not delivered and reordered, delivered, why

    @staticmethod
    def fill(state: GrammarState, row: torch.Tensor) -> None:
        state.fill_bitmask(row)

    @staticmethod
    def consume(state: GrammarState, token: int) -> bool:
        reason = state.accept_token(token)
        return reason is None or reason["type"] != "abort"

    @staticmethod
    def accepting(state: GrammarState) -> bool:
        return state.complete


class LLGuidanceSide(Side):
    name = "llguidance"

    def __init__(self, info: TokenizerInfo, tokenizer, options: str = "default"):
        super().__init__(info)
        import llguidance

        from plait.runtime.constrained.backends.llguidance_backend import json_schema_grammar

        self.llg, self.tokenizer = llguidance, tokenizer
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema
        if options == "plait":
            self.grammar = lambda text: json_schema_grammar(llguidance, text)
        elif options != "default":
            raise ValueError(f"llguidance options are 'default' or 'plait', not {options!r}")

    def compile(self, schema: object):
        grammar = self.grammar(json.dumps(schema))
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher.deep_copy

    @staticmethod
    def fill(matcher, row: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    @staticmethod
    def consume(matcher, token: int) -> bool:
        return bool(matcher.consume_token(token)) and not matcher.is_error()

    @staticmethod
    def accepting(matcher) -> bool:
        return bool(matcher.is_accepting())


def run(data_dir: Path, sample: int | None, seed: int, backend: str = "llguidance", timeout_s: float = 30.0,
        limits: GrammarLimits | None = None, info: TokenizerInfo | None = None, verbose: bool = False,
        llguidance_options: str = "default") -> dict:
    """Walk the cases through both sides; returns {side: {"tried", "pass", kinds..., "failed": [...],
    "compile_s", "first_s", "mask_s"}}; plait's also has "relaxed" (schemas compiled only relaxed), "usable" (exact
    passes plus usable relaxed ones), "invalid_delivered" and "not_usable" (relaxed: [(name, why)])."""
    if info is None:
        from plait.runtime.models.registry import ensure_preset_dir
        from plait.runtime.tokenizer import Tokenizer

        info = TokenizerInfo.from_tokenizer(Tokenizer.from_dir(ensure_preset_dir("smollm2-135m-instruct")))
    plait_side = PlaitSide(info, backend, timeout_s, limits or GrammarLimits())
    plait_side.compiler.backend_named("llguidance")  # load the backend outside the timed compiles
    from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend

    sides = [plait_side, LLGuidanceSide(info, LLGuidanceBackend().tokenizer_for(info), llguidance_options)]
    warm_up = {"type": "object", "properties": {"a": {"type": "string"}}}
    for side in sides:  # untimed: plait's token table and backend, both sides' first grammar
        side.run(warm_up, [(info.encode('{"a": "x"}'), True)])
        for times in (side.compile_s, side.mask_s, side.first_s):
            times.clear()
    results = {s.name: {"tried": 0, "pass": 0, **{k: 0 for k in KINDS}, "failed": []} for s in sides}
    results["plait"].update(relaxed=0, usable=0, usable_key_order=0, invalid_delivered=0, not_usable=[])
    cases = load_cases(data_dir, sample, seed)
    for n, (name, case) in enumerate(cases, 1):
        tests = instances(case, info)
        for side in sides if n % 2 else sides[::-1]:  # who goes first alternates (caches warmed by the other)
            res = results[side.name]
            res["tried"] += 1
            kind = side.run(case["schema"], tests)
            if kind is None:
                res["pass"] += 1
            else:
                res[kind] += 1
                res["failed"].append((name, kind, side.detail))
            if side is plait_side:
                res["usable"] += kind is None
                res["usable_key_order"] += kind is None
                if kind is not None and plait_side.relaxed is not None:
                    res["relaxed"] += 1
                    data = [t["data"] for t in case.get("tests", [])]
                    usable, key_order, delivered, why = plait_side.usable_relaxed(tests, data)
                    res["usable"] += usable
                    res["usable_key_order"] += key_order
                    res["invalid_delivered"] += delivered
                    if not usable:
                        res["not_usable"].append((name, why))
        if verbose and n % 500 == 0:
            print(f"  {n}/{len(cases)} " + ", ".join(f"{k} {v['pass']}" for k, v in results.items()), file=sys.stderr)
    plait_side.compiler.shutdown()
    for side in sides:
        results[side.name]["compile_s"] = side.compile_s
        results[side.name]["mask_s"] = side.mask_s
        results[side.name]["first_s"] = side.first_s
    return results


def table(results: dict) -> str:
    lines = ["| side | tried | pass | limit | compile | timeout | valid rejected | invalid accepted "
             "| compile p50 / p99 ms | compile + first mask p50 / p99 ms | mask p50 / p99 us |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        c, f, m = r["compile_s"], r["first_s"], r["mask_s"]
        lines.append(f"| {name} | {r['tried']} | {r['pass']} | {r['limit']} | {r['compile']} | {r['timeout']} "
                     f"| {r['valid_rejected']} "
                     f"| {r['invalid_accepted']} | {pct(c, 50) * 1e3:.2f} / {pct(c, 99) * 1e3:.1f} "
                     f"| {pct(f, 50) * 1e3:.2f} / {pct(f, 99) * 1e3:.1f} "
                     f"| {pct(m, 50) * 1e6:.1f} / {pct(m, 99) * 1e6:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path, help="folder of the unpacked MaskBench *.json files")
    ap.add_argument("--sample", type=int, default=None, help="run N schemas drawn with --seed (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="llguidance", help="plait's backend choice (llguidance, or auto: "
                    "with the outlines fallback)")
    ap.add_argument("--timeout", type=float, default=30.0, help="plait's compile timeout, seconds")
    ap.add_argument("--max-bytes", type=int, default=GrammarLimits().max_bytes,
                    help="plait's grammar_max_bytes (default: the engine's)")
    ap.add_argument("--llguidance-options", choices=("default", "plait"), default="default",
                    help="raw llguidance's JSON options: its defaults, or plait's (the same grammar on both sides)")
    ap.add_argument("--show-failures", action="store_true", help="list each failed schema and why")
    args = ap.parse_args()
    import llguidance

    start = time.perf_counter()
    results = run(args.data_dir, args.sample, args.seed, args.backend, args.timeout,
                  GrammarLimits(max_bytes=args.max_bytes), verbose=True, llguidance_options=args.llguidance_options)
    print(f"MaskBench, {platform.machine()} {platform.system()}, llguidance {llguidance.__version__}, "
          f"plait backend {args.backend}, llguidance options {args.llguidance_options}, "
          f"grammar_max_bytes {args.max_bytes}, "
          f"sample {args.sample or 'all'} (seed {args.seed}), "
          f"{time.perf_counter() - start:.0f} s")
    print(table(results))
    plait_failed = {f[0] for f in results["plait"]["failed"]}
    llg_failed = {f[0] for f in results["llguidance"]["failed"]}
    p = results["plait"]
    print(f"plait exact passes: {p['pass']} of {p['tried']}; usable (exact, or relaxed with every valid instance "
          f"accepted and validated): {p['usable']} of {p['tried']} ({p['relaxed']} compiled only relaxed, "
          f"{p['relaxed'] - len(p['not_usable'])} of them usable); invalid delivered as valid: {p['invalid_delivered']}")
    print(f"usable in key order (also counting relaxed schemas whose refused valid instances are accepted with "
          f"their keys in an order the grammar allows): {p['usable_key_order']} of {p['tried']}")
    for name, why in p["not_usable"] if args.show_failures else p["not_usable"][:20]:
        print(f"  relaxed, not usable: {name} {why}")
    print(f"plait fails, llguidance passes: {len(plait_failed - llg_failed)}; "
          f"llguidance fails, plait passes: {len(llg_failed - plait_failed)}")
    for name, kind, detail in results["plait"]["failed"]:
        if args.show_failures or name not in llg_failed:
            print(f"  plait {kind}: {name} {detail}")


if __name__ == "__main__":
    main()
