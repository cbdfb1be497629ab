"""Tests for the serving benchmark client (``benchmarks/serving.py``), with no model and no GPU.

The workloads are checked on their own (counts, length bounds, the ShareGPT-like and prompt-class
distributions, where each protocol carries a JSON schema). The client runs against a fake streaming
server on loopback (FastAPI + uvicorn in a thread) that speaks the native ``/generate`` SSE protocol and
the OpenAI completions / chat completions streams, emits a fixed number of tokens with tiny sleeps, and
records the bodies it received and how many requests were in flight at each arrival.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import statistics
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tests.benchmark_scripts import load_benchmark
from tests.server.server_helpers import free_port

serving = load_benchmark("serving")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _sleep_at_least(seconds: float) -> None:
    """Sleep at least ``seconds`` of real time. uvicorn runs on uvloop where installed, whose timers count
    from the loop's cached clock (taken at the start of its iteration) and so can fire early by the time
    that iteration has already spent: one ``asyncio.sleep`` would let a client measure less than it."""
    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0:
        await asyncio.sleep(left)


class FakeServer:
    """Server-side state and behaviour of the fake: ``tokens`` tokens per request at most (fewer when the
    request asks for fewer), ``per_event`` tokens per native event, ``delay`` seconds before each event;
    every ``fail_every``-th request gets HTTP 500 and every ``garble_every``-th a malformed event."""

    def __init__(self) -> None:
        self.url = ""
        self.reset()

    def reset(self, tokens: int = 6, per_event: int = 1, delay: float = 0.003, fail_every: int = 0,
              garble_every: int = 0, metrics: bool = False) -> None:
        self.tokens, self.per_event, self.delay = tokens, per_event, delay
        self.fail_every, self.garble_every = fail_every, garble_every
        # /metrics as plait serves it (None: 404): a step per event, 3 budget searches per constrained request
        self.counters = {"engine_steps": 100.0, "engine_graph_steps": 40.0, "budget_searches": 7.0,
                         "budget_search_seconds": 1.5} if metrics else None
        self.bodies: list[tuple[str, dict]] = []
        self.flushes: list[int] = []  # requests served when each /flush_cache came
        self.refuse_flushes = 0  # the next /flush_cache calls answered 400 (requests in flight)
        self.concurrency_at_arrival: list[int] = []
        self.in_flight = 0

    async def serve(self, protocol: str, body: dict):
        self.bodies.append((protocol, body))
        index = len(self.bodies)
        if self.fail_every and index % self.fail_every == 0:
            return JSONResponse({"error": "injected failure"}, status_code=500)
        self.in_flight += 1
        self.concurrency_at_arrival.append(self.in_flight)
        return StreamingResponse(self._events(protocol, body, index), media_type="text/event-stream")

    async def _events(self, protocol: str, body: dict, index: int):
        try:
            if protocol == "native":
                prompt, cap = body["text"], body["sampling_params"]["max_new_tokens"]
            elif protocol == "completions":
                prompt, cap = body["prompt"], body["max_tokens"]
            else:
                prompt, cap = " ".join(m["content"] for m in body["messages"]), body["max_tokens"]
            n, prompt_tokens = min(cap, self.tokens), len(prompt.split())
            step = self.per_event if protocol == "native" else 1
            if protocol == "chat":
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for k in range(step, n + step, step):
                k = min(k, n)
                await _sleep_at_least(self.delay)
                if self.garble_every and index % self.garble_every == 0 and k > step:
                    yield "data: {not json\n\n"
                    return
                if self.counters is not None:
                    self.counters["engine_steps"] += 1
                    self.counters["engine_graph_steps"] += 1
                if protocol == "native":
                    yield _sse({"text": "tok " * k, "meta_info": {"prompt_tokens": prompt_tokens, "ttft": 0.001,
                                                                  "completion_tokens": k, "finish_reason": None}})
                elif protocol == "completions":
                    yield _sse({"choices": [{"index": 0, "text": "tok ", "finish_reason": None}]})
                else:
                    yield _sse({"choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
            if self.counters is not None and "json_schema" in body.get("sampling_params", {}):
                self.counters["budget_searches"] += 3
                self.counters["budget_search_seconds"] += 0.25
            if protocol == "native":  # the closing event repeats the text: no new token
                yield _sse({"text": "tok " * n, "meta_info": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                              "finish_reason": {"type": "length"}}})
            else:
                yield _sse({"choices": [{"index": 0, "delta": {}, "text": "", "finish_reason": "length"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield _sse({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                         "total_tokens": prompt_tokens + n}})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


def _app(state: FakeServer) -> FastAPI:
    app = FastAPI()

    @app.get("/metrics")
    async def metrics():
        if state.counters is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        lines = ["# HELP plait:engine_steps Engine steps.", "# TYPE plait:engine_steps gauge"]
        lines += [f"plait:{name} {value:g}" for name, value in state.counters.items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/flush_cache")
    async def flush_cache():
        if state.refuse_flushes:
            state.refuse_flushes -= 1
            return PlainTextResponse("Cache not flushed: requests are in flight; retry when idle.\n", status_code=400)
        state.flushes.append(len(state.bodies))
        return PlainTextResponse("Cache flushed.\n")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    for path, protocol in (("/generate", "native"), ("/v1/completions", "completions"),
                           ("/v1/chat/completions", "chat")):
        async def handler(request: Request, protocol: str = protocol):
            return await state.serve(protocol, await request.json())

        app.add_api_route(path, handler, methods=["POST"])
    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeServer()
    # proto IPPROTO_TCP, as uvicorn's own sockets have: asyncio sets TCP_NODELAY only on such sockets, and
    # without it Nagle's algorithm and delayed ACKs hold each stream's first event back by ~40 ms
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield state
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    return fake_server


def _args(*argv: str):
    return serving.parse_args(list(argv))


def _run(fake: FakeServer, tmp_path: Path, *argv: str) -> tuple[int, dict]:
    """Run the benchmark against the fake; (exit code, the --output-file summary)."""
    out = tmp_path / "summary.json"
    code = serving.main(["--base-url", fake.url, "--no-progress", "--output-file", str(out), *argv])
    return code, json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ workloads
def test_random_lengths_within_bounds():
    dataset = serving.build_dataset(_args("--num-prompts", "50", "--random-input-len", "100",
                                          "--random-output-len", "20", "--random-range-ratio", "0.5"))
    assert len(dataset) == 50
    for conv in dataset:
        (turn,) = conv.turns
        assert 50 <= turn.input_len <= 100 and 10 <= turn.output_len <= 20
        assert len(turn.prompt.split()) == int(turn.input_len * 0.75)
    assert len({c.turns[0].input_len for c in dataset}) > 10  # really drawn, not one value


def test_sharegpt_follows_sampling_rules_and_published_means():
    dataset = serving.build_dataset(_args("--dataset", "sharegpt", "--num-prompts", "3000"))
    assert len(dataset) == 3000
    ins = [c.turns[0].input_len for c in dataset]
    outs = [c.turns[0].output_len for c in dataset]
    assert min(ins) >= 4 and min(outs) >= 4 and max(ins) <= 1024
    assert max(i + o for i, o in zip(ins, outs)) <= 2048
    mean_in, mean_out = serving.SHAREGPT_MEANS
    assert abs(statistics.fmean(ins) - mean_in) / mean_in < 0.08
    assert abs(statistics.fmean(outs) - mean_out) / mean_out < 0.08
    assert statistics.median(ins) < 0.8 * statistics.fmean(ins)  # right-skewed, as the real set is
    assert max(ins) > 800 and min(ins) < 20


@pytest.mark.parametrize("name", list(serving.PROMPT_CLASSES))
def test_prompt_classes_use_gpustack_definitions(name):
    n_in, n_out, count = serving.PROMPT_CLASSES[name]
    assert serving.default_num_prompts(_args("--dataset", name)) == count
    dataset = serving.build_dataset(_args("--dataset", name, "--num-prompts", "3"))
    assert len(dataset) == 3
    for conv in dataset:
        (turn,) = conv.turns
        assert (turn.input_len, turn.output_len) == (n_in, n_out)
        assert len(turn.prompt.split()) == int(n_in * 0.75)


def test_prompt_class_definitions():
    assert serving.PROMPT_CLASSES == {"short": (128, 4, 1000), "medium": (2000, 100, 500),
                                      "long": (4000, 200, 500), "very-long": (32000, 100, 100)}
    assert len(serving.build_dataset(_args("--dataset", "short"))) == 1000


def test_shared_prefix_and_multi_turn_shapes():
    shared = serving.build_dataset(_args("--dataset", "shared-prefix", "--num-prompts", "8", "--num-groups", "2",
                                         "--shared-prefix-len", "40"))
    assert len(shared) == 8 and len({c.system for c in shared}) == 2
    assert all(c.system == shared[i % 2].system and len(c.system.split()) == 30 for i, c in enumerate(shared))
    multi = serving.build_dataset(_args("--dataset", "multi-turn", "--num-prompts", "8", "--turns", "4"))
    assert [len(c.turns) for c in multi] == [4, 4]


def test_structured_requests_carry_schema_per_backend():
    dataset = serving.build_dataset(_args("--dataset", "structured", "--num-prompts", "20",
                                          "--structured-ratio", "0.5", "--random-output-len", "48"))
    turns = [c.turns[0] for c in dataset]
    constrained = [t for t in turns if t.schema_name]
    assert len(constrained) == 10 and len({t.schema_name for t in constrained}) == len(serving.SCHEMAS)
    for turn in turns:
        schema = serving.SCHEMAS.get(turn.schema_name)
        _, native = serving.build_request("plait", None, "", [], turn)
        sampling = native["sampling_params"]
        assert sampling["max_new_tokens"] == turn.output_len
        for backend in ("openai", "openai-chat"):
            _, body = serving.build_request(backend, "m", "", [], turn)
            assert body["max_tokens"] == turn.output_len
            if schema:
                assert body["response_format"] == {"type": "json_schema",
                                                   "json_schema": {"name": turn.schema_name, "schema": schema}}
                assert "ignore_eos" not in body
            else:
                assert "response_format" not in body and body["ignore_eos"] is True
        if schema:
            assert json.loads(sampling["json_schema"]) == schema and "ignore_eos" not in sampling
        else:
            assert "json_schema" not in sampling and sampling["ignore_eos"] is True
    _, body = serving.build_request("plait", None, "", [], turns[0], ignore_eos=False)
    assert "ignore_eos" not in body["sampling_params"]


# ------------------------------------------------------------------------------------------ runs
def _max_per_point(values: list[int], size: int) -> list[int]:
    return [max(values[i:i + size]) for i in range(0, len(values), size)]


def _sweep(fake: FakeServer, tmp_path: Path, *argv: str) -> dict:
    """Run a sweep against the fake into ``tmp_path``; its sweep.json (the run must succeed)."""
    code = serving.main(["--base-url", fake.url, "--output-dir", str(tmp_path), "--no-progress", *argv])
    assert code == 0
    return json.loads((tmp_path / "sweep.json").read_text())


def test_concurrency_sweep_writes_points_and_respects_cap(fake, tmp_path):
    sweep = _sweep(fake, tmp_path, "--backend", "openai-chat", "--num-prompts", "8", "--random-input-len", "16",
                   "--random-output-len", "5", "--concurrency-sweep", "1,4")
    assert sweep["sweep"] == "concurrency" and sweep["args"]["num_prompts"] == 8
    assert [p["max_concurrency"] for p in sweep["points"]] == [1, 4]
    for cap in (1, 4):
        point = json.loads((tmp_path / f"concurrency-{cap}.json").read_text())
        assert point["completed"] == 8 and point["failed"] == 0 and point["errors"] == []
        assert point["total_output_tokens"] == 40 and point["total_input_tokens"] > 8 * 10
        assert point["request_throughput"] > 0 and point["output_throughput"] > 0
        assert point["median_ttft_ms"] > 0 and point["median_tpot_ms"] > 0 and point["p99_itl_ms"] > 0
        assert point["mean_tokens_per_event"] == 1.0
        assert len(point["requests"]) == 8 and all(r["ok"] and r["events"] == 5 for r in point["requests"])
        # the fake sleeps 3 ms before each of the 5 events: bounds no client can beat
        assert all(r["ttft_ms"] >= 3 and r["e2e_ms"] >= 15 for r in point["requests"])
    # the points ran one after the other: the first 8 arrivals are the cap-1 point, the next 8 the cap-4 one
    assert _max_per_point(fake.concurrency_at_arrival, 8) == [1, 4]
    assert all(p == "chat" and b["model"] == "fake-model" and b["ignore_eos"] for p, b in fake.bodies)
    # (no throughput ratio between the points: on a loaded 2-core machine a timed ratio fails at random;
    # the concurrency at arrival above is what shows the cap-4 point overlapping its requests)


def test_client_processes_split_a_point_and_merge_its_results(fake, tmp_path):
    # 10 requests at a cap of 5 over 2 worker processes (caps 3 + 2): every request is measured once, the
    # cap holds across the processes, and the merged point reports its processes and their busy share
    sweep = _sweep(fake, tmp_path, "--num-prompts", "10", "--random-input-len", "8", "--random-output-len", "4",
                   "--concurrency-sweep", "5,1", "--client-processes", "2")
    split, single = sweep["points"]
    assert split["client_processes"] == 2 and single["client_processes"] == 1  # a cap of 1 needs one process
    assert split["completed"] == 10 and split["total_output_tokens"] == 40 and len(split["requests"]) == 10
    assert all(r["ok"] and r["events"] == 4 and r["ttft_ms"] >= 3 for r in split["requests"])
    assert _max_per_point(fake.concurrency_at_arrival, 10) == [5, 1]
    assert 0 < split["client_cpu_busy"] <= 1.5 and split["duration_s"] >= 4 * 0.003 * 2  # two waves of 4 events


def test_shard_plan_splits_caps_and_rates():
    args = _args("--num-prompts", "10", "--client-processes", "4", "--max-concurrency", "6", "--request-rate", "8")
    plan = serving.shard_plan(args, 10)
    assert [cap for cap, _, _ in plan] == [2, 2, 1, 1] and all(rate == 2.0 for _, rate, _ in plan)
    assert sorted(i for _, _, part in plan for i in range(10)[part]) == list(range(10))
    assert len(serving.shard_plan(_args("--client-processes", "8", "--max-concurrency", "3"), 10)) == 3
    assert len(serving.shard_plan(_args("--client-processes", "8"), 2)) == 2  # no more than conversations


def test_one_client_process_unless_asked():
    # extra client processes on the server's host take its CPU (docs/server.md): one by default, as
    # SGLang's and vLLM's clients
    assert len(serving.shard_plan(_args("--num-prompts", "64", "--max-concurrency", "64"), 64)) == 1


def test_stream_parser_handles_events_split_and_joined_across_chunks():
    result = serving.Result()
    parser = serving._StreamParser("plait", result, start=0.0)
    events = b"".join(_sse({"text": "ab"[: i + 1], "meta_info": {"prompt_tokens": 3, "completion_tokens": i + 1}}).encode()
                      for i in range(2))
    parser.feed(events[:7], 1.0)  # part of the first event
    parser.feed(events[7:] + b"data: [DONE]", 2.0)  # the rest, the second event and an unterminated [DONE]
    parser.close(3.0)
    assert parser.text == "ab" and result.completion_tokens == 2 and result.events == 2
    assert result.ttft == 2.0 and result.itl == [0.0]  # both arrived in the chunk at t=2


def test_rate_sweep(fake, tmp_path):
    sweep = _sweep(fake, tmp_path, "--backend", "openai", "--num-prompts", "4", "--random-input-len", "8",
                   "--random-output-len", "3", "--rate-sweep", "100,400")
    assert sweep["sweep"] == "rate" and [p["request_rate"] for p in sweep["points"]] == [100.0, 400.0]
    assert all(p["completed"] == 4 and p["total_output_tokens"] == 12 for p in sweep["points"])
    assert (tmp_path / "rate-100.json").exists() and (tmp_path / "rate-400.json").exists()
    assert all(p == "completions" for p, _ in fake.bodies) and len(fake.bodies) == 8


def test_plot_and_replot(fake, tmp_path):
    code = serving.main(["--base-url", fake.url, "--num-prompts", "4", "--random-input-len", "8",
                         "--random-output-len", "3", "--concurrency-sweep", "1,2", "--output-dir", str(tmp_path),
                         "--plot", "--no-progress"])
    assert code == 0
    names = ["throughput_vs_concurrency.png", "ttft_vs_concurrency.png", "tpot_vs_concurrency.png",
             "throughput_vs_tpot.png", "cdf_ttft.png", "cdf_e2e.png"]
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and 2_000 < len(data) < 200_000
        (tmp_path / name).unlink()
    assert serving.main(["--plot-from", str(tmp_path / "sweep.json")]) == 0
    assert all((tmp_path / name).stat().st_size > 2_000 for name in names)


def test_structured_run_splits_constrained(fake, tmp_path):
    code, summary = _run(fake, tmp_path, "--dataset", "structured", "--num-prompts", "8",
                         "--random-input-len", "8", "--random-output-len", "4")
    assert code == 0 and summary["completed"] == 8
    assert summary["constrained"]["completed"] == 4 and summary["unconstrained"]["completed"] == 4
    assert summary["constrained"]["total_output_tokens"] == 16 and summary["constrained"]["output_throughput"] > 0
    schemas = [b["sampling_params"] for _, b in fake.bodies if "json_schema" in b["sampling_params"]]
    assert len(schemas) == 4 and not any("ignore_eos" in s for s in schemas)


def test_a_plait_servers_engine_counters_are_read_around_each_point(fake, tmp_path, capsys):
    """Against plait (its /metrics has the engine's counters) each point gets what the engine counted
    during it: steps, graph replays, budget steering's searches; a server without them gets none."""
    fake.reset(tokens=4, metrics=True)
    code, summary = _run(fake, tmp_path, "--dataset", "structured", "--num-prompts", "6",
                         "--random-input-len", "8", "--random-output-len", "4")
    assert code == 0 and summary["constrained"]["completed"] == 3
    assert summary["engine"] == {"engine_steps": 24.0, "engine_graph_steps": 24.0, "budget_searches": 9.0,
                                 "budget_search_seconds": 0.75}
    out = capsys.readouterr().out
    assert re.search(r"Budget searches per constrained request:\s+3\.00", out) and "Engine steps:" in out
    fake.reset(tokens=4)  # no /metrics
    code, summary = _run(fake, tmp_path, "--num-prompts", "2", "--random-output-len", "4")
    assert code == 0 and "engine" not in summary


def test_native_coalesced_events_count_itl_per_token(fake, tmp_path):
    fake.reset(tokens=8, per_event=2)
    code, summary = _run(fake, tmp_path, "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "8")
    assert code == 0 and summary["mean_tokens_per_event"] == 2.0 and summary["total_output_tokens"] == 24

    async def one():
        async with serving._session(_args()) as session:
            path, body = serving.build_request("plait", None, "", [], serving.Turn("a b c", 8, 3))
            return await serving.send(session, "plait", fake.url + path, body)

    result, text = asyncio.run(one())
    assert result.ok and result.events == 4 and text == "tok " * 8
    assert len(result.itl) == 6  # 3 events after the first, 2 tokens each; the closing event adds none
    assert all(math.isclose(result.itl[i], result.itl[i + 1]) for i in (0, 2, 4))  # one gap split per token


def test_engine_side_ttft_splits_the_client_ttft(fake, tmp_path):
    fake.reset(tokens=4, delay=0.02)  # the fake reports an engine TTFT of 1 ms; the first event comes after 20
    code, summary = _run(fake, tmp_path, "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "4")
    assert code == 0 and summary["median_server_ttft_ms"] == pytest.approx(1.0)
    assert summary["median_ttft_overhead_ms"] == pytest.approx(summary["median_ttft_ms"] - 1.0, abs=1.0)
    assert summary["median_ttft_overhead_ms"] > 15
    code, openai = _run(fake, tmp_path, "--backend", "openai-chat", "--num-prompts", "2", "--random-output-len", "4")
    assert code == 0 and "median_server_ttft_ms" not in openai  # only the native protocol reports it


def test_failures_are_counted_and_do_not_stop_the_run(fake, tmp_path):
    fake.reset(fail_every=4, garble_every=5)
    code, summary = _run(fake, tmp_path, "--num-prompts", "10", "--random-input-len", "8",
                         "--random-output-len", "4", "--max-concurrency", "1")
    assert code == 0
    assert summary["completed"] == 6 and summary["failed"] == 4
    errors = {e["error"].split(":")[0]: e["count"] for e in summary["errors"]}
    assert errors == {"HTTP 500": 2, "JSONDecodeError": 2}


def test_unreachable_server_fails_every_request(tmp_path):
    port = free_port()  # nothing listens there
    out = tmp_path / "summary.json"
    code = serving.main(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2", "--random-input-len", "4",
                         "--no-progress", "--output-file", str(out)])
    summary = json.loads(out.read_text())
    assert code == 1 and summary["completed"] == 0 and summary["failed"] == 2
    assert summary["errors"][0]["count"] == 2 and summary["errors"][0]["error"].startswith("ClientConnectorError")


def test_flush_cache_empties_the_servers_cache_before_each_point(fake, tmp_path):
    """``--flush-cache`` (SGLang's bench_serving option): a sweep re-sends its prompts, so each point
    starts with the server's prefix cache emptied; a server still busy (400) is asked again."""
    fake.reset(tokens=2)
    fake.refuse_flushes = 1
    code, summary = _run(fake, tmp_path, "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "2",
                         "--concurrency-sweep", "1,2", "--flush-cache")
    assert code == 0 and fake.flushes == [0, 4]  # before each point's requests
    fake.reset(tokens=2)
    code, _ = _run(fake, tmp_path, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2")
    assert code == 0 and fake.flushes == []


def test_flush_cache_against_a_server_without_it_is_an_error(fake, tmp_path):
    fake.reset(tokens=2)
    fake.refuse_flushes = 10**6

    async def flush() -> None:
        async with aiohttp.ClientSession() as session:
            await serving.flush_cache(session, fake.url, attempts=2)

    with pytest.raises(RuntimeError, match="flush_cache"):
        asyncio.run(flush())
