"""``plait serve --dp 2`` on the bundled model: the router in front of two real replicas.

One server for the module (two replicas start in parallel); greedy answers through the router equal
a replica's direct answer, on the native and the OpenAI API, streamed and not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from plait.cli import build_parser
from plait.router.launcher import replica_arguments, start_replicas, stop_replicas, wait_healthy
from tests.server.server_helpers import MODEL, free_port

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def dp_server():
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - read back on failure
    command = [sys.executable, "-m", "plait.cli", "serve", "--dp", "2", "--model", MODEL, "--port", str(port),
               "--max-total-tokens", "4096", "--router-health-check-interval", "0.5",
               # fewer processes per replica (no compile workers, no detokenizer process): a faster start
               "--grammar-compile-workers", "0", "--detokenizer", "engine"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, _output(log)
        assert time.monotonic() < deadline, _output(log)
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    replicas = httpx.get(url + "/list_workers").json()["urls"]
    yield url, replicas, process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def _output(log) -> str:
    log.seek(0)
    return log.read()


def test_native_generate_through_the_router_equals_a_direct_request(dp_server):
    url, replicas, _ = dp_server
    assert len(replicas) == 2 and all(r.startswith("http://127.0.0.1:") for r in replicas)
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
    routed = httpx.post(url + "/generate", json=body, timeout=60)
    assert routed.status_code == 200, routed.text
    direct = httpx.post(replicas[1] + "/generate", json=body, timeout=60).json()
    assert routed.json()["output_ids"] == direct["output_ids"] and routed.json()["text"] == direct["text"]
    streamed = httpx.post(url + "/generate", json={**body, "stream": True}, timeout=60)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == direct["text"]
    assert streamed.headers["content-type"].startswith("text/event-stream")


def test_openai_chat_through_the_router_equals_a_direct_request(dp_server):
    import openai

    url, replicas, _ = dp_server
    messages = [{"role": "user", "content": "Name a color."}]
    via_router = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    direct = openai.OpenAI(base_url=replicas[0] + "/v1", api_key="none", max_retries=0)
    routed = via_router.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    expected = direct.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    assert routed.choices[0].message.content == expected.choices[0].message.content
    chunks = via_router.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                                stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.choices[0].message.content
    assert [m.id for m in via_router.models.list().data] == [MODEL]


def test_metrics_and_sigterm_stop_everything(dp_server):
    url, replicas, process = dp_server
    text = httpx.get(url + "/metrics").text
    assert "plait_router:healthy_replicas 2" in text
    assert all(f'plait:engine_up{{replica="{r}"}} 1' in text for r in replicas)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    for replica in replicas:
        with pytest.raises(httpx.ConnectError):
            httpx.get(replica + "/health", timeout=2)


def test_replica_arguments_repeat_the_serve_flags_but_dp_host_and_port():
    parser = build_parser()
    args = parser.parse_args(["serve", "--dp", "2", "--port", "1", "--host", "0.0.0.0", "--max-total-tokens",
                              "4096", "--strict-fields", "--router-policy", "round_robin", "--api-key", "k"])
    arguments = replica_arguments(args, parser.subcommands.choices["serve"])
    assert arguments == ["--api-key", "k", "--strict-fields", "--max-total-tokens", "4096"]


def test_a_replica_that_fails_to_start_fails_the_command_with_its_message():
    replicas = start_replicas(2, ["--no-such-flag"], tp_size=1)
    try:
        with pytest.raises(ValueError, match="unrecognized arguments: --no-such-flag"):
            wait_healthy(replicas, None)
    finally:
        stop_replicas(replicas, 10)
    assert all(replica.process.poll() is not None for replica in replicas)
