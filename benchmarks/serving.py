"""Serving benchmark: a streaming client that reports what SGLang's bench_serving and vLLM's
benchmark_serving report (request and token throughput; TTFT, TPOT, ITL and end-to-end latency mean /
median / p99), against ``plait serve``, an SGLang server or any OpenAI-compatible server.

    python benchmarks/serving.py --base-url http://127.0.0.1:30000 --dataset random --num-prompts 200
    python benchmarks/serving.py --backend openai-chat --dataset multi-turn --max-concurrency 16
    python benchmarks/serving.py --dataset shared-prefix --request-rate 8 --output-file result.json

Backends: ``plait`` / ``sglang`` (native ``/generate`` over SSE), ``openai`` (``/v1/completions``) and
``openai-chat`` (``/v1/chat/completions``). Token counts are the server's own (``meta_info`` or
``usage``), so no tokenizer is needed; ``--tokenizer DIR`` makes random prompts from random token ids
(as SGLang does) instead of random words. Datasets are synthetic (no downloads): ``random``,
``shared-prefix`` (groups of requests behind one long system prompt) and ``multi-turn``
(conversations whose every turn resends the history). Requests arrive as a Poisson process at
``--request-rate`` (``inf``: all at once), at most ``--max-concurrency`` in flight. Outputs ignore
EOS so every request produces its requested length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

_WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "river", "stone", "light", "music", "table", "window", "garden", "paper", "story", "market", "energy", "system", "water", "money", "history", "night", "morning", "answer", "question"]


@dataclass
class Turn:
    prompt: str
    output_len: int


@dataclass
class Conversation:
    """One unit of arrival: a single request, or the turns of one multi-turn conversation."""

    turns: list[Turn]
    system: str = ""


@dataclass
class Result:
    ok: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# ------------------------------------------------------------------------------------------ datasets
class TextMaker:
    """Random text of about ``n`` tokens: random token ids decoded (with a tokenizer) or random words."""

    def __init__(self, rng: random.Random, tokenizer_dir: str | None):
        self.rng, self.tokenizer = rng, None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def text(self, n: int) -> str:
        if self.tokenizer is not None:
            ids = [self.rng.randrange(1000, min(len(self.tokenizer), 30000)) for _ in range(n)]
            return self.tokenizer.decode(ids)
        return " ".join(self.rng.choice(_WORDS) for _ in range(max(1, int(n * 0.75))))  # ~1.3 tokens a word


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    return max(1, rng.randint(max(1, int(mean * ratio)), mean))


def build_dataset(args: argparse.Namespace) -> list[Conversation]:
    rng = random.Random(args.seed)
    maker = TextMaker(rng, args.tokenizer)
    ilen, olen, ratio = args.random_input_len, args.random_output_len, args.random_range_ratio
    if args.dataset == "random":
        return [Conversation([Turn(maker.text(_length(rng, ilen, ratio)), _length(rng, olen, ratio))])
                for _ in range(args.num_prompts)]
    if args.dataset == "shared-prefix":
        systems = [maker.text(args.shared_prefix_len) for _ in range(args.num_groups)]
        return [Conversation([Turn(maker.text(_length(rng, ilen, ratio)), _length(rng, olen, ratio))],
                             system=systems[i % args.num_groups]) for i in range(args.num_prompts)]
    return [Conversation([Turn(maker.text(_length(rng, ilen, ratio)), _length(rng, olen, ratio))
                          for _ in range(args.turns)]) for _ in range(max(1, args.num_prompts // args.turns))]


# ------------------------------------------------------------------------------------------ clients
def _request(backend: str, model: str, system: str, history: list[dict[str, str]], turn: Turn) -> tuple[str, dict]:
    """(path, JSON body) of one streamed request; ``history`` holds earlier turns (role, content)."""
    if backend == "openai-chat":
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": turn.prompt}]
        return "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": turn.output_len,
                                        "temperature": 0, "stream": True, "ignore_eos": True,
                                        "stream_options": {"include_usage": True}}
    text = system + "".join(f"\n{m['role']}: {m['content']}" for m in history) + \
        (f"\nuser: {turn.prompt}\nassistant:" if history or system else turn.prompt)
    if backend == "openai":
        return "/v1/completions", {"model": model, "prompt": text, "max_tokens": turn.output_len, "temperature": 0,
                                   "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    return "/generate", {"text": text, "stream": True, "sampling_params": {
        "max_new_tokens": turn.output_len, "temperature": 0, "ignore_eos": True}}


def _parse_event(backend: str, data: dict, result: Result) -> str:
    """Update counts from one SSE event; returns the text it added."""
    if backend in ("plait", "sglang"):
        meta = data["meta_info"]
        result.prompt_tokens, result.completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
        return data["text"]  # cumulative
    if data.get("usage"):
        result.prompt_tokens = data["usage"]["prompt_tokens"]
        result.completion_tokens = data["usage"]["completion_tokens"]
    if not data.get("choices"):
        return ""
    choice = data["choices"][0]
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


async def send(client: httpx.AsyncClient, backend: str, path: str, body: dict) -> tuple[Result, str]:
    result, text, last = Result(), "", None
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result, ""
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                added = _parse_event(backend, json.loads(line[5:]), result)
                now = time.perf_counter()
                if backend in ("plait", "sglang"):
                    added, text = added[len(text):], added
                else:
                    text += added
                if added or backend in ("plait", "sglang"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.completion_tokens > 0
        if not result.ok:
            result.error = "no tokens reported"
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result, text


async def run_conversation(client, args, model, conv: Conversation, limit: asyncio.Semaphore | None,
                           results: list[Result]) -> None:
    history: list[dict[str, str]] = []
    for turn in conv.turns:
        path, body = _request(args.backend, model, conv.system, history, turn)
        if limit is None:
            result, text = await send(client, args.backend, path, body)
        else:
            async with limit:
                result, text = await send(client, args.backend, path, body)
        results.append(result)
        if not result.ok:
            return
        history += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": text}]


async def benchmark(args: argparse.Namespace, dataset: list[Conversation]) -> tuple[list[Result], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, timeout=None,
                                 limits=limits) as client:
        model = args.model
        if model is None and args.backend.startswith("openai"):
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        rng = random.Random(args.seed + 1)
        results: list[Result] = []
        tasks = []
        start = time.perf_counter()
        for conv in dataset:
            tasks.append(asyncio.create_task(run_conversation(client, args, model, conv, limit, results)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ report
def _ms(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.fmean(values) * 1e3, statistics.median(values) * 1e3, p99 * 1e3


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict:
    done = [r for r in results if r.ok]
    tpots = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in done if r.completion_tokens > 1]
    inputs, outputs = sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done)
    summary = {
        "backend": args.backend, "dataset": args.dataset, "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, "completed": len(done), "failed": len(results) - len(done),
        "duration_s": duration, "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(done) / duration, "input_throughput": inputs / duration,
        "output_throughput": outputs / duration, "total_throughput": (inputs + outputs) / duration,
    }
    for name, values in (("ttft", [r.ttft for r in done]), ("tpot", tpots),
                         ("itl", [x for r in done for x in r.itl]), ("e2e_latency", [r.e2e for r in done])):
        summary[f"mean_{name}_ms"], summary[f"median_{name}_ms"], summary[f"p99_{name}_ms"] = _ms(values)
    summary["errors"] = sorted({r.error for r in results if r.error})[:5]
    return summary


def print_summary(s: dict) -> None:
    def row(label: str, value: object) -> None:
        print(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value!s:<10}")

    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    for label, key in (("Backend:", "backend"), ("Dataset:", "dataset"), ("Traffic request rate:", "request_rate"),
                       ("Max request concurrency:", "max_concurrency"), ("Successful requests:", "completed"),
                       ("Failed requests:", "failed"), ("Benchmark duration (s):", "duration_s"),
                       ("Total input tokens:", "total_input_tokens"), ("Total generated tokens:", "total_output_tokens"),
                       ("Request throughput (req/s):", "request_throughput"),
                       ("Input token throughput (tok/s):", "input_throughput"),
                       ("Output token throughput (tok/s):", "output_throughput"),
                       ("Total token throughput (tok/s):", "total_throughput")):
        row(label, s[key])
    for title, key, name in (("Time to First Token", "ttft", "TTFT"),
                             ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                             ("Inter-token Latency", "itl", "ITL"), ("End-to-End Latency", "e2e_latency", "E2E")):
        print("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {name} (ms):", s[f"{stat}_{key}_ms"])
    print("=" * 50)
    for error in s["errors"]:
        print("error:", error)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=["plait", "sglang", "openai", "openai-chat"], default="plait")
    p.add_argument("--model", default=None, help="model id for the OpenAI API (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "shared-prefix", "multi-turn"], default="random")
    p.add_argument("--num-prompts", type=int, default=200, help="requests (multi-turn: total turns)")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=1.0, help="lengths drawn from [ratio*len, len]")
    p.add_argument("--shared-prefix-len", type=int, default=1024, help="shared-prefix: system prompt tokens")
    p.add_argument("--num-groups", type=int, default=8, help="shared-prefix: distinct system prompts")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir: random prompts from random token ids")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="also write the summary as JSON")
    args = p.parse_args(argv)
    dataset = build_dataset(args)
    results, duration = asyncio.run(benchmark(args, dataset))
    summary = summarize(args, results, duration)
    print_summary(summary)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            json.dump({**summary, "args": vars(args)}, f, indent=2, default=str)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
