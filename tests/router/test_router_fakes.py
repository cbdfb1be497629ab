"""``plait router`` against fake replicas (tests/router/fakes.py): routing, pass-through, failures."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from plait.router.app import RouterConfig, create_app
from tests.router.fakes import FakeReplica, ServerThread, free_port

PREFIX_A = "You are a travel agent. Answer in one sentence. " * 3
PREFIX_B = "You are a chemistry tutor who explains with care. " * 3


@pytest.fixture(scope="module")
def replicas():
    fakes = [FakeReplica("r0").start(), FakeReplica("r1").start()]
    yield fakes
    for fake in fakes:
        fake.stop()


@pytest.fixture
def make_router(replicas):
    started = []

    def make(urls=None, **settings) -> ServerThread:
        for fake in replicas:
            fake.received.clear()
            fake.app.state.healthy = True
            fake.app.state.hold = None
        config = RouterConfig(replicas=tuple(urls or [f.url for f in replicas]), **settings)
        router = ServerThread(create_app(config)).start()
        started.append(router)
        return router

    yield make
    for router in started:
        router.stop()


def who(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["replica"]


def test_shared_prefixes_stay_on_one_replica(make_router):
    router = make_router()
    with httpx.Client(base_url=router.url) as client:
        got_a = [who(client.post("/generate", json={"text": PREFIX_A + f"question {i}"})) for i in range(4)]
        got_b = [who(client.post("/v1/completions", json={"prompt": PREFIX_B + f"q{i}"})) for i in range(4)]
        chat = [{"role": "system", "content": PREFIX_B}, {"role": "user", "content": "hi"}]
        got_chat = [who(client.post("/v1/chat/completions", json={"messages": chat + [
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": f"turn {i}"}]}))
            for i in range(3)]
    assert len(set(got_a)) == 1 and len(set(got_b)) == 1 and set(got_a) != set(got_b)
    assert len(set(got_chat)) == 1
    metrics = httpx.get(router.url + "/metrics").text
    assert 'plait_router:routing_decisions_total{decision="cache_hit"}' in metrics


def test_round_robin_ignores_prefixes(make_router):
    router = make_router(policy="round_robin")
    with httpx.Client(base_url=router.url) as client:
        got = [who(client.post("/generate", json={"text": PREFIX_A})) for _ in range(4)]
    assert got == ["r0", "r1", "r0", "r1"]


def test_imbalanced_load_goes_to_the_least_loaded_replica(make_router, replicas):
    router = make_router(balance_abs_threshold=2, balance_rel_threshold=1.0)
    hold = threading.Event()
    for fake in replicas:
        fake.app.state.hold = hold
    with concurrent.futures.ThreadPoolExecutor(8) as pool, httpx.Client(base_url=router.url, timeout=10) as client:
        futures = []
        for i in range(8):  # the same prefix: cache-aware alone would send all of them to one replica
            futures.append(pool.submit(client.post, "/generate", json={"text": PREFIX_A + str(i)}))
            deadline = time.monotonic() + 5
            while sum(len(f.received) for f in replicas) <= i and time.monotonic() < deadline:
                time.sleep(0.002)
        in_flight = client.get("/list_workers").json()["in_flight"]
        hold.set()
        got = [who(f.result()) for f in futures]
    assert got.count("r0") >= 3 and got.count("r1") >= 3, got
    assert max(in_flight.values()) - min(in_flight.values()) <= 3, in_flight
    assert 'decision="balance"' in httpx.get(router.url + "/metrics").text


def test_program_requests_stick_to_one_replica(make_router, replicas):
    router = make_router(policy="round_robin")
    with httpx.Client(base_url=router.url) as client:
        assert client.post("/begin_program", json={"program_id": "run-1"}).status_code == 200
        got = {who(client.post("/generate", json={"text": f"unrelated text {i}", "program_id": "run-1"}))
               for i in range(4)}
        got |= {who(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                               "program_id": "run-1"}))}
        sessions = {who(client.post("/generate", json={"text": f"s {i}", "session_id": "sess"})) for i in range(3)}
        assert client.post("/end_program", json={"program_id": "run-1"}).status_code == 200
        assert client.post("/end_program", json={}).status_code == 400
    assert len(got) == 1 and len(sessions) == 1
    (owner,) = [fake for fake in replicas if fake.name in got]
    assert owner.paths().count("/begin_program") == 1 and owner.paths().count("/end_program") == 1


def test_streams_pass_through_byte_for_byte(make_router, replicas):
    router = make_router(policy="round_robin")
    body = {"text": "stream me", "stream": True, "stream_events": 5}
    direct = httpx.post(replicas[0].url + "/generate", json=body)
    relayed = httpx.post(router.url + "/generate", json=body)  # round robin: r0 first
    assert relayed.status_code == 200 and relayed.content == direct.content
    assert relayed.headers["content-type"] == direct.headers["content-type"]
    assert relayed.content.endswith(b"data: [DONE]\n\n")


def test_status_headers_and_bodies_pass_through(make_router, replicas):
    router = make_router(api_key="router-key", replica_api_key="replica-key")
    auth = {"Authorization": "Bearer router-key"}
    answer = httpx.post(router.url + "/generate", json={"text": "hi"}, headers=auth)
    assert answer.headers["x-plait-ignored-fields"] == "junk" and answer.headers["content-type"] == "application/json"
    refused = httpx.post(router.url + "/generate", json={"text": "hi", "fail_status": 422}, headers=auth)
    assert refused.status_code == 422 and refused.json() == {"error": {"message": "refused"}}
    models = httpx.get(router.url + "/v1/models", headers=auth)
    assert models.status_code == 200 and models.json()["path"] == "/v1/models"
    sent = [headers for fake in replicas for _, _, headers in fake.received]
    assert sent and all(h["authorization"] == "Bearer replica-key" for h in sent)
    assert httpx.post(router.url + "/generate", json={"text": "hi"}).status_code == 401
    assert httpx.post(router.url + "/generate", json={"text": "hi"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(router.url + "/health").status_code == 200  # probes need no key


def test_bad_input_is_refused_at_the_router(make_router, replicas):
    router = make_router(max_body_bytes=1000)
    bad = httpx.post(router.url + "/generate", content=b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    deep = httpx.post(router.url + "/v1/completions", content=b"[" * 100 + b"]" * 100)
    assert deep.status_code == 400 and "nests" in deep.json()["error"]["message"]
    large = httpx.post(router.url + "/generate", json={"text": "x" * 2000})
    assert large.status_code == 413 and "1000 bytes" in large.json()["error"]["message"]
    assert httpx.post(router.url + "/begin_program", json={"program_id": 5}).status_code == 400
    assert not any(fake.received for fake in replicas)


def test_flush_and_abort_reach_every_replica(make_router, replicas):
    router = make_router()
    flushed = httpx.post(router.url + "/flush_cache")
    assert flushed.status_code == 200 and flushed.text.count("Cache flushed.") == 2
    aborted = httpx.post(router.url + "/abort_request", json={"rid": "x"})
    assert aborted.status_code == 200 and aborted.json()["success"] is True
    assert all(fake.paths() == ["/flush_cache", "/abort_request"] for fake in replicas)


def test_metrics_cover_the_router_and_each_replica(make_router, replicas):
    router = make_router()
    httpx.post(router.url + "/generate", json={"text": PREFIX_A})
    text = httpx.get(router.url + "/metrics").text
    for fake in replicas:
        assert f'plait:engine_up{{replica="{fake.url}"}} 1' in text
        assert f'plait_router:replica_healthy{{replica="{fake.url}"}} 1' in text
    assert text.count("# TYPE plait:requests_total counter") == 1
    assert "plait_router:healthy_replicas 2" in text
    assert 'plait_router:requests_total{replica="' in text and 'route="/generate"' in text
    assert 'plait_router:responses_total{route="/generate",status="200"} 1' in text


def test_failed_health_checks_take_a_replica_out_and_back(make_router, replicas):
    router = make_router(policy="round_robin", health_check_interval=0.05)
    replicas[1].app.state.healthy = False
    _wait(lambda: httpx.get(router.url + "/list_workers").json()["healthy"][replicas[1].url] is False)
    assert {who(httpx.post(router.url + "/generate", json={"text": str(i)})) for i in range(4)} == {"r0"}
    assert 'plait_router:healthy_replicas 1' in httpx.get(router.url + "/metrics").text
    replicas[0].app.state.healthy = False
    _wait(lambda: httpx.get(router.url + "/health").status_code == 503)
    none_left = httpx.post(router.url + "/generate", json={"text": "x"})
    assert none_left.status_code == 503 and "no healthy replica" in none_left.json()["error"]["message"]
    replicas[0].app.state.healthy = replicas[1].app.state.healthy = True
    _wait(lambda: all(httpx.get(router.url + "/list_workers").json()["healthy"].values()))
    assert {who(httpx.post(router.url + "/generate", json={"text": str(i)})) for i in range(4)} == {"r0", "r1"}


def test_unreachable_replica_is_skipped_without_an_error(make_router, replicas):
    dead = f"http://127.0.0.1:{free_port()}"
    router = make_router(urls=[dead, replicas[0].url], policy="round_robin", health_check_interval=60)
    assert [who(httpx.post(router.url + "/generate", json={"text": str(i)})) for i in range(3)] == ["r0"] * 3
    assert httpx.get(router.url + "/list_workers").json()["healthy"][dead] is False


def test_replica_killed_mid_stream_ends_the_stream_with_an_error_event(make_router, replicas):
    port = free_port()
    victim = subprocess.Popen([sys.executable, "-m", "tests.router.fakes", str(port), "victim"],
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _up(url), timeout=20)
        router = make_router(urls=[url, replicas[1].url], policy="round_robin", health_check_interval=60)
        body = {"text": "long answer", "stream": True, "stream_events": 200, "stream_delay": 0.02}
        with httpx.stream("POST", router.url + "/generate", json=body, timeout=10) as stream:
            lines = stream.iter_lines()
            assert next(lines) == 'data: {"text": "victim-0", "index": 0}'
            victim.send_signal(signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert url in error["message"] and "mid-stream" in error["message"] and error["code"] == "replica_failed"
        assert all(json.loads(line[6:]).get("text", "").startswith("victim") for line in rest[:-2])  # whole events
        after = httpx.post(router.url + "/generate", json={"text": "next"})
        assert who(after) == "r1"  # taken out at once, before any health check
        assert 'kind="mid_stream"' in httpx.get(router.url + "/metrics").text
    finally:
        victim.kill()
        victim.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_client_that_leaves_frees_its_slot_at_the_router(make_router, replicas):
    router = make_router(policy="round_robin")
    body = {"text": "long", "stream": True, "stream_events": 500, "stream_delay": 0.01}
    with httpx.stream("POST", router.url + "/generate", json=body, timeout=10) as stream:  # then it leaves
        lines = stream.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        assert sum(httpx.get(router.url + "/list_workers").json()["in_flight"].values()) == 1
    hold = threading.Event()
    replicas[1].app.state.hold = hold
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/generate", json={"text": "waits"}, timeout=0.3)  # r1, held: no headers yet
    _wait(lambda: sum(httpx.get(router.url + "/list_workers").json()["in_flight"].values()) == 0)
    hold.set()
