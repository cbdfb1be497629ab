"""The benchmark's workloads on one plait engine (rows a, b, c, d, f) and the table row type.

Prompts are random token ids (seeded), sampling is greedy with ``ignore_eos``, and every
configuration runs once untimed before it is timed. Throughput and TTFT runs (rows c, d, f) flush the
prefix cache first, so runs with the same prompts prefill the same way. Decode rates (rows a, b) are
timed with the prompts' KV already cached by the untimed run, so a timed run is one token of prefill
per request and then pure decode steps: with chunked prefill, decode steps of the requests admitted
first ride along in the prefill steps of the others, and where prefill is slow (GPT-OSS at batch 256 x
1024 tokens: 24 s of prefill against 8 s of decode) timing the whole run cannot separate the two. ``machine`` and ``facts`` are
``plait.bench.gpu.Machine`` and ``ModelFacts``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Row:
    """One table row: results and floors already formatted."""

    key: str  # "card", "a" ... "f"
    name: str
    result: str
    floor: str = ""
    of_floor: str = ""
    notes: str = ""


def fmt(value: float) -> str:
    """A rate or size for the table: thousands separators when large, 3 significant digits when small."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def rate_row(key: str, name: str, value: float, unit: str, floor: float | None, notes: str = "") -> Row:
    """A throughput row; ``of floor`` = value / floor (1.0 = at the floor)."""
    if floor is None:
        return Row(key, name, f"{fmt(value)} {unit}", notes=notes)
    return Row(key, name, f"{fmt(value)} {unit}", f"{fmt(floor)} {unit}", f"{value / floor:.2f}", notes)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy(new_tokens: int) -> dict[str, Any]:
    """Sampling parameters of every benchmark request: greedy, exactly ``new_tokens`` tokens."""
    return {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}


def timed_median(fn: Callable[[], float], repeats: int) -> float:
    """Median of ``repeats`` calls of ``fn``, which returns its own elapsed seconds."""
    return statistics.median(fn() for _ in range(repeats))


