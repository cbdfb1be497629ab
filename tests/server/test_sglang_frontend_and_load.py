"""The unmodified SGLang frontend against ``plait serve``, a bounded load test, and SIGTERM draining.

SGLang's own frontend programs (``sglang.test.test_programs`` of the installed sglang, 0.5.23) and
plait's checks of the frontend run in subprocesses (``sglang_frontend_programs.py``): importing sglang
patches transformers process-wide. The server runs with ``--strict-fields``, so the frontend passing
also shows that it sends no field plait does not know. The server is stopped by the last test of this
module (SIGTERM with requests in flight).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.server_helpers import assert_idle_and_flushed, start_server
from tests.server.sglang_frontend_programs import PLAIT_CHECKS, SGLANG_NOT_RUN, SGLANG_PROGRAMS

pytestmark = pytest.mark.model
SGLANG_VERSION = "0.5.23"
REPO = Path(__file__).resolve().parents[2]
PROGRAMS = [f"sglang:{n}" for n in SGLANG_PROGRAMS] + [f"plait:{n}" for n in PLAIT_CHECKS]


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    server = start_server("--strict-fields")
    yield server
    server.stop()


def _sglang_installed() -> str | None:
    """Why the frontend tests cannot run, or None."""
    if importlib.util.find_spec("sglang") is None:
        return f"sglang is not installed (pip install --no-deps sglang=={SGLANG_VERSION}; see README)"
    version = importlib.metadata.version("sglang")
    if version != SGLANG_VERSION:
        return f"sglang {version} is installed; these tests run the {SGLANG_VERSION} frontend"
    return None


@pytest.fixture(scope="module")
def frontend_results(server) -> dict[str, dict]:
    """Every program's result (and, under "programs", the list of SGLang's programs)."""
    reason = _sglang_installed()
    if reason:
        pytest.skip(reason)
    command = [sys.executable, "-m", "tests.server.sglang_frontend_programs", server.url, *PROGRAMS]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the frontend runner failed:\n{run.stderr[-3000:]}"
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {line.get("name", "programs"): line for line in lines}


def test_every_sglang_program_is_run_or_excused(frontend_results):
    """A program a newer sglang adds fails here until it is run or its reason is written down."""
    assert frontend_results["programs"]["programs"] == sorted(SGLANG_PROGRAMS + list(SGLANG_NOT_RUN))


@pytest.mark.parametrize("name", PROGRAMS)
def test_sglang_frontend_program(frontend_results, name):
    result = frontend_results[name]
    assert result["passed"], f"{name} failed after {result['seconds']} s:\n{result['error']}"


def test_strict_fields_refuses_unknown_fields(server):
    response = server.post("/generate", {"text": "x", "temprature": 0, "sampling_params": {"max_new_tokens": 1}})
    assert response.status_code == 400 and "'temprature'" in response.json()["error"]["message"]
    nested = server.post("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 1, "top_q": 1}})
    assert nested.status_code == 400 and "top_q" in nested.json()["error"]["message"]


async def _one_stream(client: httpx.AsyncClient, i: int, cancel: bool) -> str:
    body = {"text": f"Request {i}: tell me about the number {i * 7}.", "stream": True,
            "sampling_params": {"max_new_tokens": 8 + i % 9, "ignore_eos": True, "temperature": 0.7}}
    async with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        last, seen = None, 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            if line == "data: [DONE]":
                break
            last, seen = json.loads(line[5:]), seen + 1
            if cancel and seen == 2:
                return "cancelled"
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 8 + i % 9}
    assert last["meta_info"]["completion_tokens"] == 8 + i % 9
    return "completed"


def test_bounded_load_with_cancellations(server):
    count = 128  # concurrent streams on one server, a fifth of them cancelled after their second event
    rng = random.Random(0)
    cancel = [rng.random() < 0.2 for _ in range(count)]

    async def run() -> list:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=300) as client:
            return await asyncio.gather(*(_one_stream(client, i, cancel[i]) for i in range(count)))

    started = time.monotonic()
    outcomes = asyncio.run(run())
    assert outcomes == ["cancelled" if c else "completed" for c in cancel]
    assert time.monotonic() - started < 240
    assert_idle_and_flushed(server)
    assert server.get("/health_generate").status_code == 200


def test_zz_sigterm_drains_in_flight_requests(server):
    results: dict = {}

    def post(name: str, n: int) -> None:
        body = {"text": f"Story {name}:", "sampling_params": {"max_new_tokens": n, "ignore_eos": True}}
        results[name] = httpx.post(server.url + "/generate", json=body, timeout=120).json()

    def stream(n: int) -> None:
        body = {"text": "Stream:", "stream": True, "sampling_params": {"max_new_tokens": n, "ignore_eos": True}}
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        results["stream"] = lines

    threads = [threading.Thread(target=post, args=("a", 24)), threading.Thread(target=post, args=("b", 16)),
               threading.Thread(target=stream, args=(24,))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.stats()["running"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert results["a"]["meta_info"]["completion_tokens"] == 24 and results["b"]["meta_info"]["completion_tokens"] == 16
    assert results["stream"][-1] == "data: [DONE]"
    assert json.loads(results["stream"][-2][5:])["meta_info"]["finish_reason"]["type"] == "length"
    assert server.process.wait(60) == 0, server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
