"""One serving measurement, start to finish, into one folder: ``plait serve`` measured over HTTP by the
streaming client (``benchmarks/serving.py``), then the same workload on the in-process ``Engine`` with the
same engine settings, and a comparison of the two.

    python benchmarks/serving_run.py --model llama-3.1-8b --load-format dummy --dataset random \\
        --random-input-len 256 --random-output-len 256 --num-prompts 1000 \\
        --concurrency-sweep 1,8,32,64,128,256 --out results/llama8b \\
        --serve-arg --max-running-requests=256 --tokenizer DIR --plot
    python benchmarks/serving_run.py --model smollm2-135m-instruct --num-prompts 20 \\
        --random-input-len 64 --random-output-len 16 --concurrency-sweep 1,4 \\
        --engine-arg max_total_tokens=10240 --out results/cpu

Steps:

1. ``plait serve`` starts as a subprocess on a free loopback port (its output in ``OUT/server.log``); once
   ``GET /health`` answers 200 the client runs the workload (native ``/generate`` protocol, results in
   ``OUT/http``: one JSON per point and ``sweep.json``). The server is then stopped (SIGTERM, SIGKILL to its
   process group after ``--stop-timeout``), whatever happened, Ctrl-C included.
2. Once the server and its engine process are gone (so the GPU memory is free), this process builds
   ``Engine(model, load_format=..., **same settings)`` and runs the same workload at every point: the same
   prompts and sampling parameters (``max_new_tokens``, ``ignore_eos``, ``json_schema``, greedy), the same
   arrival process (all at once for a concurrency sweep; Poisson at the rate, from the client's seed, for
   a rate sweep), at most ``C`` requests in flight (the next one is submitted when one finishes), with the
   requests streamed and measured as the client measures them (TTFT: the first event that brings output
   tokens; E2E: the final event; the client's own ``summarize``). Results in ``OUT/engine``.
3. ``OUT/summary.json`` and ``OUT/summary.md``: per point, the total token throughput of both sides and
   their ratio (target >= 0.95), TTFT median / p99 of both and the HTTP TTFT overhead; with the card, the
   date (UTC), the model and the engine settings. ``--plot`` adds the client's charts (``OUT/http``) and
   ``OUT/http_vs_in_process.png``.

Engine settings are given once: ``--engine-arg key=value`` (an ``EngineConfig`` field; repeatable) becomes
``plait serve --key-with-dashes value`` (booleans: ``--key`` / ``--no-key``) and the same typed value for the
in-process engine, read back through ``plait serve``'s own parser. ``--serve-arg ARG`` (repeatable) goes to
``plait serve`` as given; the engine settings among them are applied in-process too, so both sides always
run one configuration. ``--tokenizer DIR`` makes the prompts from random token ids (as the client does) and
is the engine's ``tokenizer_path`` on both sides (config-only presets such as ``llama-3.1-8b`` have no
tokenizer of their own) unless an engine setting names another.

Every option this script does not define is a workload option of ``benchmarks/serving.py`` (``--dataset``,
``--num-prompts``, ``--random-input-len``, ``--concurrency-sweep``, ``--rate-sweep``, ``--seed``, ...);
with ``--flush-cache`` the server's and the in-process engine's prefix caches are emptied before each point.

What the in-process run mirrors and what it cannot:

- Prompts are always text: the client's ``--tokenizer`` prompts are random token ids decoded to text, and
  both sides tokenize that text (the server with special tokens, as ``Engine`` does).
- Multi-turn conversations run their turns in order, each turn's prompt holding the earlier turns and the
  outputs that *this* side produced (greedy decoding makes them equal unless batching changes numerics);
  a conversation stops at a failed turn, as in the client. A conversation's next turn queues behind the
  requests already waiting, as it does on the client's semaphore.
- Only the native protocol is compared (``--backend plait``): the OpenAI endpoints' chat templates and
  response formats have no in-process counterpart here.
- Schema-constrained requests are submitted without waiting for their grammar's compilation (as the
  server does); the grammar cache starts empty in both processes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx


def _load_serving():
    """``benchmarks/serving.py`` as a module (the copy already imported under the same name, if any)."""
    name = "benchmarks_serving"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


serving = _load_serving()

TARGET_RATIO = 0.95
# serving.py options this script sets itself (the server's address, the protocol and the output folder)
_RESERVED_CLIENT_OPTIONS = ("--base-url", "--backend", "--output-dir", "--output-file", "--plot-from", "--api-key")
_VALUE_OPTIONS = ("--serve-arg", "--engine-arg")


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(this script's options, the client's argv without the options this script sets). ``--serve-arg``
    and ``--engine-arg`` take values that start with a dash (``--serve-arg --max-running-requests=256``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    joined: list[str] = []
    i = 0
    while i < len(argv):  # "--serve-arg X" -> "--serve-arg=X": argparse refuses a value that looks like an option
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other options are the client's (benchmarks/serving.py --help).")
    p.add_argument("--model", default="smollm2-135m-instruct", help="preset name, Hugging Face directory or .gguf")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--out", required=True, help="folder for everything this run writes")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an EngineConfig setting for both the server and the in-process engine (repeatable)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an argument for `plait serve`, as given (repeatable)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer dir: prompts from random token ids, and the engines' tokenizer_path")
    p.add_argument("--plot", action="store_true", help="draw the client's charts and the comparison chart")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health (default 900)")
    p.add_argument("--stop-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for the server before it is killed (default 60)")
    args, client_argv = p.parse_known_args(joined)
    for option in client_argv:
        if option.split("=", 1)[0] in _RESERVED_CLIENT_OPTIONS:
            p.error(f"{option.split('=', 1)[0]} is set by this script")
    return args, client_argv


def _engine_fields() -> dict[str, str]:
    """EngineConfig's settings: name -> type (as written in the dataclass)."""
    import dataclasses

    from plait.runtime.config import EngineConfig

    return {spec.name: str(spec.type) for spec in dataclasses.fields(EngineConfig)}


