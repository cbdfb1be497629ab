"""Starting a real ``plait serve`` process on loopback for a test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import httpx

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    api_key: str | None = None
    log: Any = None

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=60, **kwargs)

    def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=120, **kwargs)

    def stats(self) -> dict:
        return self.get("/get_server_info").json()["internal_states"][0]

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(*args: str, api_key: str | None = None, timeout: float = 180.0) -> ServerProcess:
    """``plait serve`` with the bundled model on a free port; returns once ``/health`` answers 200.

    Its KV cache holds 10,240 tokens (0.44 GB, above the model's 8,192-token context, which the tests
    of context-length errors need) unless ``args`` size it: the default 1 GB per server process pushed
    the test run's peak memory past its budget."""
    port = free_port()
    kv = [] if any(a in ("--max-total-tokens", "--kv-cache-gb") for a in args) else ["--max-total-tokens", "10240"]
    command = [sys.executable, "-m", "plait.cli", "serve", "--model", MODEL, "--port", str(port), *kv, *args]
    if api_key:
        command += ["--api-key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - a pipe nobody reads could fill up and block the server
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, api_key, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"plait serve exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"plait serve did not come up within {timeout} s:\n{server.output()}")


def assert_idle_and_flushed(server: ServerProcess) -> None:
    """Invariant 2 over HTTP: nothing running or queued and, after a flush, no KV slot in use."""
    deadline = time.monotonic() + 30
    while True:
        stats = server.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"requests still in flight: {stats}"
        time.sleep(0.05)
    assert server.post("/flush_cache").status_code == 200
    stats = server.stats()
    assert stats["kv_slots_used"] == 0, f"{stats['kv_slots_used']} KV slots leaked: {stats}"
