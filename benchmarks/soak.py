"""Soak test of ``plait serve``: a bounded run of mixed traffic with abuse, disconnects and a compile storm.

    python benchmarks/soak.py                       # starts plait serve (bundled model) on loopback
    python benchmarks/soak.py --url http://127.0.0.1:30000 --duration 120 --concurrency 12

Traffic, each worker picking at random (weights in ``MIX``): plain greedy ``/generate`` requests whose
text must equal the first answer to the same prompt (else: corrupted), streamed chat completions (some
read to the end, some left after a few events: disconnects), constrained requests (a JSON schema or a
regex; the output must parse), bad requests that must get a 4xx (never a 5xx), and a compile storm:
``--storm`` requests at once, each with a distinct slow grammar (no cache hit), every ``--storm-every``
seconds. Prints requests sent, lost (no final answer: a transport error, a stream without ``[DONE]``, a
5xx), leaked KV slots after the run (idle, cache flushed), status counts and latency percentiles of the
plain requests with and without a storm in flight. Exit status 1 if anything was lost, leaked or
corrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["The capital of France is", "def fib(n):", "A short poem about rain:", "1, 1, 2, 3, 5,",
           "The three primary colours are", "Water boils at"]
MIX = {"plain": 5, "stream": 3, "disconnect": 2, "constrained": 2, "bad": 2}
BAD = [  # (path, raw body): each must get a 4xx
    ("/generate", "[" * 2000), ("/generate", '{"text": "\\ud800"}'),
    ("/v1/completions", '{"model": "M", "prompt": [[1, [2]]]}'), ("/generate", '{"text": "a", "sampling_params": '
                                                                  '{"n": 100000}}'),
    ("/generate", '{"text": "a", "sampling_params": {"max_new_tokens": 100000000}}'), ("/generate", '{"text": '),
    ("/generate", '{"text": "a", "sampling_params": {"regex": "("}}'),
]


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    status: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    plain: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each answered plain request
    storms: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each compile storm
    storm_s: list[float] = field(default_factory=list)  # latency of each storm request
    expected: dict[str, str] = field(default_factory=dict)

    def plain_latencies(self) -> tuple[list[float], list[float]]:
        """Plain-request latencies: (overlapping no storm, overlapping a storm)."""
        calm, stormy = [], []
        for start, end in self.plain:
            overlaps = any(start < s_end and s_start < end for s_start, s_end in self.storms)
            (stormy if overlaps else calm).append(end - start)
        return calm, stormy


def storm_grammar(salt: int, rules: int) -> str:
    """A grammar unlike any other (no grammar-cache hit) and slow to compile: ``rules`` chained rules."""
    lines = [f'root ::= r0 "s{salt}"']
    lines += [f'r{i} ::= "a{salt}x{i}" | r{i + 1}' for i in range(rules - 2)]
    lines.append(f'r{rules - 2} ::= "end{salt}"')
    return "\n".join(lines)


async def plain(client: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
    prompt = rng.choice(PROMPTS)
    started = time.perf_counter()
    r = await client.post("/generate", json={"text": prompt, "sampling_params": {"temperature": 0,
                                                                                 "max_new_tokens": 8}})
    tally.status[r.status_code] += 1
    if r.status_code != 200:
        tally.lost.append(f"plain: {r.status_code} {r.text[:200]}")
        return
    tally.plain.append((started, time.perf_counter()))
    text = r.json()["text"]
    if tally.expected.setdefault(prompt, text) != text:
        tally.corrupted.append(f"{prompt!r}: {text!r} != {tally.expected[prompt]!r}")


async def stream(client: httpx.AsyncClient, tally: Tally, rng: random.Random, model: str, leave: bool) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
            "max_tokens": 24, "temperature": 0.7, "seed": rng.randrange(1 << 30)}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        tally.status[r.status_code] += 1
        lines, leave_after = [], rng.randint(1, 4)
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                lines.append(line)
                if leave and len(lines) >= leave_after:
                    return  # leaving the block closes the connection: a disconnect
    if r.status_code != 200 or not lines or lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines[-2:]):
        tally.lost.append(f"stream: {r.status_code} {lines[-2:]}")


async def constrained(client: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
    if rng.random() < 0.5:
        params = {"regex": r"(yes|no), because [a-z ]{3,20}\.", "max_new_tokens": 32}
        check = None
    else:
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                   "age": {"type": "integer"}}, "required": ["name", "age"]}
        params, check = {"json_schema": json.dumps(schema), "max_new_tokens": 48}, json.loads
    r = await client.post("/generate", json={"text": "Answer: ", "sampling_params": {**params, "temperature": 0.5}})
    tally.status[r.status_code] += 1
    if r.status_code != 200:
        tally.lost.append(f"constrained: {r.status_code} {r.text[:200]}")
        return
    out = r.json()
    if check is not None and out["meta_info"]["finish_reason"]["type"] == "stop":
        try:
            check(out["text"])
        except ValueError:
            tally.corrupted.append(f"constrained output does not parse: {out['text']!r}")


async def bad(client: httpx.AsyncClient, tally: Tally, rng: random.Random, model: str) -> None:
    path, body = rng.choice(BAD)
    r = await client.post(path, content=body.replace('"M"', json.dumps(model)).encode("utf-8", "surrogatepass"),
                          headers={"Content-Type": "application/json"})
    tally.status[r.status_code] += 1
    if not 400 <= r.status_code < 500:
        tally.lost.append(f"bad {path} {body[:40]!r}: {r.status_code} {r.text[:200]}")


async def storm(client: httpx.AsyncClient, tally: Tally, size: int, rules: int, seed: int) -> None:
    """``size`` distinct slow grammars at once; a timeout answer (400) is fine, a 5xx or a hang is not."""
    started = time.perf_counter()

    async def one(i: int) -> None:
        grammar = storm_grammar(seed * 1000 + i, rules)
        sent = time.perf_counter()
        r = await client.post("/generate", json={"text": "Say:", "sampling_params": {"ebnf": grammar,
                                                                                      "max_new_tokens": 4}})
        tally.status[r.status_code] += 1
        tally.sent["storm"] += 1
        tally.storm_s.append(time.perf_counter() - sent)
        if r.status_code >= 500:
            tally.lost.append(f"storm: {r.status_code} {r.text[:200]}")

    try:
        await asyncio.gather(*(one(i) for i in range(size)))
    finally:
        tally.storms.append((started, time.perf_counter()))


async def worker(client: httpx.AsyncClient, tally: Tally, rng: random.Random, model: str, deadline: float) -> None:
    kinds, weights = list(MIX), list(MIX.values())
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        tally.sent[kind] += 1
        try:
            if kind == "plain":
                await plain(client, tally, rng)
            elif kind in ("stream", "disconnect"):
                await stream(client, tally, rng, model, leave=kind == "disconnect")
            elif kind == "constrained":
                await constrained(client, tally, rng)
            else:
                await bad(client, tally, rng, model)
        except httpx.HTTPError as exc:
            tally.lost.append(f"{kind}: {type(exc).__name__}: {exc}")


async def storms(client: httpx.AsyncClient, tally: Tally, args: argparse.Namespace, deadline: float) -> None:
    seed = 0
    while time.monotonic() + args.storm_every < deadline:
        await asyncio.sleep(args.storm_every)
        seed += 1
        try:
            await storm(client, tally, args.storm, args.storm_rules, seed)
        except httpx.HTTPError as exc:
            tally.lost.append(f"storm: {type(exc).__name__}: {exc}")


async def leaked_slots(client: httpx.AsyncClient) -> int:
    deadline = time.monotonic() + 60
    while True:
        stats = (await client.get("/get_server_info")).json()["internal_states"][0]
        if stats["running"] == 0 and stats["waiting"] == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    await client.post("/flush_cache")
    return (await client.get("/get_server_info")).json()["internal_states"][0]["kv_slots_used"]


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return f"p50 {q[49]:.2f} s, p90 {q[89]:.2f} s, p99 {q[98]:.2f} s (n={len(values)})"


async def soak(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        tally, rng = Tally(), random.Random(args.seed)
        started = time.monotonic()
        deadline = started + args.duration
        tasks = [worker(client, tally, random.Random(rng.random()), model, deadline) for _ in range(args.concurrency)]
        if args.storm:
            tasks.append(storms(client, tally, args, deadline))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        leaked = await leaked_slots(client)
        health = (await client.get("/health")).status_code
    print(f"soak: {elapsed:.0f} s, concurrency {args.concurrency}, storm {args.storm} grammars of "
          f"{args.storm_rules} rules every {args.storm_every:g} s")
    print(f"requests sent: {sum(tally.sent.values())} ({', '.join(f'{k} {v}' for k, v in sorted(tally.sent.items()))})")
    print(f"status counts: {dict(sorted(tally.status.items()))}")
    print(f"lost: {len(tally.lost)}; corrupted: {len(tally.corrupted)}; leaked KV slots: {leaked}; "
          f"/health after: {health}")
    for line in (tally.lost + tally.corrupted)[:10]:
        print("  ", line)
    calm, stormy = tally.plain_latencies()
    print(f"plain latency, no storm in flight: {percentiles(calm)}")
    print(f"plain latency, during a storm:     {percentiles(stormy)}")
    print(f"storm requests (compile + 4 tokens):  {percentiles(tally.storm_s)}")
    return 1 if tally.lost or tally.corrupted or leaked or health != 200 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start plait serve on loopback)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default: 60)")
    parser.add_argument("--concurrency", type=int, default=8, help="client workers (default: 8)")
    parser.add_argument("--storm", type=int, default=12, help="schemas per compile storm, 0: none (default: 12)")
    parser.add_argument("--storm-every", type=float, default=15.0, help="seconds between storms (default: 15)")
    parser.add_argument("--storm-rules", type=int, default=900,
                        help="rules per storm grammar (the engine's limit is 1000; default: 900)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("serve_args", nargs="*", help="extra plait serve flags when starting one (after --)")
    args = parser.parse_args(argv)
    if args.url is not None:
        return asyncio.run(soak(args))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.server.server_helpers import start_server

    server = start_server(*args.serve_args, api_key=args.api_key)
    args.url = server.url
    try:
        return asyncio.run(soak(args))
    finally:
        status = server.stop()
        print(f"plait serve exited with status {status}")


if __name__ == "__main__":
    sys.exit(main())
