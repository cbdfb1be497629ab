"""Where a streamed request's time to first token goes in ``plait serve``, hop by hop, at concurrency 1.

    python benchmarks/ttft_trace.py --model llama-3.1-8b --load-format dummy --tokenizer DIR \\
        --input-len 256 --requests 100
    python benchmarks/ttft_trace.py --model smollm2-135m-instruct --input-len 64 --requests 30

Starts ``plait serve`` (extra arguments after ``--`` go to it) with a ``sitecustomize`` on its path that
timestamps (``time.perf_counter``: CLOCK_MONOTONIC, one clock for every process of the host) the
points below in the HTTP, engine and detokenizer processes, then sends one streamed native
``/generate`` at a time (random token ids as text, ``max_new_tokens`` 2, as ``benchmarks/serving.py``
sends them) and timestamps the send and the first event that brings text on the client. Requests run
one at a time, so each point belongs to the request whose send precedes it. Prints, per hop, the median
and p90 over the requests (the first ``--warmup`` requests are left out)::

    client send -> HTTP handler -> submit (parsed, tokenized) -> command sent -> engine process has it
    -> engine thread adds it -> step starts -> first output ready -> HTTP process has it
    -> SSE event made -> client has it

With ``--burst N`` the requests are sent all at once instead (``--warmup`` requests one at a time
first), as a load benchmark's burst arrives; then no point can be told apart by request, so the script
prints, per point, how long after the burst's send the first, the median and the last of the burst's
requests passed it (a point passed once per step, such as ``step_started``, counts steps instead). A
point whose median moves far past the previous point's is where a burst queues. ``--burst N --in-process``
sends the same burst to an ``Engine`` in this process (``Engine.submit`` from one thread, as
``benchmarks/serving_run.py`` does), with the engine's points traced alike: the two tables side by
side say whether a server's slower burst comes from its HTTP side or from the engine's own steps.

The hooks wrap methods and module globals by name (``TRACE_POINTS``); one that no longer exists is
reported, not skipped silently. The timestamps cost a few microseconds each (one line written to a
file), on top of what they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (module, attribute path, label, when): the label is recorded on entry ("enter"), on return ("exit"),
# on entry of an urgent call ("enter_urgent"), or, for EngineClient._dispatch, per message kind
# arriving. Class attributes and module globals are looked up when called, so wrapping them after
# import takes effect.
TRACE_POINTS = [
    ("plait.runtime.server.app", "parsed_request", "http_handler", "enter"),
    ("plait.runtime.server.limits", "read_body", "http_body_read", "exit"),
    ("plait.runtime.server.app", "ServerState.encode", "http_tokenize", "enter"),
    ("plait.runtime.server.app", "ServerState.encode", "http_tokenized", "exit"),
    ("plait.runtime.server.process", "EngineClient.submit", "http_submit", "enter"),
    ("plait.runtime.server.process", "EngineClient._send", "http_command_send", "enter"),
    ("plait.runtime.server.process", "_EngineServer._generate", "engine_received", "enter"),
    ("plait.runtime.server.process", "_EngineServer._generate", "engine_submitted", "exit"),
    ("plait.runtime.engine", "Engine._apply", "engine_thread_added", "enter"),
    ("plait.runtime.engine", "Engine._step", "step_started", "enter"),
    ("plait.runtime.engine", "Engine._step", "step_ended", "exit"),
    ("plait.runtime.server.process", "_Outbox.put", "first_output_ready", "enter_urgent"),
    ("plait.runtime.server.process", "EngineClient._dispatch", "http_got", "dispatch"),
    ("plait.runtime.server.app", "sse", "http_sse_event", "enter"),
]

SITECUSTOMIZE = r'''
import os, sys, threading, time, functools, inspect
_POINTS = %(points)r
_OUT = open(os.path.join(%(dir)r, "trace-%%d.txt" %% os.getpid()), "a", buffering=1)
_LOCK = threading.Lock()

def _mark(label):
    t = time.perf_counter()
    with _LOCK:
        _OUT.write("%%s %%.9f\n" %% (label, t))

def _wrap(fn, label, when):
    if when == "dispatch":
        def wrapper(*args, **kwargs):
            for message in args[-1]:
                kind = message[0]
                if kind == "out" and message[4].get("first"):
                    kind = "first_out"
                _mark("http_got_" + kind)
            return fn(*args, **kwargs)
    elif inspect.iscoroutinefunction(fn):
        async def wrapper(*args, **kwargs):
            if when == "enter":
                _mark(label)
            try:
                return await fn(*args, **kwargs)
            finally:
                if when == "exit":
                    _mark(label)
    elif when == "enter":
        def wrapper(*args, **kwargs):
            _mark(label)
            return fn(*args, **kwargs)
    elif when == "exit":
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                _mark(label)
    else:  # enter_urgent: _Outbox.put(item, urgent=True), a first output
        def wrapper(*args, **kwargs):
            if kwargs.get("urgent", args[2] if len(args) > 2 else False):
                _mark(label)
            return fn(*args, **kwargs)
    return functools.wraps(fn)(wrapper)

def _patch():
    todo = list(_POINTS)
    deadline = time.monotonic() + 600
    while todo and time.monotonic() < deadline:
        for point in list(todo):
            module_name, path, label, when = point
            module = sys.modules.get(module_name)
            if module is None or not hasattr(module, path.split(".")[0]):
                continue
            owner, name = module, path
            if "." in path:
                cls_name, name = path.split(".")
                owner = getattr(module, cls_name)
            fn = getattr(owner, name, None)
            if fn is None:
                _mark("missing:" + module_name + "." + path)
            else:
                setattr(owner, name, _wrap(fn, label, when))
            todo.remove(point)
        time.sleep(0.02)

threading.Thread(target=_patch, daemon=True).start()
'''

HOPS = [
    ("client send -> HTTP handler", "client_send", "http_handler"),
    ("HTTP handler -> body read", "http_handler", "http_body_read"),
    ("body read -> tokenizing starts (JSON parsed)", "http_body_read", "http_tokenize"),
    ("tokenizing", "http_tokenize", "http_tokenized"),
    ("tokenized -> submit (request checked)", "http_tokenized", "http_submit"),
    ("submit -> command sent", "http_submit", "http_command_send"),
    ("command sent -> engine process has it", "http_command_send", "engine_received"),
    ("engine process: Engine.submit", "engine_received", "engine_submitted"),
    ("engine process -> engine thread adds it", "engine_received", "engine_thread_added"),
    ("engine thread adds it -> step starts", "engine_thread_added", "step_started"),
    ("step starts -> first output ready", "step_started", "first_output_ready"),
    ("first output ready -> HTTP process has it", "first_output_ready", "http_got_first_out"),
    ("HTTP process has it -> SSE event made", "http_got_first_out", "http_sse_event"),
    ("SSE event made -> client has it", "http_sse_event", "client_first"),
    ("client send -> client has it (TTFT)", "client_send", "client_first"),
    ("engine: thread adds it -> first output ready", "engine_thread_added", "first_output_ready"),
]


# The points in the order a request passes them, for the burst table.
BURST_ORDER = ["client_send", "http_handler", "http_body_read", "http_tokenize", "http_tokenized", "http_submit",
               "http_command_send", "engine_received", "engine_submitted", "engine_thread_added", "step_started",
               "first_output_ready", "http_got_first_out", "http_sse_event", "client_first"]


def step_times(points: list[tuple[float, str]], start: float) -> list[float]:
    """Each engine step's duration in ms (``step_started`` to the next ``step_ended``) after ``start``."""
    durations, began = [], None
    for t, label in points:
        if t < start:
            continue
        if label == "step_started":
            began = t
        elif label == "step_ended" and began is not None:
            durations.append(1e3 * (t - began))
            began = None
    return durations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"plait serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"plait serve did not answer /health within {timeout:.0f} s")


