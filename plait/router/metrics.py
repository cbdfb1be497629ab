"""The router's ``/metrics``: its own counters, then every replica's metrics with a ``replica`` label.

Prometheus text format. Replica samples are merged per metric family (one ``# HELP``/``# TYPE``
header, then every replica's samples of that family), so the exposition stays valid.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

PREFIX = "plait_router:"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels.items()) + "}"


class RouterMetrics:
    """Counters kept by the router (all updated on its event loop)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (replica, route)
        self.errors: Counter[tuple[str, str]] = Counter()  # (replica or "", kind)
        self.decisions: Counter[str] = Counter()  # cache_hit, cache_miss, balance, program, ...
        self.responses: Counter[tuple[str, int]] = Counter()  # (route, status) answered by the router

    def render(self, in_flight: dict[str, int], healthy: dict[str, bool], tree_sizes: dict[str, int]) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {PREFIX}{name} {help_text}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            lines.extend(f"{PREFIX}{name}{labels} {value:g}" for labels, value in samples)

        family("requests_total", "counter", "Requests forwarded, by replica and route.",
               [(_labels(replica=r, route=p), n) for (r, p), n in sorted(self.requests.items())])
        family("responses_total", "counter", "Responses the router sent, by route and HTTP status.",
               [(_labels(route=p, status=str(s)), n) for (p, s), n in sorted(self.responses.items())])
        family("errors_total", "counter", "Failures talking to replicas (connect, mid_request, mid_stream, "
               "no_replica), by replica and kind.",
               [(_labels(replica=r, kind=k), n) for (r, k), n in sorted(self.errors.items())])
        family("routing_decisions_total", "counter", "Routing decisions by reason (cache_hit, cache_miss, "
               "balance, program, round_robin, random).",
               [(_labels(decision=d), n) for d, n in sorted(self.decisions.items())])
        family("in_flight_requests", "gauge", "Requests the router has in flight, by replica.",
               [(_labels(replica=r), n) for r, n in in_flight.items()])
        family("replica_healthy", "gauge", "1 while the replica passes its health checks.",
               [(_labels(replica=r), 1 if ok else 0) for r, ok in healthy.items()])
        family("healthy_replicas", "gauge", "Replicas passing their health checks.",
               [("", sum(healthy.values()))])
        family("tree_chars", "gauge", "Characters in each replica's approximate radix tree (cache_aware).",
               [(_labels(replica=r), n) for r, n in tree_sizes.items()])
        return "\n".join(lines) + "\n"


def with_replica_label(sample: str, replica: str) -> str:
    """``name{a="b"} 1`` -> ``name{replica="URL",a="b"} 1`` (also for samples without labels)."""
    label = f'replica="{_escape(replica)}"'
    brace, space = sample.find("{"), sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        inner = sample[brace + 1:]
        return f"{sample[:brace]}{{{label}{'' if inner.startswith('}') else ','}{inner}"
    if space == -1:
        return sample
    return f"{sample[:space]}{{{label}}}{sample[space:]}"


def merge_replica_metrics(texts: dict[str, str]) -> str:
    """Every replica's exposition, each sample labelled with its replica, grouped by metric family."""
    families: OrderedDict[str, tuple[list[str], list[str]]] = OrderedDict()
    for replica, text in texts.items():
        current = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                words = line.split(maxsplit=3)
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    current = words[2]
                    headers, _ = families.setdefault(current, ([], []))
                    if not any(h.split(maxsplit=2)[:2] == words[:2] for h in headers):
                        headers.append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if not current or not name.startswith(current):
                current = name  # a sample without a header of its own
            families.setdefault(current, ([], []))[1].append(with_replica_label(line, replica))
    return "".join("\n".join(headers + samples) + "\n" for headers, samples in families.values())