def engine_arg_flags(engine_args: list[str]) -> list[str]:
    """``plait serve`` flags of ``--engine-arg key=value`` items: ``--key-with-dashes value``, booleans
    as ``--key`` / ``--no-key``. Unknown keys, ``model`` and malformed items raise ValueError."""
    fields = _engine_fields()
    flags: list[str] = []
    for item in engine_args:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--engine-arg {item!r}: expected KEY=VALUE")
        if key == "model" or key not in fields:
            raise ValueError(f"--engine-arg {item!r}: not an engine setting (use --model for the model); "
                             f"known: {sorted(k for k in fields if k != 'model')}")
        flag = "--" + key.replace("_", "-")
        if "bool" in fields[key]:
            truth = value.strip().lower()
            if truth not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(f"--engine-arg {item!r}: a boolean setting takes true or false")
            flags.append(flag if truth in ("true", "1", "yes", "on") else "--no-" + flag[2:])
        else:
            flags.append(f"{flag}={value}")
    return flags


def serve_flags(args: argparse.Namespace) -> list[str]:
    """Everything ``plait serve`` gets after ``--model`` / ``--host`` / ``--port``: the load format, the
    tokenizer (unless an engine setting names one), the engine settings, then ``--serve-arg`` as given
    (the last of repeated flags wins, on both sides)."""
    flags = ["--load-format", args.load_format]
    explicit = engine_arg_flags(args.engine_arg)
    names_tokenizer = any(a.startswith("--tokenizer-path") for a in explicit + args.serve_arg)
    if args.tokenizer and not names_tokenizer:
        flags += ["--tokenizer-path", args.tokenizer]
    return flags + explicit + list(args.serve_arg)


def engine_settings(model: str, flags: list[str]) -> dict[str, Any]:
    """The typed engine settings ``plait serve --model MODEL *flags`` would run with, read by its own
    parser (so the in-process engine gets exactly the server's). A bad flag exits like the CLI does."""
    from plait import cli

    return cli.engine_settings(cli.build_parser().parse_args(["serve", "--model", model, *flags]))


def client_argv(args: argparse.Namespace, workload_argv: list[str], base_url: str, http_dir: Path) -> list[str]:
    """The client's command line: the workload options plus the server, protocol and output folder."""
    argv = [*workload_argv, "--base-url", base_url, "--backend", "plait", "--output-dir", str(http_dir)]
    if args.tokenizer:
        argv += ["--tokenizer", args.tokenizer]
    if args.plot:
        argv.append("--plot")
    return argv


# ------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerStartError(RuntimeError):
    """``plait serve`` exited or did not answer ``/health`` in time (the message ends with its log's tail)."""


