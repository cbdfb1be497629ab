"""Serving benchmark: a streaming client that reports what SGLang's bench_serving and vLLM's
benchmark_serving report (request and token throughput; TTFT, TPOT, ITL and end-to-end latency mean /
median / p90 / p95 / p99), against ``plait serve``, an SGLang server or any OpenAI-compatible server.

    python benchmarks/serving.py --base-url http://127.0.0.1:30000 --dataset random --num-prompts 200
    python benchmarks/serving.py --backend openai-chat --dataset multi-turn --max-concurrency 16
    python benchmarks/serving.py --dataset shared-prefix --request-rate 8 --output-file result.json
    python benchmarks/serving.py --dataset sharegpt --concurrency-sweep 1,8,32,64,128,256 \\
        --output-dir sweep/ --plot
    python benchmarks/serving.py --dataset structured --structured-ratio 0.5 --rate-sweep 1,2,4,8 --output-dir rates/
    python benchmarks/serving.py --plot-from sweep/sweep.json

Backends: ``plait`` / ``sglang`` (native ``/generate`` over SSE), ``openai`` (``/v1/completions``) and
``openai-chat`` (``/v1/chat/completions``). Token counts are the server's own (``meta_info`` or
``usage``), so no tokenizer is needed; ``--tokenizer DIR`` makes prompts from random token ids (as
SGLang does) instead of random words.

Workloads are synthetic (no downloads); see ``build_dataset`` and the constants below for their sources:
``random`` (lengths in [ratio*len, len]), ``sharegpt`` (ShareGPT-like length distribution),
``short`` / ``medium`` / ``long`` / ``very-long`` (GPUStack's fixed prompt classes), ``shared-prefix``
(groups of requests behind one long system prompt), ``multi-turn`` (conversations whose every turn
resends the history) and ``structured`` (a share of requests constrained by a JSON schema).

Requests arrive as a Poisson process at ``--request-rate`` (``inf``: all at once), at most
``--max-concurrency`` in flight. ``--concurrency-sweep`` runs the workload once per concurrency cap (all
requests at once), ``--rate-sweep`` once per request rate; ``--output-dir`` writes one JSON per point and
``sweep.json`` (every point, its per-request figures and the arguments); ``--plot`` draws PNG charts there.
Unconstrained outputs ignore EOS so every request produces its requested length (``--disable-ignore-eos``
turns that off); schema-constrained requests never ignore EOS (they must be able to close their JSON) and
are bounded by their max tokens.

ITL follows SGLang's bench_serving: a stream event that brings ``n`` new tokens adds ``n`` intervals of
(gap since the previous event) / ``n``; events with no new token are skipped. The native protocol reports
tokens per event (``meta_info.completion_tokens``); for the OpenAI protocols every delta counts as one
event. The summary's "mean tokens per event" shows how bursty the server's delivery is.

Against a plait server each point also gets the engine's own counts for it (``engine``: steps, CUDA-graph
replays, budget steering's searches), read from ``/metrics`` before and after the point.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from tqdm import tqdm

_WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "river", "stone", "light", "music", "table", "window", "garden", "paper", "story", "market", "energy", "system", "water", "money", "history", "night", "morning", "answer", "question"]

# ShareGPT-like lengths (tokens). Published figures for ShareGPT_V3_unfiltered_cleaned_split.json:
# - the vLLM paper (Kwon et al., SOSP 2023, Fig. 11) gives the whole dataset's means: input 161.31, output
#   337.99 tokens (OPT tokenizer);
# - vLLM's benchmark_serving samples it with these rules (first human/gpt turn pair): drop pairs whose
#   prompt or output is shorter than 4 tokens, whose prompt exceeds 1024 tokens, or whose prompt + output
#   exceeds 2048 tokens. SGLang's bench_serving only drops < 2 tokens and pairs over the context length.
# - GPUStack's performance lab (docs.gpustack.ai, performance-lab/gpt-oss-120b/h100) ran `vllm bench serve
#   --dataset-name sharegpt --num-prompts 1000`: 215,312 input tokens and 195,544-196,540 generated
#   tokens, i.e. means of about 215 input and 196 output tokens per request after those rules.
# No published medians were found, so the shape is an assumption: log-normal input (sigma 1.2, a heavy
# tail of pasted documents) and output (sigma 1.0); the medians below were fitted so that, after vLLM's
# rules, the means match GPUStack's figures (measured over 200k draws: input mean 213, median 138;
# output mean 197, median 124).
SHAREGPT_INPUT_MEDIAN, SHAREGPT_INPUT_SIGMA = 150, 1.2
SHAREGPT_OUTPUT_MEDIAN, SHAREGPT_OUTPUT_SIGMA = 125, 1.0
SHAREGPT_MIN_LEN, SHAREGPT_MAX_INPUT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
SHAREGPT_MEANS = (213, 197)  # (input, output) means the rules above produce; the tests check them

# GPUStack performance lab (docs.gpustack.ai/latest/performance-lab/gpt-oss-120b/h100/, "Benchmark
# Dataset" and "Other Benchmark Cases"): random prompts of fixed lengths, run with `vllm bench serve
# --dataset-name random`. class: (input tokens, output tokens, number of prompts).
PROMPT_CLASSES = {
    "short": (128, 4, 1000),
    "medium": (2000, 100, 500),
    "long": (4000, 200, 500),
    "very-long": (32000, 100, 100),
}

# Schemas of the `structured` workload: typical extraction targets (strings, integers with bounds, enums,
# arrays, a nested object, required fields), all within what llguidance and outlines-core compile.
SCHEMAS = {
    "contact": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                       "age": {"type": "integer", "minimum": 0, "maximum": 130},
                       "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
        "required": ["name", "email"],
    },
    "product_review": {
        "type": "object",
        "properties": {"product": {"type": "string"}, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                       "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
                       "pros": {"type": "array", "items": {"type": "string"}},
                       "cons": {"type": "array", "items": {"type": "string"}}},
        "required": ["product", "rating", "sentiment"],
    },
    "support_ticket": {
        "type": "object",
        "properties": {"priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
                       "category": {"type": "string", "enum": ["billing", "technical", "account", "other"]},
                       "summary": {"type": "string"}, "needs_follow_up": {"type": "boolean"}},
        "required": ["priority", "category", "summary"],
    },
    "order": {
        "type": "object",
        "properties": {
            "order_id": {"type": "integer"},
            "customer": {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
                         "required": ["name"]},
            "items": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                               "unit_price": {"type": "number"}},
                "required": ["sku", "quantity"]}},
            "status": {"type": "string", "enum": ["pending", "shipped", "delivered", "cancelled"]},
        },
        "required": ["order_id", "items", "status"],
    },
}

DATASETS = ["random", "sharegpt", *PROMPT_CLASSES, "shared-prefix", "multi-turn", "structured"]
_STATS = ("mean", "median", "p90", "p95", "p99")


@dataclass
class Turn:
    """One request of a conversation: its prompt, the input length it was made for, its max output
    tokens, and (structured workload) the name of the JSON schema that constrains it."""

    prompt: str
    output_len: int
    input_len: int = 0
    schema_name: str | None = None


@dataclass
class Conversation:
    """One unit of arrival: a single request, or the turns of one multi-turn conversation."""

    turns: list[Turn]
    system: str = ""


@dataclass
class Result:
    """What the client measured for one request (times in seconds)."""

    ok: bool = False
    constrained: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    events: int = 0  # stream events that carried new output
    server_ttft: float | None = None  # the engine's own TTFT (plait's native meta_info.ttft), where reported
    error: str = ""

    def record(self) -> dict:
        """The per-request figures written to the JSON outputs (latencies in ms)."""
        return {"ok": self.ok, "constrained": self.constrained, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "ttft_ms": self.ttft * 1e3, "e2e_ms": self.e2e * 1e3,
                "events": self.events, "error": self.error,
                "server_ttft_ms": None if self.server_ttft is None else self.server_ttft * 1e3}


# ------------------------------------------------------------------------------------------ datasets
class TextMaker:
    """Random text of about ``n`` tokens: random token ids decoded (with a tokenizer) or random words."""

    def __init__(self, rng: random.Random, tokenizer_dir: str | None):
        self.rng, self.tokenizer = rng, None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def text(self, n: int) -> str:
        """About ``n`` tokens of random text (with a tokenizer: at most ``n`` once tokenized again)."""
        if self.tokenizer is not None:
            ids = [self.rng.randrange(1000, min(len(self.tokenizer), 30000)) for _ in range(n)]
            text = self.tokenizer.decode(ids)
            for _ in range(4):  # decoded ids tokenize to a few % more tokens (merges split): trim to n
                again = self.tokenizer.encode(text, add_special_tokens=False)
                if len(again) <= n:
                    break
                text = self.tokenizer.decode(again[:n])
            return text
        return " ".join(self.rng.choices(_WORDS, k=max(1, int(n * 0.75))))  # ~1.3 tokens a word


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    """A length drawn uniformly from [ratio * mean, mean] (at least 1)."""
    return max(1, rng.randint(max(1, int(mean * ratio)), mean))


def sharegpt_lengths(rng: random.Random) -> tuple[int, int]:
    """(input, output) tokens drawn from the ShareGPT-like log-normals, kept under vLLM's sampling rules."""
    while True:
        n_in = round(rng.lognormvariate(math.log(SHAREGPT_INPUT_MEDIAN), SHAREGPT_INPUT_SIGMA))
        n_out = round(rng.lognormvariate(math.log(SHAREGPT_OUTPUT_MEDIAN), SHAREGPT_OUTPUT_SIGMA))
        if min(n_in, n_out) >= SHAREGPT_MIN_LEN and n_in <= SHAREGPT_MAX_INPUT and n_in + n_out <= SHAREGPT_MAX_TOTAL:
            return n_in, n_out