@dataclass
class SharedPrefixResult:
    """One run of the shared-prefix workload (row d) on one engine."""

    seconds: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    retractions: int
    kv_tokens: int  # the engine's KV cache capacity

    @property
    def total_rate(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens


@dataclass
class Workloads:
    """Rows a, b, c, f and one half of row d, run on ``engine``.

    ``plait_rates`` collects plait's decode tok/s by (batch, prompt length, new tokens) for row e.
    """

    engine: Any
    facts: Any
    machine: Any
    sizes: Any
    repeats: int
    seed: int
    plait_rates: dict[tuple[int, int, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = self.engine.runner.device
        self.vocab = self.engine.model_config.vocab_size
        self._rng = np.random.default_rng(self.seed)

    # ------------------------------------------------------------------ helpers
    def prompts(self, count: int, length: int) -> list[list[int]]:
        """``count`` random prompts of ``length`` token ids."""
        return self._rng.integers(0, self.vocab, size=(count, length)).tolist()

    def generate_timed(self, prompts: list[list[int]], new_tokens: int, *,
                       cached: bool = False) -> tuple[float, list[dict]]:
        """Generate and check every request got ``new_tokens`` tokens; (seconds, outputs).

        The prefix cache is flushed first, unless ``cached``: then the prompts must already be cached
        (all but their last token, which is recomputed for its logits), else RuntimeError."""
        if not cached and not self.engine.flush_cache():
            raise RuntimeError("flush_cache refused: requests still in flight")
        synchronize(self.device)
        start = time.perf_counter()
        outputs = self.engine.generate(input_ids=prompts, sampling_params=greedy(new_tokens))
        synchronize(self.device)
        seconds = time.perf_counter() - start
        for out in outputs:
            meta = out["meta_info"]
            if meta["completion_tokens"] != new_tokens or (meta["finish_reason"] or {}).get("type") != "length":
                raise RuntimeError(f"a request ended early: {meta['finish_reason']}, "
                                   f"{meta['completion_tokens']}/{new_tokens} tokens")
            if cached and meta["cached_tokens"] < meta["prompt_tokens"] - 1:
                raise RuntimeError(f"a prompt's KV was not cached ({meta['cached_tokens']} of "
                                   f"{meta['prompt_tokens']} tokens): the KV cache is too small for this batch")
        return seconds, outputs

    def decode_rate(self, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, int]:
        """(decode tok/s, retractions during the timed runs) = batch * (N - 1) / (time(N) - time(1)), both
        timed with the prompts' KV cached by an untimed run (see the module docstring)."""
        if new_tokens < 2:
            raise ValueError(f"decode needs at least 2 new tokens, got {new_tokens}")
        prompts = self.prompts(batch, prompt_len)
        self.generate_timed(prompts, 2)  # warm-up of this configuration; leaves the prompts cached
        retractions = self.engine.stats()["retractions"]
        t_n = timed_median(lambda: self.generate_timed(prompts, new_tokens, cached=True)[0], self.repeats)
        t_1 = timed_median(lambda: self.generate_timed(prompts, 1, cached=True)[0], self.repeats)
        if t_n <= t_1:
            raise RuntimeError(f"time({new_tokens} tokens) {t_n:.3f} s <= time(1 token) {t_1:.3f} s")
        rate = batch * (new_tokens - 1) / (t_n - t_1)
        self.plait_rates[(batch, prompt_len, new_tokens)] = rate
        return rate, self.engine.stats()["retractions"] - retractions

    def decode_floor(self, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, str]:
        """(tok/s floor, what binds) for decoding ``batch`` sequences from ``prompt_len`` tokens."""
        step, bound = self.facts.decode_step(self.machine, batch, prompt_len + new_tokens / 2)
        return batch / step, bound

    # ------------------------------------------------------------------ rows
    def decode_batch1(self) -> list[Row]:
        """Row a: batch-1 decode tok/s next to the bandwidth floor (target >= 0.85 of it)."""
        p, n = self.sizes.decode_prompt, self.sizes.decode_new_tokens
        rate, _ = self.decode_rate(1, p, n)
        floor, bound = self.decode_floor(1, p, n)
        target = "0.6" if self.facts.is_moe else "0.85"
        return [rate_row("a", f"decode, batch 1, prompt {p}, N={n}", rate, "tok/s", floor,
                         f"target >= {target} of floor; {1e3 / rate:.2f} ms/token; floor {bound}-bound")]

    def decode_batched(self) -> list[Row]:
        """Row b: decode tok/s at each batch size, with short prompts and with ~1k-token contexts."""
        rows, n = [], self.sizes.batch_new_tokens
        for p in (self.sizes.decode_prompt, self.sizes.long_prompt):
            for batch in self.sizes.batch_sizes:
                rate, retracted = self.decode_rate(batch, p, n)
                floor, bound = self.decode_floor(batch, p, n)
                notes = [f"floor {bound}-bound"]
                if self.facts.is_moe and batch >= 64:
                    notes.insert(0, "target >= 0.5 of floor")
                elif batch == 128 and p == 128:
                    notes.insert(0, "target >= 10.8k tok/s")
                if retracted:
                    notes.append(f"{retracted} retractions (KV cache full)")
                rows.append(rate_row("b", f"decode, batch {batch}, prompt {p}, N={n}", rate, "tok/s", floor,
                                     "; ".join(notes)))
        return rows

    def offline(self) -> list[Row]:
        """Row c: all requests at once, fixed input/output lengths; total and output tok/s over wall time."""
        s = self.sizes
        count, n_in, n_out = s.offline_requests, s.offline_input, s.offline_output
        self.generate_timed(self.prompts(min(max(count // 4, 1), 64), n_in), min(n_out, 16))  # warm-up
        prompts = self.prompts(count, n_in)
        stats0 = self.engine.stats()
        self.engine.scheduler.peak_running = 0
        seconds = timed_median(lambda: self.generate_timed(prompts, n_out)[0], self.repeats)
        stats1 = self.engine.stats()
        retracted = stats1["retractions"] - stats0["retractions"]
        floor_s = self.facts.workload_floor(self.machine, count * self.facts.prefill_flops(n_in), count, n_in, n_out)
        name = f"{count} requests x {n_in} in / {n_out} out, all at once"
        notes = (f"{seconds:.1f} s wall; at most {stats1['peak_running']} running"
                 + (f"; {retracted} retractions" if retracted else ""))
        target = ""
        if count == 1000 and n_in == n_out == 256 and not self.facts.is_moe:
            target = "target 23k tok/s (H100); "
        elif count == 1000 and n_in == n_out == 1024 and self.facts.is_moe:
            target = "anchor: vLLM, 2 x H100 TP 2, GPT-OSS-120B: 31.5-34.5k tok/s on fixed-length classes; "
        return [
            rate_row("c", f"offline total tok/s, {name}", count * (n_in + n_out) / seconds, "tok/s",
                     count * (n_in + n_out) / floor_s, target + notes),
            rate_row("c", f"offline output tok/s, {name}", count * n_out / seconds, "tok/s",
                     count * n_out / floor_s),
        ]

    def ttft(self) -> list[Row]:
        """Row f: time to first token of one long prompt (max_new_tokens=1), median, cache flushed each run."""
        p, repeats = self.sizes.long_prompt, self.sizes.ttft_repeats
        self.generate_timed(self.prompts(1, p), 1)  # warm-up
        prompt = self.prompts(1, p)
        times, engine_ttft = [], []
        for _ in range(repeats):
            seconds, outputs = self.generate_timed(prompt, 1)
            times.append(seconds)
            engine_ttft.append(outputs[0]["meta_info"].get("ttft", float("nan")))
        measured = statistics.median(times)
        floor = self.facts.prefill_flops(p) / self.machine.matmul_rate
        return [Row("f", f"time to first token, prompt {p} (median of {repeats})", f"{measured * 1e3:.1f} ms",
                    f"{floor * 1e3:.1f} ms", f"{floor / measured:.2f}",
                    f"compute floor (2 x params x tokens + attention); engine-side ttft "
                    f"{statistics.median(engine_ttft) * 1e3:.1f} ms; prefill {p / measured:,.0f} tok/s")]

    def shared_prefix(self) -> SharedPrefixResult:
        """Row d (one engine): groups of prompts sharing a system prompt, all submitted at once."""
        s = self.sizes
        self.generate_timed(self._shared_prompts(1, 1), min(s.shared_output, 16))  # warm-up: one group
        prompts = self._shared_prompts(s.groups, 2)  # the same prompts on every engine
        stats0 = self.engine.stats()
        seconds, outputs = self.generate_timed(prompts, s.shared_output)
        return SharedPrefixResult(
            seconds=seconds,
            prompt_tokens=sum(o["meta_info"]["prompt_tokens"] for o in outputs),
            output_tokens=sum(o["meta_info"]["completion_tokens"] for o in outputs),
            cached_tokens=sum(o["meta_info"]["cached_tokens"] for o in outputs),
            retractions=self.engine.stats()["retractions"] - stats0["retractions"],
            kv_tokens=self.engine.runner.pool.capacity,
        )

    def _shared_prompts(self, groups: int, stream: int) -> list[list[int]]:
        """``groups`` x group_size prompts, group by group: a shared system prompt + a distinct question.

        Drawn from their own generator (``seed``, ``stream``), so each engine gets the same prompts.
        """
        s, rng = self.sizes, np.random.default_rng((self.seed, stream))
        prompts = []
        for _ in range(groups):
            system = rng.integers(0, self.vocab, size=s.system_len).tolist()
            prompts += [system + q for q in rng.integers(0, self.vocab, size=(s.group_size, s.question_len)).tolist()]
        return prompts


def shared_prefix_rows(on: SharedPrefixResult | str, off: SharedPrefixResult | str,
                       facts: Any, machine: Any, sizes: Any) -> list[Row]:
    """Row d: throughput with the prefix cache on and off (each next to its floor), their ratio, hit rates.

    ``on`` / ``off`` are results, or a failure message for the table.
    """
    s = sizes
    count, prompt_len = s.groups * s.group_size, s.system_len + s.question_len
    shape = f"{s.groups} groups x {s.group_size}, {s.system_len}-token system + {s.question_len}, {s.shared_output} out"
    unique = s.groups * facts.prefill_flops(s.system_len) + count * facts.prefill_flops(s.question_len, s.system_len)
    floors = {
        "on": facts.workload_floor(machine, unique, count, prompt_len, s.shared_output),
        "off": facts.workload_floor(machine, count * facts.prefill_flops(prompt_len), count, prompt_len,
                                    s.shared_output),
    }
    ideal = s.groups * (s.group_size - 1) * s.system_len / (count * prompt_len)
    rows = []
    for label, result in (("on", on), ("off", off)):
        name = f"shared prefix, cache {label}: total tok/s, {shape}"
        if isinstance(result, str):
            rows.append(Row("d", name, result))
            continue
        tokens = result.prompt_tokens + result.output_tokens
        notes = f"hit rate {result.hit_rate:.3f}" + (f" (ideal {ideal:.3f})" if label == "on" else "")
        notes += f"; {result.seconds:.1f} s wall; output {fmt(result.output_tokens / result.seconds)} tok/s"
        notes += f"; KV cache {result.kv_tokens:,} tokens"
        if result.retractions:
            notes += f"; {result.retractions} retractions"
        rows.append(rate_row("d", name, result.total_rate, "tok/s", tokens / floors[label], notes))
    if isinstance(on, SharedPrefixResult) and isinstance(off, SharedPrefixResult):
        rows.append(Row("d", "shared prefix: cache on / cache off throughput", f"{on.total_rate / off.total_rate:.2f}x",
                        f"{floors['off'] / floors['on']:.2f}x", notes="floor column: ratio of the two floors"))
    else:
        rows.append(Row("d", "shared prefix: cache on / cache off throughput", "skipped: a half failed"))
    return rows