def sampling_params(output_len: int) -> dict:
    """Every traced request's: ``output_len`` tokens, whatever they are."""
    return {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0.0}


async def stream_one(session, url: str, prompt: str, output_len: int) -> tuple[float, float | None]:
    """One streamed native ``/generate``, read to its end; (send time, first text event time)."""
    body = {"text": prompt, "stream": True, "sampling_params": sampling_params(output_len)}
    sent, first = time.perf_counter(), None
    async with session.post(url + "/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and json.loads(line[6:]).get("output_ids"):
                first = time.perf_counter()
    return sent, first


async def run_client(url: str, prompts: list[str], output_len: int) -> list[tuple[float, float]]:
    """Send each prompt alone, streamed; (send time, first text event time) for each."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return [await stream_one(session, url, prompt, output_len) for prompt in prompts]


async def run_burst(url: str, prompts: list[str], output_len: int) -> tuple[float, list[tuple[float, float]]]:
    """Send every prompt at once, streamed; (burst start, [(send time, first text event time)])."""
    import asyncio

    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.perf_counter()
        return start, await asyncio.gather(*(stream_one(session, url, prompt, output_len) for prompt in prompts))


def run_in_process_burst(args: argparse.Namespace, trace_dir: Path, prompts: list[str]
                         ) -> tuple[float, list[tuple[float, float]]]:
    """The burst against an in-process ``Engine``, its points traced as the server's are."""
    import threading

    from plait.runtime.engine import Engine

    exec(SITECUSTOMIZE % {"points": TRACE_POINTS, "dir": str(trace_dir)}, {})  # noqa: S102 - our own hooks
    settings = {key: value for key, value in (("load_format", args.load_format),
                                              ("tokenizer_path", args.tokenizer)) if value}
    with Engine(model=args.model, **settings) as engine:
        time.sleep(1.0)  # the hooks patch from a thread: let it find the engine's classes

        def send(batch: list[str]) -> list[tuple[float, float]]:
            times: list[list] = [[0.0, None] for _ in batch]
            left, done = [len(batch)], threading.Event()

            def on_output(index: int, event: dict, slot: list) -> None:
                if slot[1] is None and event["output"]["meta_info"]["completion_tokens"] > 0:
                    slot[1] = time.perf_counter()
                if event["finished"]:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

            for prompt, slot in zip(batch, times):
                slot[0] = time.perf_counter()
                engine.submit(prompt, sampling_params(args.output_len), stream=True,
                              on_output=lambda i, e, slot=slot: on_output(i, e, slot))
            done.wait()
            return [tuple(slot) for slot in times]

        for prompt in prompts[: args.warmup]:
            send([prompt])
        start = time.perf_counter()
        return start, send(prompts[args.warmup:])


def summarize_burst(points: list[tuple[float, str]], start: float, sends: list[tuple[float, float]],
                    ) -> list[tuple[str, int, float, float, float]]:
    """Per point (in ``BURST_ORDER``): (label, times passed, first, median, last), ms after ``start``.

    Only points at or after ``start`` count (the warm-up requests ran before it)."""
    by_label: dict[str, list[float]] = {"client_send": [s for s, _ in sends],
                                        "client_first": [f for _, f in sends if f is not None]}
    for t, label in points:
        if t >= start:
            by_label.setdefault(label, []).append(t)
    rows = []
    for label in BURST_ORDER:
        times = sorted(by_label.get(label, ()))
        if times:
            ms = [1e3 * (t - start) for t in times]
            rows.append((label, len(ms), ms[0], ms[(len(ms) - 1) // 2], ms[-1]))
        else:
            rows.append((label, 0, float("nan"), float("nan"), float("nan")))
    return rows


def read_points(trace_dir: Path) -> tuple[list[tuple[float, str]], list[str]]:
    points, missing = [], []
    for path in trace_dir.glob("trace-*.txt"):
        for line in path.read_text().splitlines():
            label, t = line.rsplit(" ", 1)
            (missing.append(label) if label.startswith("missing:") else points.append((float(t), label)))
    return sorted(points), missing


def per_request(points: list[tuple[float, str]], sends: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Each request's first time at each label, from its send up to the next request's send."""
    out = []
    for i, (sent, first) in enumerate(sends):
        end = sends[i + 1][0] if i + 1 < len(sends) else float("inf")
        marks = {"client_send": sent, "client_first": first}
        for t, label in points:
            if sent <= t < end:
                marks.setdefault(label, t)
        out.append(marks)
    return out


def summarize(requests: list[dict[str, float]]) -> list[tuple[str, float, float, int]]:
    rows = []
    for name, start, end in HOPS:
        gaps = [1e3 * (r[end] - r[start]) for r in requests if r.get(start) is not None and r.get(end) is not None]
        if gaps:
            gaps.sort()
            rows.append((name, statistics.median(gaps), gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))], len(gaps)))
        else:
            rows.append((name, float("nan"), float("nan"), 0))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (config-only presets need one)")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=2)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--burst", type=int, default=0,
                        help="send this many requests at once (after --warmup one at a time) instead of --requests "
                             "one at a time")
    parser.add_argument("--in-process", action="store_true",
                        help="with --burst: send it to an Engine in this process instead of plait serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--json", default=None, help="write the per-hop figures here")
    args = parser.parse_args(argv)

    import asyncio

    trace_dir = Path(tempfile.mkdtemp(prefix="plait-ttft-trace-"))
    if args.in_process:
        if not args.burst:
            parser.error("--in-process needs --burst N")
        prompts = make_prompts(args, args.tokenizer)
        burst_start, sends = run_in_process_burst(args, trace_dir, prompts)
        points, missing = read_points(trace_dir)
        return report_burst(args, summarize_burst(points, burst_start, sends), missing,
                            step_times(points, burst_start))
    site = trace_dir / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE % {"points": TRACE_POINTS, "dir": str(trace_dir)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    port = free_port()
    command = [sys.executable, "-m", "plait.cli", "serve", "--model", args.model, "--port", str(port)]
    if args.load_format:
        command += ["--load-format", args.load_format]
    if args.tokenizer:
        command += ["--tokenizer-path", args.tokenizer]
    command += serve_args
    log = open(trace_dir / "server.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, args.start_timeout)
        prompts = make_prompts(args, args.tokenizer)
        for path in trace_dir.glob("trace-*.txt"):  # start-up's points (the warm-up steps) are not requests
            path.write_text("")
        if args.burst:
            asyncio.run(run_client(url, prompts[: args.warmup], args.output_len))
            burst_start, sends = asyncio.run(run_burst(url, prompts[args.warmup:], args.output_len))
        else:
            sends = asyncio.run(run_client(url, prompts, args.output_len))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    points, missing = read_points(trace_dir)
    if args.burst:
        return report_burst(args, summarize_burst(points, burst_start, sends), missing,
                            step_times(points, burst_start))
    requests = per_request(points, sends)[args.warmup:]
    rows = summarize(requests)
    print(f"plait serve --model {args.model}: {len(requests)} streamed requests one at a time, "
          f"{args.input_len} prompt tokens; times in ms")
    print(f"{'hop':<48} {'median':>8} {'p90':>8} {'n':>5}")
    for name, median, p90, n in rows:
        print(f"{name:<48} {median:8.3f} {p90:8.3f} {n:5d}")
    if missing:
        print("hooks not found (renamed?):", ", ".join(sorted(set(missing))))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "input_len": args.input_len,
                                               "requests": len(requests), "missing": sorted(set(missing)),
                                               "hops": [dict(zip(("hop", "median_ms", "p90_ms", "n"), r))
                                                        for r in rows]}, indent=1))


def make_prompts(args: argparse.Namespace, tokenizer_dir: str | None) -> list[str]:
    """``--warmup`` + (``--burst`` or ``--requests``) prompts of ``--input-len`` random token ids, as text."""
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        from plait.runtime.models.registry import ensure_preset_dir

        tokenizer_dir = str(ensure_preset_dir(args.model))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(args.seed)
    vocab = tokenizer.vocab_size
    count = args.burst if args.burst else args.requests
    return [tokenizer.decode([rng.randrange(100, vocab - 100) for _ in range(args.input_len)])
            for _ in range(count + args.warmup)]


def report_burst(args: argparse.Namespace, rows: list[tuple[str, int, float, float, float]],
                 missing: list[str], steps: list[float]) -> None:
    where = "an in-process Engine" if args.in_process else "plait serve"
    print(f"{where} --model {args.model}: a burst of {args.burst} streamed requests sent at once, "
          f"{args.input_len} prompt tokens; ms after the burst's send")
    print(f"{'point':<22} {'passed':>6} {'first':>9} {'median':>9} {'last':>9}")
    for label, n, first, median, last in rows:
        print(f"{label:<22} {n:6d} {first:9.2f} {median:9.2f} {last:9.2f}")
    if steps:
        print(f"engine steps: {len(steps)}, {sum(steps):.1f} ms in all, median {statistics.median(steps):.2f} ms, "
              f"longest {max(steps):.2f} ms")
    if missing:
        print("hooks not found (renamed?):", ", ".join(sorted(set(missing))))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "input_len": args.input_len, "burst": args.burst, "in_process": args.in_process,
            "missing": sorted(set(missing)), "step_ms": steps,
            "points": [dict(zip(("point", "passed", "first_ms", "median_ms", "last_ms"), r)) for r in rows]},
            indent=1))


if __name__ == "__main__":
    main()