class Server:
    """``plait serve`` as a subprocess in its own process group, its output in ``log_path``."""

    def __init__(self, model: str, flags: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "plait.cli", "serve", "--model", model, "--host", "127.0.0.1",
                        "--port", str(self.port), *flags]
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._log.write("$ " + " ".join(self.command) + "\n")
        self._log.flush()
        # its own session: Ctrl-C reaches only this process, which then stops the server in order
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        """Return once ``/health`` answers 200; ServerStartError (with the log's tail) if the server exits
        or does not come up within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"plait serve exited with status {self.process.returncode} before it was "
                                   f"ready; the end of {self.log_path}:\n{_tail(self.log_path)}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerStartError(f"plait serve did not answer /health within {timeout:g} s; the end of "
                           f"{self.log_path}:\n{_tail(self.log_path)}")

    def _group_alive(self) -> bool:
        """Whether any process of the server's group (the HTTP process, its engine process) is left."""
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (the server drains and stops its engine), SIGKILL to the whole group after ``timeout``
        seconds; returns once none of its processes is left. Safe to call twice."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive() or self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            while self._group_alive() and time.monotonic() < deadline + 30:
                time.sleep(0.1)
        if not self._log.closed:
            self._log.close()
        return self.process.returncode


# ------------------------------------------------------------------------------------------ in-process
class _Tracker:
    """One in-process request: measures its stream as the client measures an SSE stream."""

    def __init__(self, conv: int, turn: int, constrained: bool, done: queue.Queue, start: float):
        """``start``: when the request could go (``time.perf_counter``): its TTFT and latency count from it."""
        self.conv, self.turn, self.done = conv, turn, done
        self.result = serving.Result(constrained=constrained)
        self.start = self.last = start
        self.tokens_seen = 0
        self.finished = False

    def on_output(self, _index: int, event: dict) -> None:
        """An engine event (engine thread): the client's TTFT / ITL rules on cumulative token counts."""
        now = time.perf_counter()
        output, result = event["output"], self.result
        meta = output["meta_info"]
        result.prompt_tokens, result.completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
        new_tokens, self.tokens_seen = result.completion_tokens - self.tokens_seen, result.completion_tokens
        if new_tokens > 0:
            if result.events == 0:
                result.ttft = now - self.start
            else:
                result.itl.extend([(now - self.last) / new_tokens] * new_tokens)
            result.events, self.last = result.events + 1, now
        if event["finished"]:
            reason = meta.get("finish_reason") or {}
            if reason.get("type") == "abort":
                result.error = f"aborted: {reason.get('message', '')}"[:300]
            self._finish(now, output.get("text", ""))

    def on_admitted(self, error: Exception | None) -> None:
        """The grammar compiled (None) or the request cannot be served (its error)."""
        if error is not None:
            self.fail(f"{type(error).__name__}: {error}")

    def fail(self, message: str) -> None:
        """The request was refused before it produced anything."""
        self.result.error = message[:300]
        self._finish(time.perf_counter(), "")

    def _finish(self, now: float, text: str) -> None:
        if self.finished:
            return
        self.finished = True
        result = self.result
        result.e2e = now - self.start
        result.ok = result.completion_tokens > 0 and not result.error
        if not result.ok and not result.error:
            result.error = "no tokens reported"
        self.done.put((self, text))


