"""Tests for the serving run (``benchmarks/serving_run.py``): how engine settings reach both sides, the
in-process dispatcher (on a fake engine), the summary from canned points, and one small end-to-end run
on the CPU with the bundled model (``plait serve`` over HTTP, then the in-process engine)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

serving_run = load_benchmark("serving_run")
serving = serving_run.serving

MODEL = "smollm2-135m-instruct"


# ------------------------------------------------------------------------------------------ arguments
def test_engine_args_become_serve_flags_and_the_same_typed_settings():
    flags = serving_run.engine_arg_flags(["max_total_tokens=10240", "disable-radix-cache=true",
                                          "enable_overlap=false", "dtype=float32", "mem_fraction=0.5"])
    assert flags == ["--max-total-tokens=10240", "--disable-radix-cache", "--no-enable-overlap",
                     "--dtype=float32", "--mem-fraction=0.5"]
    settings = serving_run.engine_settings(MODEL, flags)
    assert settings == {"max_total_tokens": 10240, "disable_radix_cache": True, "enable_overlap": False,
                        "dtype": "float32", "mem_fraction": 0.5}


@pytest.mark.parametrize("item", ["no_such_setting=1", "model=x", "max_total_tokens", "disable_radix_cache=maybe"])
def test_bad_engine_args_are_refused(item):
    with pytest.raises(ValueError, match="--engine-arg"):
        serving_run.engine_arg_flags([item])


def test_serve_args_pass_as_given_and_their_engine_settings_apply_in_process():
    args, workload = serving_run.parse_args([
        "--model", "llama-3.1-8b", "--load-format", "dummy", "--out", "x", "--dataset", "random",
        "--serve-arg", "--max-running-requests=256", "--serve-arg", "--log-level=info",
        "--engine-arg", "chunked_prefill_size=512", "--tokenizer", "tok", "--concurrency-sweep", "1,8"])
    assert workload == ["--dataset", "random", "--concurrency-sweep", "1,8"]
    flags = serving_run.serve_flags(args)
    assert flags == ["--load-format", "dummy", "--tokenizer-path", "tok", "--chunked-prefill-size=512",
                     "--max-running-requests=256", "--log-level=info"]
    assert serving_run.engine_settings(args.model, flags) == {
        "load_format": "dummy", "tokenizer_path": "tok", "chunked_prefill_size": 512, "max_running_requests": 256}
    client = serving_run.client_argv(args, workload, "http://127.0.0.1:1", Path("out/http"))
    assert client[-2:] == ["--tokenizer", "tok"] and "--backend" in client and "plait" in client


def test_an_explicit_tokenizer_path_wins_and_client_options_the_script_sets_are_refused():
    args, _ = serving_run.parse_args(["--out", "x", "--tokenizer", "a", "--engine-arg", "tokenizer_path=b"])
    assert "--tokenizer-path=b" in serving_run.serve_flags(args) and "a" not in serving_run.serve_flags(args)
    with pytest.raises(SystemExit):
        serving_run.parse_args(["--out", "x", "--base-url", "http://elsewhere"])


# ------------------------------------------------------------------------------------------ dispatcher
class FakeEngine:
    """Answers each request from a thread after a short delay: one event with one token, then a final one
    with ``max_new_tokens`` tokens. Records the prompts and the most requests in flight."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.prompts: list[str] = []
        self.params: list[dict] = []

    def submit(self, text, params, *, on_output, on_admitted, stream):
        assert stream
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.prompts.append(text)
            self.params.append(params)
            number = len(self.prompts)

        def answer():
            time.sleep(0.003)
            meta = {"prompt_tokens": 5, "completion_tokens": 1, "finish_reason": None}
            on_output(0, {"finished": False, "output": {"text": "a", "meta_info": meta}})
            time.sleep(0.003)
            with self.lock:
                self.in_flight -= 1
            final = {**meta, "completion_tokens": params["max_new_tokens"], "finish_reason": {"type": "length"}}
            on_output(0, {"finished": True, "output": {"text": f"OUT{number}", "meta_info": final}})

        on_admitted(None)
        threading.Thread(target=answer, daemon=True).start()
        return [str(number)]


def _client_args(*extra: str):
    return serving.parse_args(["--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "4",
                               *extra])


def test_in_process_point_keeps_the_cap_and_measures_like_the_client():
    args = _client_args("--dataset", "structured", "--structured-ratio", "0.5")
    engine = FakeEngine()
    point = serving._with(args, max_concurrency=3)
    results, duration = serving_run.run_engine_point(engine, point, serving.build_dataset(args))
    assert len(results) == 8 and all(r.ok for r in results) and duration > 0
    assert engine.most_in_flight <= 3
    assert all(0 < r.ttft < r.e2e and r.events == 2 for r in results)
    constrained = [p for p in engine.params if "json_schema" in p]
    assert len(constrained) == 4 and not any("ignore_eos" in p for p in constrained)
    assert sum(r.constrained for r in results) == 4


class SlowSubmitEngine(FakeEngine):
    """``submit`` itself takes 20 ms on the caller's thread (as tokenizing a long prompt does)."""

    def submit(self, text, params, **kwargs):
        time.sleep(0.02)
        return super().submit(text, params, **kwargs)