def _turn(maker: TextMaker, input_len: int, output_len: int) -> Turn:
    """An unconstrained turn of random text."""
    return Turn(maker.text(input_len), output_len, input_len)


def _structured_turn(maker: TextMaker, input_len: int, output_len: int, schema_name: str) -> Turn:
    """A turn asking to extract a ``schema_name`` record from random text, constrained by that schema."""
    prompt = f"Extract a {schema_name.replace('_', ' ')} record as JSON from this text:\n{maker.text(input_len)}"
    return Turn(prompt, output_len, input_len, schema_name)


def default_num_prompts(args: argparse.Namespace) -> int:
    """``--num-prompts``, else the prompt class's own count, else 200."""
    if args.num_prompts is not None:
        return args.num_prompts
    return PROMPT_CLASSES[args.dataset][2] if args.dataset in PROMPT_CLASSES else 200


def build_dataset(args: argparse.Namespace) -> list[Conversation]:
    """The workload's conversations, reproducible from ``--seed``."""
    rng = random.Random(args.seed)
    maker = TextMaker(rng, args.tokenizer)
    n = default_num_prompts(args)
    ilen, olen, ratio = args.random_input_len, args.random_output_len, args.random_range_ratio

    def random_turn() -> Turn:
        return _turn(maker, _length(rng, ilen, ratio), _length(rng, olen, ratio))

    if args.dataset == "sharegpt":
        return [Conversation([_turn(maker, *sharegpt_lengths(rng))]) for _ in range(n)]
    if args.dataset in PROMPT_CLASSES:
        n_in, n_out, _ = PROMPT_CLASSES[args.dataset]
        return [Conversation([_turn(maker, n_in, n_out)]) for _ in range(n)]
    if args.dataset == "shared-prefix":
        systems = [maker.text(args.shared_prefix_len) for _ in range(args.num_groups)]
        return [Conversation([random_turn()], system=systems[i % args.num_groups]) for i in range(n)]
    if args.dataset == "multi-turn":
        return [Conversation([random_turn() for _ in range(args.turns)]) for _ in range(max(1, n // args.turns))]
    if args.dataset == "structured":
        constrained = set(rng.sample(range(n), round(args.structured_ratio * n)))
        names = list(SCHEMAS)
        return [Conversation([_structured_turn(maker, _length(rng, ilen, ratio), _length(rng, olen, ratio),
                                               names[i % len(names)]) if i in constrained else random_turn()])
                for i in range(n)]
    return [Conversation([random_turn()]) for _ in range(n)]


# ------------------------------------------------------------------------------------------ clients
def build_request(backend: str, model: str | None, system: str, history: list[dict[str, str]], turn: Turn,
                  ignore_eos: bool = True) -> tuple[str, dict]:
    """(path, JSON body) of one streamed request; ``history`` holds earlier turns (role, content).

    A schema-constrained turn carries its schema where each protocol takes it (native:
    ``sampling_params["json_schema"]`` as a JSON string, as SGLang takes it; OpenAI:
    ``response_format``) and never ``ignore_eos``."""
    schema = SCHEMAS[turn.schema_name] if turn.schema_name else None
    ignore_eos = ignore_eos and schema is None
    if backend == "openai-chat":
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": turn.prompt}]
        return "/v1/chat/completions", {**_openai_body(model, turn, schema, ignore_eos), "messages": messages}
    text = system + "".join(f"\n{m['role']}: {m['content']}" for m in history) + \
        (f"\nuser: {turn.prompt}\nassistant:" if history or system else turn.prompt)
    if backend == "openai":
        return "/v1/completions", {**_openai_body(model, turn, schema, ignore_eos), "prompt": text}
    sampling: dict = {"max_new_tokens": turn.output_len, "temperature": 0}
    if ignore_eos:
        sampling["ignore_eos"] = True
    if schema is not None:
        sampling["json_schema"] = json.dumps(schema)
    return "/generate", {"text": text, "stream": True, "sampling_params": sampling}


def _openai_body(model: str | None, turn: Turn, schema: dict | None, ignore_eos: bool) -> dict:
    """The fields both OpenAI endpoints share: streaming with usage, max tokens, schema or ignore_eos."""
    body: dict = {"model": model, "max_tokens": turn.output_len, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": turn.schema_name, "schema": schema}}
    return body


def _parse_event(backend: str, data: dict, result: Result) -> str:
    """Update counts from one SSE event; returns its text (native: cumulative; OpenAI: the delta)."""
    if data.get("error"):
        raise RuntimeError(f"stream error: {str(data['error'])[:200]}")
    if backend in ("plait", "sglang"):
        meta = data["meta_info"]
        result.prompt_tokens, result.completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
        return data["text"]
    if data.get("usage"):
        result.prompt_tokens = data["usage"]["prompt_tokens"]
        result.completion_tokens = data["usage"]["completion_tokens"]
    if not data.get("choices"):
        return ""
    choice = data["choices"][0]
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


def _server_ttft(data: dict) -> float | None:
    """The engine-side TTFT a native event reports (plait: ``meta_info.ttft``, seconds from the engine
    receiving the request to its first token); None where the server reports none (SGLang)."""
    value = data.get("meta_info", {}).get("ttft")
    return float(value) if isinstance(value, (int, float)) else None


class _StreamParser:
    """Turns the bytes of one SSE response into measured events: lines are split out of whatever chunks
    arrive (several events per chunk when the client or the network lags), and every ``data:`` event
    that brings new tokens is timed at the arrival of its chunk."""

    def __init__(self, backend: str, result: Result, start: float):
        self.native = backend in ("plait", "sglang")
        self.backend, self.result, self.start = backend, result, start
        self.text, self.last, self.tokens_seen, self.pending = "", 0.0, 0, b""

    def feed(self, chunk: bytes, now: float) -> None:
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self._line(line, now)

    def close(self, now: float) -> None:
        if self.pending:
            self._line(self.pending, now)
            self.pending = b""

    def _line(self, line: bytes, now: float) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        data = json.loads(payload)
        result = self.result
        added = _parse_event(self.backend, data, result)
        if self.native:
            new_tokens, self.tokens_seen = result.completion_tokens - self.tokens_seen, result.completion_tokens
            self.text = added  # cumulative
        else:
            new_tokens, self.text = (1 if added else 0), self.text + added
        if new_tokens <= 0:
            return
        if result.events == 0:
            result.ttft = now - self.start
            if self.native:
                result.server_ttft = _server_ttft(data)
        else:
            result.itl.extend([(now - self.last) / new_tokens] * new_tokens)
        result.events, self.last = result.events + 1, now


async def send(session: aiohttp.ClientSession, backend: str, url: str, body: dict) -> tuple[Result, str]:
    """Stream one request to ``url``; returns its measurements and its generated text. Never raises: any
    failure (HTTP status, network, malformed stream) is recorded in ``Result.error``."""
    result = Result()
    start = time.perf_counter()
    parser = _StreamParser(backend, result, start)
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return result, ""
            async for chunk in response.content.iter_any():
                parser.feed(chunk, time.perf_counter())
            parser.close(time.perf_counter())
        result.e2e = time.perf_counter() - start
        result.ok = result.completion_tokens > 0
        if not result.ok:
            result.error = "no tokens reported"
    except Exception as exc:  # one request's failure is recorded; it never stops the run
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result, parser.text


def _session(args: argparse.Namespace) -> aiohttp.ClientSession:
    """The HTTP client of one process: no connection limit, no timeout (as SGLang's bench_serving)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None),
                                 connector=aiohttp.TCPConnector(limit=0))


async def run_conversation(session: aiohttp.ClientSession, args: argparse.Namespace, model: str | None,
                           conv: Conversation, limit: asyncio.Semaphore | None, results: list[Result],
                           progress) -> None:
    """Send a conversation's turns in order (each turn resends the history); stops at a failed turn."""
    history: list[dict[str, str]] = []
    base = args.base_url.rstrip("/")
    for turn in conv.turns:
        path, body = build_request(args.backend, model, conv.system, history, turn, not args.disable_ignore_eos)
        if limit is None:
            result, text = await send(session, args.backend, base + path, body)
        else:
            async with limit:
                result, text = await send(session, args.backend, base + path, body)
        result.constrained = turn.schema_name is not None
        results.append(result)
        progress.update(1)
        if not result.ok:
            return
        history += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": text}]


@dataclass
class ShardRun:
    """One process's share of a point: its results, its start and end (``time.monotonic``, comparable
    across the processes of one machine) and the CPU seconds the process spent meanwhile."""

    results: list[Result]
    start: float
    end: float
    cpu: float


async def run_point(session: aiohttp.ClientSession, args: argparse.Namespace, model: str | None,
                    dataset: list[Conversation], progress, seed: int | None = None) -> ShardRun:
    """Run the whole workload once at ``args.request_rate`` / ``args.max_concurrency``."""
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = random.Random(args.seed + 1 if seed is None else seed)
    results: list[Result] = []
    tasks = []
    start, cpu = time.monotonic(), time.process_time()
    for conv in dataset:
        tasks.append(asyncio.create_task(run_conversation(session, args, model, conv, limit, results, progress)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    await asyncio.gather(*tasks)
    return ShardRun(results, start, time.monotonic(), time.process_time() - cpu)


def shard_plan(args: argparse.Namespace, conversations: int) -> list[tuple[int | None, float, slice]]:
    """How a point is split over the client's processes: per process, its concurrency cap, its request
    rate and its slice of the conversations (every ``n``-th one). ``n`` is ``--client-processes``, at
    most the concurrency cap and the number of conversations; caps and rates are split so that they add
    up to the point's own (the sum of independent Poisson processes is the Poisson process of the sum)."""
    n = max(1, min(args.client_processes, args.max_concurrency or conversations, conversations))
    plan = []
    for i in range(n):
        cap = None
        if args.max_concurrency:
            cap = args.max_concurrency // n + (1 if i < args.max_concurrency % n else 0)
        plan.append((cap, args.request_rate / n, slice(i, None, n)))
    return plan


class _ProgressLines:
    """The progress bar of a worker process: ``+N`` lines on its stdout, read by ``_run_shards``."""

    def update(self, n: int = 1) -> None:
        sys.stdout.write(f"+{n}\n")
        sys.stdout.flush()


async def _run_shards(args: argparse.Namespace, plan: list[tuple[int | None, float, slice]], model: str | None,
                      dataset: list[Conversation], progress) -> ShardRun:
    """Run one point over worker processes (this script with ``--shard-worker``) as ``plan`` splits it,
    each with its own event loop and connections; they start together and their results are merged."""
    procs = []
    for index, (cap, rate, part) in enumerate(plan):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--shard-worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 30)
        spec = {"args": vars(_with(args, max_concurrency=cap, request_rate=rate)), "model": model,
                "seed": args.seed + 1 + index, "conversations": [asdict(c) for c in dataset[part]]}
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        await proc.stdin.drain()
        procs.append(proc)
    try:
        for proc in procs:  # every worker has its connections open before any request is sent
            if (await proc.stdout.readline()).strip() != b"ready":
                raise RuntimeError("a client worker process failed to start")
        for proc in procs:
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()

        async def collect(proc) -> ShardRun:
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"a client worker process exited early (code {await proc.wait()})")
                if line.startswith(b"+"):
                    progress.update(int(line[1:]))
                    continue
                run = json.loads(line)
                return ShardRun([Result(**r) for r in run["results"]], run["start"], run["end"], run["cpu"])

        shards = await asyncio.gather(*(collect(proc) for proc in procs))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    return ShardRun([r for shard in shards for r in shard.results], min(s.start for s in shards),
                    max(s.end for s in shards), max(s.cpu for s in shards))


def shard_worker() -> int:
    """``--shard-worker``: read one point's share (a JSON line), answer ``ready``, wait for ``go``, run it,
    print ``+1`` per finished request and then the results as one JSON line."""
    spec = json.loads(sys.stdin.readline())
    args = argparse.Namespace(**spec["args"])
    dataset = [Conversation([Turn(**t) for t in c["turns"]], c["system"]) for c in spec["conversations"]]

    async def main() -> ShardRun:
        async with _session(args) as session:
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            return await run_point(session, args, spec["model"], dataset, _ProgressLines(), seed=spec["seed"])

    run = asyncio.run(main())
    sys.stdout.write(json.dumps({"results": [asdict(r) for r in run.results], "start": run.start, "end": run.end,
                                 "cpu": run.cpu}) + "\n")
    sys.stdout.flush()
    return 0


def sweep_points(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """(label, arguments) of every point: one per concurrency cap or request rate, or the single run."""
    if args.concurrency_sweep:
        return [(f"concurrency {c}", _with(args, max_concurrency=c, request_rate=float("inf")))
                for c in args.concurrency_sweep]
    if args.rate_sweep:
        return [(f"rate {r:g}", _with(args, request_rate=r)) for r in args.rate_sweep]
    return [("run", args)]


def _with(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    """A copy of ``args`` with ``changes`` applied."""
    point = copy.copy(args)
    vars(point).update(changes)
    return point


CLIENT_BUSY_WARNING = 0.8  # a client process busier than this share of the run may be what limits it

# plait's engine counters (``/metrics``), read before and after each point: what the engine did for it
ENGINE_COUNTERS = ("engine_steps", "engine_overlapped_steps", "engine_graph_steps", "engine_piecewise_graph_steps",
                   "budget_searches",
                   "budget_searches_without_ending", "budget_search_seconds", "budget_endings_reused",
                   "budget_endings_learned")


async def engine_counters(session: aiohttp.ClientSession, base_url: str) -> dict[str, float] | None:
    """plait's ``ENGINE_COUNTERS`` from the server's ``/metrics``; None where it has none (another server,
    an older plait, no /metrics) or does not answer within 5 s."""
    try:
        async with session.get(base_url.rstrip("/") + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("plait:") and name[6:] in ENGINE_COUNTERS:
            try:
                values[name[6:]] = float(value)
            except ValueError:
                continue
    return values if "engine_steps" in values else None


async def flush_cache(session: aiohttp.ClientSession, base_url: str, attempts: int = 20) -> None:
    """Empty the server's prefix cache (``POST /flush_cache``, SGLang's and plait's endpoint). A server
    still finishing the last point's requests answers 400: asked again for up to ``attempts`` half-seconds.
    Raises RuntimeError when it never flushes (or has no such endpoint)."""
    url = base_url.rstrip("/") + "/flush_cache"
    status, text = 0, ""
    for _ in range(attempts):
        async with session.post(url) as response:
            status, text = response.status, (await response.text()).strip()
        if status == 200:
            return
        if status != 400:
            break
        await asyncio.sleep(0.5)
    raise RuntimeError(f"--flush-cache: {url} answered {status} {text!r}")


def engine_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """What the engine counted between two reads (None unless both have the counters)."""
    if before is None or after is None:
        return None
    return {name: after[name] - before[name] for name in after if name in before}


async def run_points(args: argparse.Namespace, dataset: list[Conversation]) -> list[dict]:
    """Run every point in turn; returns each point's summary with its per-request figures (``requests``)
    and its ``label``. A point runs in this process or, with ``--client-processes`` above 1, over worker
    processes (``_run_shards``)."""
    points = sweep_points(args)
    total = sum(len(conv.turns) for conv in dataset)
    records = []
    async with _session(args) as session:
        model = args.model
        if model is None and args.backend.startswith("openai"):
            async with session.get(args.base_url.rstrip("/") + "/v1/models") as response:
                model = (await response.json())["data"][0]["id"]
        for index, (label, point_args) in enumerate(points, 1):
            with tqdm(total=total, desc=f"point {index}/{len(points)} ({label})", unit="req",
                      disable=True if args.no_progress else None) as progress:
                plan = shard_plan(point_args, len(dataset))
                if args.flush_cache:
                    await flush_cache(session, args.base_url)
                counted = await engine_counters(session, args.base_url)
                if len(plan) > 1:
                    run = await _run_shards(point_args, plan, model, dataset, progress)
                else:
                    run = await run_point(session, point_args, model, dataset, progress)
            duration = run.end - run.start
            summary = summarize(point_args, run.results, duration)
            summary["client_processes"] = len(plan)
            summary["client_cpu_busy"] = run.cpu / duration if duration > 0 else 0.0
            engine = engine_delta(counted, await engine_counters(session, args.base_url))
            if engine is not None:
                summary["engine"] = engine
            print_summary(summary)
            records.append({"label": label, **summary, "requests": [r.record() for r in run.results]})
    return records


# ------------------------------------------------------------------------------------------ report
def _stats_ms(values: list[float]) -> dict[str, float]:
    """mean / median / p90 / p95 / p99 of seconds, in ms (zeros when empty)."""
    if not values:
        return dict.fromkeys(_STATS, 0.0)
    ms = np.asarray(values) * 1e3
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99))}


def _metrics(results: list[Result], duration: float) -> dict:
    """Counts, throughputs and latency statistics of a set of results over a run of ``duration`` s."""
    done = [r for r in results if r.ok]
    tpots = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in done if r.completion_tokens > 1]
    inputs, outputs = sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done)
    events = sum(r.events for r in done)
    metrics = {
        "completed": len(done), "failed": len(results) - len(done),
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(done) / duration, "input_throughput": inputs / duration,
        "output_throughput": outputs / duration, "total_throughput": (inputs + outputs) / duration,
        "mean_tokens_per_event": outputs / events if events else 0.0,
    }
    for name, values in (("ttft", [r.ttft for r in done]), ("tpot", tpots),
                         ("itl", [x for r in done for x in r.itl]), ("e2e_latency", [r.e2e for r in done])):
        metrics.update({f"{stat}_{name}_ms": value for stat, value in _stats_ms(values).items()})
    served = [r for r in done if r.server_ttft is not None]
    if served:  # what the HTTP path and the client add to the engine's own TTFT
        for name, values in (("server_ttft", [r.server_ttft for r in served]),
                             ("ttft_overhead", [r.ttft - r.server_ttft for r in served])):
            metrics.update({f"{stat}_{name}_ms": value for stat, value in _stats_ms(values).items()})
    return metrics


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict:
    """The run's summary; with schema-constrained requests also ``constrained`` / ``unconstrained``
    sub-summaries (their throughputs are their share over the same duration)."""
    summary = {"backend": args.backend, "dataset": args.dataset, "request_rate": args.request_rate,
               "max_concurrency": args.max_concurrency, "duration_s": duration, **_metrics(results, duration)}
    if any(r.constrained for r in results):
        for name, want in (("constrained", True), ("unconstrained", False)):
            summary[name] = _metrics([r for r in results if r.constrained == want], duration)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    summary["errors"] = [{"error": e, "count": c} for e, c in list(errors.items())[:5]]  # first distinct ones
    return summary


def _row(label: str, value: object) -> None:
    """One ``label value`` line of the summary."""
    print(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value!s:<10}")


def print_summary(s: dict) -> None:
    """Print a summary in SGLang's bench_serving layout."""
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    for label, key in (("Backend:", "backend"), ("Dataset:", "dataset"), ("Traffic request rate:", "request_rate"),
                       ("Max request concurrency:", "max_concurrency"), ("Successful requests:", "completed"),
                       ("Failed requests:", "failed"), ("Benchmark duration (s):", "duration_s"),
                       ("Client processes:", "client_processes"), ("Client CPU busy (busiest process):", "client_cpu_busy"),
                       ("Total input tokens:", "total_input_tokens"),
                       ("Total generated tokens:", "total_output_tokens"),
                       ("Request throughput (req/s):", "request_throughput"),
                       ("Input token throughput (tok/s):", "input_throughput"),
                       ("Output token throughput (tok/s):", "output_throughput"),
                       ("Total token throughput (tok/s):", "total_throughput"),
                       ("Mean tokens per stream event:", "mean_tokens_per_event")):
        if key in s:  # the in-process engine's summaries (benchmarks/serving_run.py) have no client rows
            _row(label, s[key])
    for title, key, name in (("Time to First Token", "ttft", "TTFT"),
                             ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                             ("Inter-token Latency", "itl", "ITL"), ("End-to-End Latency", "e2e_latency", "E2E")):
        print("{s:{c}^50}".format(s=title, c="-"))
        for stat in _STATS:
            _row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {name} (ms):",
                 s[f"{stat}_{key}_ms"])
    if "median_server_ttft_ms" in s:
        print("{s:{c}^50}".format(s="Engine-side TTFT (server-reported)", c="-"))
        for label, key in (("Median engine TTFT (ms):", "median_server_ttft_ms"),
                           ("Median TTFT overhead (ms):", "median_ttft_overhead_ms"),
                           ("P99 TTFT overhead (ms):", "p99_ttft_overhead_ms")):
            _row(label, s[key])
    for part in ("constrained", "unconstrained"):
        if part in s:
            print("{s:{c}^50}".format(s=f"{part.capitalize()} requests", c="-"))
            _row("Successful / failed requests:", f"{s[part]['completed']} / {s[part]['failed']}")
            for label, key in (("Output token throughput (tok/s):", "output_throughput"),
                               ("Median TTFT (ms):", "median_ttft_ms"), ("Median TPOT (ms):", "median_tpot_ms"),
                               ("Median E2E (ms):", "median_e2e_latency_ms"), ("P99 E2E (ms):", "p99_e2e_latency_ms")):
                _row(label, s[part][key])
    if "engine" in s:
        _print_engine(s["engine"], s.get("constrained", {}).get("completed", 0))
    print("=" * 50)
    if s.get("client_cpu_busy", 0.0) > CLIENT_BUSY_WARNING:
        print(f"warning: a client process was busy {s['client_cpu_busy']:.0%} of the run, so the client may be what "
              "limits these figures; raise --client-processes")
    for error in s["errors"]:
        print(f"error ({error['count']}x): {error['error']}")


def _print_engine(engine: dict[str, float], constrained: int) -> None:
    """The engine's own counts for the point (plait servers' /metrics): steps, how many were replayed
    from decode and from piecewise CUDA graphs, and budget steering's searches (those of requests
    finished during the point)."""
    print("{s:{c}^50}".format(s="Engine (server /metrics, this point)", c="-"))
    steps = engine.get("engine_steps", 0.0)
    _row("Engine steps:", int(steps))
    if steps:
        _row("Decode graphs replayed (share):", engine.get("engine_graph_steps", 0.0) / steps)
        _row("Piecewise graphs replayed (share):", engine.get("engine_piecewise_graph_steps", 0.0) / steps)
        _row("Overlapped (share):", engine.get("engine_overlapped_steps", 0.0) / steps)
    searches = engine.get("budget_searches", 0.0)
    if searches or engine.get("budget_endings_reused"):
        _row("Budget searches:", int(searches))
        _row("Budget searches without an ending:", int(engine.get("budget_searches_without_ending", 0.0)))
        _row("Budget search time (s):", engine.get("budget_search_seconds", 0.0))
        if constrained:
            _row("Budget searches per constrained request:", searches / constrained)
        if steps:
            _row("Budget search ms per engine step:", 1e3 * engine.get("budget_search_seconds", 0.0) / steps)
        _row("Budget endings reused:", int(engine.get("budget_endings_reused", 0.0)))
        _row("Of them learned from earlier searches:", int(engine.get("budget_endings_learned", 0.0)))


def print_sweep_table(records: list[dict]) -> None:
    """One line per sweep point: throughputs and median / p99 latencies."""
    columns = (("point", "label", 16), ("ok", "completed", 5), ("fail", "failed", 5),
               ("req/s", "request_throughput", 8),
               ("out tok/s", "output_throughput", 10), ("tot tok/s", "total_throughput", 10),
               ("TTFT med", "median_ttft_ms", 9), ("TTFT p99", "p99_ttft_ms", 9), ("TPOT med", "median_tpot_ms", 9),
               ("TPOT p99", "p99_tpot_ms", 9), ("ITL med", "median_itl_ms", 8), ("E2E med", "median_e2e_latency_ms", 9))
    print(" ".join(f"{title:>{width}}" for title, _, width in columns))
    for record in records:
        print(" ".join(f"{record[key]:>{width}.2f}" if isinstance(record[key], float) else f"{record[key]!s:>{width}}"
                       for _, key, width in columns))


def sweep_document(args: argparse.Namespace, records: list[dict]) -> dict:
    """What ``sweep.json`` holds: the sweep kind, the arguments and every point."""
    kind = "concurrency" if args.concurrency_sweep else "rate" if args.rate_sweep else None
    return {"sweep": kind, "args": vars(args), "points": records}


def write_outputs(args: argparse.Namespace, records: list[dict]) -> None:
    """``--output-dir``: one JSON per point plus ``sweep.json``; ``--output-file``: the single run's
    summary and arguments (for a sweep, the sweep document)."""
    document = sweep_document(args, records)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for record in records:
            _write_json(out / f"{record['label'].replace(' ', '-')}.json", {**record, "args": vars(args)})
        _write_json(out / "sweep.json", document)
    if args.output_file:
        single = {key: value for key, value in records[0].items() if key not in ("label", "requests")}
        _write_json(Path(args.output_file), {**single, "args": vars(args)} if len(records) == 1 else document)


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON (non-JSON values as their str)."""
    path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")


# ------------------------------------------------------------------------------------------ plots
def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported only when plots are asked for."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot / --plot-from need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(document: dict, out_dir: Path) -> list[Path]:
    """Draw PNG charts of a sweep document into ``out_dir``; returns their paths. Always: throughput vs
    median TPOT and TTFT / E2E latency CDFs (one curve per point); for a sweep also throughput, TTFT and
    TPOT (median, p99) against the swept concurrency or rate."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    points, kind, paths = document["points"], document.get("sweep"), []

    def chart(name: str, title: str, xlabel: str, ylabel: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)

    if kind:
        key, xlabel = ("max_concurrency", "max concurrency") if kind == "concurrency" else \
            ("request_rate", "request rate (req/s)")
        swept = [p for p in points if isinstance(p[key], (int, float)) and math.isfinite(p[key])]
        xs = [p[key] for p in swept]

        def lines(fields: tuple[tuple[str, str], ...]):
            def draw(ax) -> None:
                for field_name, label in fields:
                    ax.plot(xs, [p[field_name] for p in swept], marker="o", label=label)
                if kind == "concurrency" and xs and min(xs) > 0 and max(xs) >= 8 * min(xs):
                    ax.set_xscale("log", base=2)
            return draw

        chart(f"throughput_vs_{kind}.png", f"Throughput vs {xlabel}", xlabel, "tokens/s",
              lines((("output_throughput", "output tok/s"), ("total_throughput", "total tok/s"))))
        for metric, name in (("ttft", "TTFT"), ("tpot", "TPOT")):
            chart(f"{metric}_vs_{kind}.png", f"{name} vs {xlabel}", xlabel, f"{name} (ms)",
                  lines(((f"median_{metric}_ms", f"median {name}"), (f"p99_{metric}_ms", f"p99 {name}"))))

    def tradeoff(ax) -> None:
        ax.plot([p["median_tpot_ms"] for p in points], [p["output_throughput"] for p in points], marker="o")
        for p in points:
            ax.annotate(p["label"], (p["median_tpot_ms"], p["output_throughput"]), fontsize=7)

    chart("throughput_vs_tpot.png", "Output throughput vs median TPOT", "median TPOT (ms)", "output tok/s", tradeoff)
    for metric, name in (("ttft_ms", "TTFT"), ("e2e_ms", "E2E latency")):
        def cdf(ax, metric: str = metric) -> None:
            for p in points:
                values = sorted(r[metric] for r in p["requests"] if r["ok"])
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=p["label"])
        chart(f"cdf_{metric.removesuffix('_ms')}.png", f"{name} CDF", f"{name} (ms)", "fraction of requests", cdf)
    return paths