def arrival_times(point_args: argparse.Namespace, count: int) -> list[float]:
    """When each conversation arrives (s after the start), as the client's ``run_point`` spaces them:
    all at 0 for an infinite rate, else Poisson gaps from ``Random(seed + 1)``."""
    if point_args.request_rate == float("inf"):
        return [0.0] * count
    rng, times, now = random.Random(point_args.seed + 1), [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(point_args.request_rate)
    return times


def run_engine_point(engine: Any, point_args: argparse.Namespace,
                     dataset: list) -> tuple[list, float]:
    """Run the workload once on ``engine`` at the point's rate and concurrency cap; (results, seconds).

    Requests are submitted from this thread; the engine's callbacks only record and hand finished requests
    back through a queue. A conversation's next turn is queued when its previous turn finished well.

    A request's times count from when it could go (it had arrived and a concurrency slot was free), as
    the HTTP client's count from its send: requests that become ready together (a burst) share that
    start, so the in-process TTFT includes waiting for the earlier ones' ``submit`` (tokenizing) on this
    thread, as the HTTP TTFT includes the server's tokenizing."""
    ignore_eos = not point_args.disable_ignore_eos
    cap = point_args.max_concurrency or None
    arrivals = arrival_times(point_args, len(dataset))
    histories: list[list[dict[str, str]]] = [[] for _ in dataset]
    done: queue.Queue = queue.Queue()
    ready: deque[tuple[int, int]] = deque()
    results: list = []
    in_flight = arrived = 0

    def submit(conv_index: int, turn_index: int, ready_at: float) -> None:
        conv = dataset[conv_index]
        turn = conv.turns[turn_index]
        _, body = serving.build_request("plait", None, conv.system, histories[conv_index], turn, ignore_eos)
        tracker = _Tracker(conv_index, turn_index, turn.schema_name is not None, done, ready_at)
        try:
            engine.submit(body["text"], dict(body["sampling_params"]), on_output=tracker.on_output,
                          on_admitted=tracker.on_admitted, stream=True)
        except (ValueError, TypeError, RuntimeError) as exc:
            tracker.fail(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    while True:
        now = time.perf_counter()
        while arrived < len(dataset) and arrivals[arrived] <= now - start:
            ready.append((arrived, 0))
            arrived += 1
        while ready and (cap is None or in_flight < cap):
            submit(*ready.popleft(), ready_at=now)
            in_flight += 1
        if in_flight == 0 and not ready and arrived == len(dataset):
            break
        timeout = None if arrived == len(dataset) else max(0.0, arrivals[arrived] - (time.perf_counter() - start))
        try:
            tracker, text = done.get(timeout=timeout)
        except queue.Empty:
            continue
        in_flight -= 1
        results.append(tracker.result)
        conv = dataset[tracker.conv]
        if tracker.result.ok and tracker.turn + 1 < len(conv.turns):
            histories[tracker.conv] += [{"role": "user", "content": conv.turns[tracker.turn].prompt},
                                        {"role": "assistant", "content": text}]
            ready.append((tracker.conv, tracker.turn + 1))
    return results, time.perf_counter() - start


def device_name(engine: Any) -> str:
    """The card's name, or "CPU"."""
    device = engine.runner.device
    if device.type != "cuda":
        return "CPU"
    import torch

    return torch.cuda.get_device_name(device)


def run_in_process(model: str, settings: dict[str, Any], client_args: argparse.Namespace,
                   engine_dir: Path) -> tuple[list[dict], str]:
    """Every sweep point on an in-process engine; writes ``engine_dir/<point>.json`` and ``sweep.json``
    and returns (the point records, the device name)."""
    from plait.runtime.engine import Engine

    dataset = serving.build_dataset(client_args)
    engine_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with Engine(model=model, **settings) as engine:
        device = device_name(engine)
        for label, point_args in serving.sweep_points(client_args):
            print(f"in-process: {label} ...", flush=True)
            if client_args.flush_cache and not engine.flush_cache():
                raise RuntimeError("--flush-cache: the in-process engine did not flush (requests in flight)")
            results, duration = run_engine_point(engine, point_args, dataset)
            summary = {**serving.summarize(point_args, results, duration), "backend": "in-process"}
            serving.print_summary(summary)
            record = {"label": label, **summary, "requests": [r.record() for r in results]}
            records.append(record)
            serving._write_json(engine_dir / f"{label.replace(' ', '-')}.json",
                                {**record, "engine_settings": settings, "model": model})
    serving._write_json(engine_dir / "sweep.json", {**serving.sweep_document(client_args, records),
                                                    "engine_settings": settings, "model": model})
    return records, device


# ------------------------------------------------------------------------------------------ summary
def compare_points(http_points: list[dict], engine_points: list[dict]) -> list[dict]:
    """One row per point (matched by label, in the HTTP order): throughputs, their ratio and TTFTs."""
    by_label = {point["label"]: point for point in engine_points}
    rows = []
    for http in http_points:
        local = by_label.get(http["label"])
        if local is None:
            continue
        ratio = http["total_throughput"] / local["total_throughput"] if local["total_throughput"] else 0.0
        rows.append({
            "label": http["label"],
            "http_completed": http["completed"], "in_process_completed": local["completed"],
            "http_output_tokens": http["total_output_tokens"], "in_process_output_tokens": local["total_output_tokens"],
            "http_total_tok_s": http["total_throughput"], "in_process_total_tok_s": local["total_throughput"],
            "ratio": ratio, "meets_target": ratio >= TARGET_RATIO,
            "http_ttft_median_ms": http["median_ttft_ms"], "http_ttft_p99_ms": http["p99_ttft_ms"],
            "in_process_ttft_median_ms": local["median_ttft_ms"], "in_process_ttft_p99_ms": local["p99_ttft_ms"],
            "ttft_overhead_ms": http["median_ttft_ms"] - local["median_ttft_ms"],
        })
    return rows


def render_markdown(meta: dict, rows: list[dict]) -> str:
    """``summary.md``: what ran where, then one table line per point."""
    settings = ", ".join(f"{k}={v}" for k, v in sorted(meta["engine_settings"].items())) or "(defaults)"
    lines = [
        "# plait serve over HTTP vs the in-process engine", "",
        f"- card: {meta['device']}", f"- date (UTC): {meta['date_utc']}", f"- model: {meta['model']}",
        f"- engine settings: {settings}", f"- workload: {meta['workload']}",
        f"- target: HTTP / in-process total tok/s >= {TARGET_RATIO}", "",
        "| point | ok HTTP / in-proc | HTTP tot tok/s | in-proc tot tok/s | ratio | HTTP TTFT med / p99 (ms) "
        "| in-proc TTFT med / p99 (ms) | TTFT overhead (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r["meets_target"] else " (below)"
        lines.append(
            f"| {r['label']} | {r['http_completed']} / {r['in_process_completed']} | {r['http_total_tok_s']:.1f} "
            f"| {r['in_process_total_tok_s']:.1f} | {r['ratio']:.3f}{flag} "
            f"| {r['http_ttft_median_ms']:.1f} / {r['http_ttft_p99_ms']:.1f} "
            f"| {r['in_process_ttft_median_ms']:.1f} / {r['in_process_ttft_p99_ms']:.1f} "
            f"| {r['ttft_overhead_ms']:+.1f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], path: Path) -> Path:
    """A small bar chart: total tok/s over HTTP and in-process, per point."""
    plt = serving._pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [r["http_total_tok_s"] for r in rows], width, label="HTTP")
    ax.bar([x + width / 2 for x in xs], [r["in_process_total_tok_s"] for r in rows], width, label="in-process")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ratio']:.2f}", (x, max(r["http_total_tok_s"], r["in_process_total_tok_s"])),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["label"] for r in rows], fontsize=8)
    ax.set(title="Total token throughput: HTTP vs in-process (labels: ratio)", ylabel="tokens/s")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _workload_line(client_args: argparse.Namespace) -> str:
    """A one-line description of the workload."""
    parts = [f"dataset={client_args.dataset}", f"prompts={serving.default_num_prompts(client_args)}"]
    if client_args.dataset in ("random", "shared-prefix", "multi-turn", "structured"):
        parts += [f"input={client_args.random_input_len}", f"output={client_args.random_output_len}",
                  f"range_ratio={client_args.random_range_ratio:g}"]
    if client_args.concurrency_sweep:
        parts.append("concurrency=" + ",".join(map(str, client_args.concurrency_sweep)))
    elif client_args.rate_sweep:
        parts.append("rate=" + ",".join(f"{r:g}" for r in client_args.rate_sweep))
    else:
        parts += [f"rate={client_args.request_rate:g}", f"max_concurrency={client_args.max_concurrency}"]
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run the server measurement, then the in-process one, then write and print the comparison."""
    args, workload_argv = parse_args(argv)
    try:
        flags = serve_flags(args)
    except ValueError as exc:
        print(f"serving_run: error: {exc}", file=sys.stderr)
        return 2
    settings = engine_settings(args.model, flags)  # bad flags stop here, before anything starts
    out = Path(args.out)
    http_dir, engine_dir = out / "http", out / "engine"
    out.mkdir(parents=True, exist_ok=True)
    # the workload's own checks (and the client's plotting dependency) before the server starts
    client_args = serving.parse_args(client_argv(args, workload_argv, "http://127.0.0.1:0", http_dir))
    if client_args.plot:
        serving._pyplot()

    server = Server(args.model, flags, out / "server.log")
    print(f"plait serve on {server.url} (log: {server.log_path})", flush=True)
    try:
        server.wait_ready(args.startup_timeout)
        status = serving.main(client_argv(args, workload_argv, server.url, http_dir))
    except ServerStartError as exc:
        print(f"serving_run: error: {exc}", file=sys.stderr)
        return 1
    finally:
        code = server.stop(args.stop_timeout)
        print(f"plait serve stopped (exit status {code})", flush=True)
    if status != 0:
        print("serving_run: some HTTP point completed no request; the in-process run goes on", file=sys.stderr)

    engine_records, device = run_in_process(args.model, settings, client_args, engine_dir)
    http_points = json.loads((http_dir / "sweep.json").read_text(encoding="utf-8"))["points"]
    rows = compare_points(http_points, engine_records)
    meta = {"device": device, "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "model": args.model, "engine_settings": settings, "serve_flags": flags,
            "workload": _workload_line(client_args), "client_args": vars(client_args)}
    serving._write_json(out / "summary.json", {**meta, "target_ratio": TARGET_RATIO, "points": rows})
    markdown = render_markdown(meta, rows)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    if args.plot and rows:
        print("wrote", plot_comparison(rows, out / "http_vs_in_process.png"))
    print(markdown)
    ok = all(r["http_completed"] and r["in_process_completed"] for r in rows) and len(rows) == len(http_points)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