def test_a_burst_counts_every_requests_ttft_from_the_burst_not_from_its_own_submit():
    args = _client_args()  # 8 prompts at an infinite rate, no cap: one burst, as the client sends it
    results, _ = serving_run.run_engine_point(SlowSubmitEngine(), args, serving.build_dataset(args))
    ttfts = sorted(r.ttft for r in results)
    # the last request waited for 7 earlier submits (140 ms) before its own: that is part of its TTFT
    assert ttfts[-1] >= 0.14 + 0.02 and ttfts[0] < 0.1


def test_in_process_multi_turn_resends_the_history_with_the_engines_outputs():
    args = _client_args("--dataset", "multi-turn", "--turns", "2")
    engine = FakeEngine()
    dataset = serving.build_dataset(args)
    results, _ = serving_run.run_engine_point(engine, serving._with(args, max_concurrency=2), dataset)
    assert len(results) == 8
    second_turns = [p for p in engine.prompts if "\nassistant: OUT" in p]
    assert len(second_turns) == 4
    for conv in dataset:  # every second turn came after its first and holds its prompt
        first, second = conv.turns[0].prompt, conv.turns[1].prompt
        assert any(p.index(first) < p.index(second) for p in second_turns if first in p and second in p)


def test_rate_arrivals_follow_the_clients_seed():
    args = _client_args("--request-rate", "4")
    times = serving_run.arrival_times(args, 5)
    assert times[0] == 0.0 and times == sorted(times) and times[-1] > 0
    assert serving_run.arrival_times(_client_args(), 3) == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------ summary
def _point(label: str, tok_s: float, ttft_med: float, ttft_p99: float, completed: int = 10) -> dict:
    return {"label": label, "completed": completed, "total_output_tokens": 80, "total_throughput": tok_s,
            "median_ttft_ms": ttft_med, "p99_ttft_ms": ttft_p99}


def test_summary_table_from_canned_points(tmp_path):
    http = [_point("concurrency 1", 96.0, 12.0, 20.0), _point("concurrency 8", 700.0, 30.0, 55.0)]
    local = [_point("concurrency 8", 800.0, 25.0, 40.0), _point("concurrency 1", 100.0, 10.0, 15.0)]
    rows = serving_run.compare_points(http, local)
    assert [r["label"] for r in rows] == ["concurrency 1", "concurrency 8"]
    assert rows[0]["ratio"] == pytest.approx(0.96) and rows[0]["meets_target"]
    assert rows[1]["ratio"] == pytest.approx(0.875) and not rows[1]["meets_target"]
    assert rows[0]["ttft_overhead_ms"] == pytest.approx(2.0)
    meta = {"device": "CPU", "date_utc": "2026-01-01 00:00:00", "model": MODEL,
            "engine_settings": {"max_total_tokens": 10240}, "workload": "dataset=random"}
    markdown = serving_run.render_markdown(meta, rows)
    assert "card: CPU" in markdown and "max_total_tokens=10240" in markdown and "2026-01-01" in markdown
    assert "| concurrency 1 | 10 / 10 | 96.0 | 100.0 | 0.960 | 12.0 / 20.0 | 10.0 / 15.0 | +2.0 |" in markdown
    assert "0.875 (below)" in markdown
    pytest.importorskip("matplotlib")
    path = serving_run.plot_comparison(rows, tmp_path / "cmp.png")
    assert path.stat().st_size > 1000


# ------------------------------------------------------------------------------------------ end to end
def _processes_with(needle: str) -> list[int]:
    """Ids of live processes whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_end_to_end_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "run"
    status = serving_run.main([
        "--model", MODEL, "--out", str(out), "--engine-arg", "max_total_tokens=10240", "--no-progress",
        "--dataset", "random", "--num-prompts", "4", "--random-input-len", "32", "--random-output-len", "8",
        "--concurrency-sweep", "1,2", "--startup-timeout", "120", "--flush-cache"])
    printed = capsys.readouterr().out
    assert status == 0
    log = (out / "server.log").read_text()
    port = log.split("--port ", 1)[1].split()[0]
    assert "plait serve" in log
    # the server and its engine process are gone, and nothing listens on its port
    assert not _processes_with(f"--port {port} ")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(port))) != 0

    http = json.loads((out / "http" / "sweep.json").read_text())["points"]
    engine_files = sorted(p.name for p in (out / "engine").glob("concurrency-*.json"))
    assert engine_files == ["concurrency-1.json", "concurrency-2.json"]
    local = [json.loads((out / "engine" / name).read_text()) for name in engine_files]
    for h, e in zip(http, local):
        assert h["label"] == e["label"] and h["completed"] == e["completed"] == 4
        assert e["engine_settings"] == {"load_format": "auto", "max_total_tokens": 10240}
        assert [r["completion_tokens"] for r in e["requests"]] == [8] * 4
        assert h["total_output_tokens"] == e["total_output_tokens"] == 32
        assert h["total_input_tokens"] == e["total_input_tokens"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "CPU" and summary["model"] == MODEL
    assert [p["label"] for p in summary["points"]] == ["concurrency 1", "concurrency 2"]
    for point in summary["points"]:
        assert point["ratio"] > 0 and point["http_total_tok_s"] > 0 and point["in_process_total_tok_s"] > 0
        assert point["http_ttft_median_ms"] > 0 and point["in_process_ttft_median_ms"] > 0
        assert point["http_output_tokens"] == point["in_process_output_tokens"]
    markdown = (out / "summary.md").read_text()
    assert "| concurrency 2 | 4 / 4 |" in markdown and markdown in printed
