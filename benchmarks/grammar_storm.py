"""Head-of-line blocking under a grammar-compile storm: plain-request latency with and without slow compiles.

Starts ``plait serve`` on loopback (bundled model unless ``--model``), or uses ``--url``. Phase 1 sends
plain ``/generate`` requests from ``--clients`` threads for ``--seconds`` and records their latencies.
Phase 2 does the same while ``--storm`` constrained requests, each with its own large chained EBNF
grammar (``--rules`` rules, distinct so that none is a cache hit), are sent at once. The server's
promise: submissions never wait for a compile, so plain p50 stays within 1.5x of phase 1.

    python benchmarks/grammar_storm.py [--storm 12] [--rules 900] [--seconds 20]

Prints a markdown table: plain p50/p90 in both phases, their ratio, and the storm's status codes and
latencies (a compile that runs past the server's timeout is a 400 naming it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chained_ebnf(rules: int, salt: int) -> str:
    """``rules`` rules, each pointing at the next: a grammar that is slow to convert but legal."""
    lines = [f"root ::= r0 \"s{salt}\""]
    for i in range(rules - 2):
        lines.append(f"r{i} ::= \"a{salt}x{i}\" | r{i + 1}")
    lines.append(f"r{rules - 2} ::= \"end{salt}\"")
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def plain_traffic(url: str, clients: int, seconds: float, prompt: str) -> list[float]:
    """Latencies (s) of plain 16-token greedy requests sent back to back by ``clients`` threads."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                r = http.post(url + "/generate", json={
                    "text": f"{prompt} ({i})", "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def storm(url: str, count: int, rules: int, results: list[tuple[int, float, str]]) -> list[threading.Thread]:
    """Send ``count`` constrained requests at once, each with a distinct large grammar (threads returned)."""
    def one(i: int) -> None:
        start = time.perf_counter()
        body = {"text": "Say something.", "sampling_params": {
            "max_new_tokens": 8, "temperature": 0, "ebnf": chained_ebnf(rules, 1000 + i)}}
        with httpx.Client(timeout=600) as http:
            r = http.post(url + "/generate", json=body)
        results.append((r.status_code, time.perf_counter() - start, r.text[:120]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads


def start_server(model: str, port: int) -> tuple[subprocess.Popen, str]:
    log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, "-m", "plait.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError("server exited:\n" + log.read()[-3000:])
        time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not become healthy in 300 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=30555)
    parser.add_argument("--storm", type=int, default=12, help="concurrent slow compiles")
    parser.add_argument("--rules", type=int, default=900, help="rules of each storm grammar (the server's limit is 1000)")
    parser.add_argument("--clients", type=int, default=2, help="threads sending plain requests")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, args.port)
    try:
        plain_traffic(url, args.clients, 3.0, "Warm up.")  # warm-up, not counted
        quiet = plain_traffic(url, args.clients, args.seconds, "Name a colour.")
        results: list[tuple[int, float, str]] = []
        threads = storm(url, args.storm, args.rules, results)
        loud = plain_traffic(url, args.clients, args.seconds, "Name a colour.")
        for t in threads:
            t.join()
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    q50, l50 = statistics.median(quiet), statistics.median(loud)
    codes = Counter(code for code, _, _ in results)
    storm_lat = [lat for _, lat, _ in results]
    print(f"| phase | plain requests | p50 | p90 |\n| --- | ---: | ---: | ---: |")
    print(f"| no storm | {len(quiet)} | {q50:.3f} s | {percentile(quiet, 0.9):.3f} s |")
    print(f"| {args.storm} slow compiles ({args.rules}-rule EBNF each) | {len(loud)} | {l50:.3f} s | "
          f"{percentile(loud, 0.9):.3f} s |")
    print(f"\nplain p50 under the storm / without: {l50 / q50:.2f}x (target <= 1.5x)")
    print(f"storm requests: status codes {dict(codes)}, latency p50 {statistics.median(storm_lat):.1f} s, "
          f"max {max(storm_lat):.1f} s; /health after: {health}")
    for code, _, text in results:
        if code != 200:
            print(f"  e.g. {code}: {text}")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