# ------------------------------------------------------------------------------------------ main
def _list_of(kind: type):
    """An argparse type: a comma-separated list of ``kind``."""
    return lambda text: [kind(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=["plait", "sglang", "openai", "openai-chat"], default="plait")
    p.add_argument("--model", default=None, help="model id for the OpenAI API (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests (multi-turn: total turns); default: the prompt class's count, else 200")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=1.0, help="lengths drawn from [ratio*len, len]")
    p.add_argument("--shared-prefix-len", type=int, default=1024, help="shared-prefix: system prompt tokens")
    p.add_argument("--num-groups", type=int, default=8, help="shared-prefix: distinct system prompts")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--structured-ratio", type=float, default=0.5,
                   help="structured: share of requests constrained by a JSON schema")
    p.add_argument("--disable-ignore-eos", action="store_true", help="let unconstrained outputs stop at EOS")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--concurrency-sweep", type=_list_of(int), default=None, metavar="C1,C2,...",
                       help="one run per max concurrency, all requests at once (overrides the two above)")
    sweep.add_argument("--rate-sweep", type=_list_of(float), default=None, metavar="R1,R2,...",
                       help="one run per Poisson request rate (each capped by --max-concurrency)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir: random prompts from random token ids")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="also write the summary as JSON (a sweep: sweep.json's content)")
    p.add_argument("--output-dir", default=None, help="write one JSON per point and sweep.json here")
    p.add_argument("--plot", action="store_true", help="draw PNG charts into --output-dir (needs matplotlib)")
    p.add_argument("--plot-from", default=None, metavar="SWEEP_JSON",
                   help="only re-draw the charts of a sweep.json (into --output-dir, else beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--flush-cache", action="store_true",
                   help="empty the server's prefix cache before each point (POST /flush_cache, as SGLang's\n"
                        "bench_serving does): a sweep re-sends the same prompts, which later points would\n"
                        "otherwise find cached")
    p.add_argument("--client-processes", type=int, default=1,
                   help="client processes a point is spread over (each with its own event loop; at most the\n"
                        "concurrency cap); default 1, as SGLang's and vLLM's clients. One Python process\n"
                        "parses a few ten thousand events a second; the summary's client busy share says\n"
                        "whether it kept up (raise this when it warns). On the server's own host every\n"
                        "extra process takes CPU from the server")
    args = p.parse_args(argv)
    if args.client_processes < 1:
        p.error("--client-processes must be at least 1")
    if args.plot and not args.output_dir:
        p.error("--plot needs --output-dir")
    if not 0.0 <= args.structured_ratio <= 1.0:
        p.error("--structured-ratio must be within [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--shard-worker"]:
        return shard_worker()
    args = parse_args(argv)
    if args.plot_from:
        source = Path(args.plot_from)
        for path in plot_sweep(json.loads(source.read_text(encoding="utf-8")), Path(args.output_dir or source.parent)):
            print("wrote", path)
        return 0
    if args.plot:
        _pyplot()  # fail before the run, not after it, when matplotlib is missing
    records = asyncio.run(run_points(args, build_dataset(args)))
    if len(records) > 1:
        print_sweep_table(records)
    write_outputs(args, records)
    if args.plot:
        for path in plot_sweep(sweep_document(args, records), Path(args.output_dir)):
            print("wrote", path)
    return 0 if all(record["completed"] for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
