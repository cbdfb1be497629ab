"""Prometheus metrics of the server, in the text exposition format (no client library needed).

Counters and histograms are updated by the HTTP process as requests finish; the engine's gauges
(running and queued requests, KV slots in use, cache hit rate) are read from the engine at scrape
time. Names follow SGLang's (``sglang:``) and vLLM's conventions under the ``plait:`` prefix.
"""

from __future__ import annotations

import bisect
from typing import Any

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(dict(key))} {value:g}")
        if not self.values:
            lines.append(f"{self.name} 0")
        return lines


class Histogram:
    """Cumulative buckets, sum and count (Prometheus histogram)."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Everything ``/metrics`` reports."""

    def __init__(self) -> None:
        self.requests = Counter("plait:requests_total", "HTTP generation requests by route and outcome.")
        self.finished = Counter("plait:finished_outputs_total", "Generated outputs by finish reason.")
        self.prompt_tokens = Counter("plait:prompt_tokens_total", "Prompt tokens of finished outputs.")
        self.generation_tokens = Counter("plait:generation_tokens_total", "Generated tokens.")
        self.cached_tokens = Counter("plait:cached_tokens_total", "Prompt tokens served from the prefix cache.")
        self.ttft = Histogram("plait:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = Histogram("plait:time_per_output_token_seconds", "Time per output token after the first.",
                              _TPOT_BUCKETS)
        self.e2e = Histogram("plait:e2e_request_latency_seconds", "End-to-end latency of an output.", _LATENCY_BUCKETS)

    def request(self, route: str, outcome: str) -> None:
        self.requests.inc(route=route, outcome=outcome)

    def output_finished(self, meta: dict[str, Any]) -> None:
        """Record one finished output from its final ``meta_info``."""
        reason = (meta.get("finish_reason") or {}).get("type", "unknown")
        self.finished.inc(reason=reason)
        completion = meta.get("completion_tokens", 0)
        self.prompt_tokens.inc(meta.get("prompt_tokens", 0))
        self.generation_tokens.inc(completion)
        self.cached_tokens.inc(meta.get("cached_tokens", 0))
        ttft, e2e = meta.get("ttft"), meta.get("e2e_latency")
        if ttft is not None:
            self.ttft.observe(ttft)
            if e2e is not None and completion > 1:
                self.tpot.observe((e2e - ttft) / (completion - 1))
        if e2e is not None:
            self.e2e.observe(e2e)

    def render(self, stats: dict[str, Any] | None) -> str:
        """The exposition text; ``stats`` is ``Engine.stats()`` (None when the engine is down)."""
        lines: list[str] = []
        for metric in (self.requests, self.finished, self.prompt_tokens, self.generation_tokens,
                       self.cached_tokens, self.ttft, self.tpot, self.e2e):
            lines += metric.render()
        gauges = {
            "plait:num_running_reqs": ("Requests being prefilled or decoded.", "running"),
            "plait:num_queue_reqs": ("Requests waiting to be scheduled.", "waiting"),
            "plait:kv_slots_used": ("KV cache slots in use (running requests and cached prefixes).", "kv_slots_used"),
            "plait:kv_slots_total": ("KV cache slots.", "kv_slots_total"),
            "plait:kv_slots_cached": ("KV cache slots held by the prefix cache.", "kv_slots_cached"),
            "plait:kv_sliding_slots_used": ("Sliding-window layers' KV slots in use (hybrid KV pools; else 0).",
                                            "kv_sliding_slots_used"),
            "plait:kv_sliding_slots_total": ("Sliding-window layers' KV slots (hybrid KV pools; else 0).",
                                             "kv_sliding_slots_total"),
            "plait:cache_hit_rate": ("Prompt tokens served from the prefix cache / prompt tokens.", "cache_hit_rate"),
            "plait:retractions": ("Requests retracted under memory pressure so far.", "retractions"),
            "plait:engine_steps": ("Engine steps (forward passes) so far.", "steps"),
            "plait:engine_overlapped_steps": ("Steps launched before the previous step's tokens were read back.",
                                              "overlapped_steps"),
            "plait:engine_graph_steps": ("Decode steps replayed from captured CUDA graphs.", "graph_steps"),
            "plait:engine_piecewise_graph_steps": ("Prefill and mixed steps replayed from piecewise CUDA graphs "
                                                   "(attention run eagerly between the pieces).",
                                                   "piecewise_graph_steps"),
            "plait:budget_searches": ("Budget steering's searches for an ending that fits max_new_tokens "
                                      "(finished requests).", "budget_searches"),
            "plait:budget_searches_without_ending": ("Of them, searches that found no ending within their bounds.",
                                                     "budget_searches_without_ending"),
            "plait:budget_search_seconds": ("Engine-thread seconds spent in those searches.", "budget_search_seconds"),
            "plait:budget_endings_reused": ("Searches saved: an earlier ending still ended the grammar and fit.",
                                            "budget_endings_reused"),
            "plait:budget_endings_learned": ("Of them, endings that an earlier search found after the same token "
                                             "(any request of the grammar).", "budget_endings_learned"),
            "plait:new_token_ratio": ("Share of running requests' remaining max_new_tokens reserved at admission.",
                                      "new_token_ratio"),
        }
        stats = stats or {}
        for name, (help_text, key) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines.append(f"{name} {float(stats.get(key, 0)):g}")
        total = stats.get("kv_slots_total") or 0
        lines += ["# HELP plait:token_usage Fraction of KV slots in use.", "# TYPE plait:token_usage gauge",
                  f"plait:token_usage {stats.get('kv_slots_used', 0) / total if total else 0.0:g}",
                  "# HELP plait:engine_up 1 while the engine process is running.", "# TYPE plait:engine_up gauge",
                  f"plait:engine_up {1 if stats else 0}"]
        return "\n".join(lines) + "\n"
