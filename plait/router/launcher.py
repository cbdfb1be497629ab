"""``plait serve --dp N``: N ``plait serve`` replicas as child processes, and the router in front.

Replica i listens on a free loopback port and, where CUDA GPUs are visible, sees GPUs
``i*tp .. i*tp+tp-1`` only (``CUDA_VISIBLE_DEVICES``); on the CPU they share the CPU. The command
waits until every replica answers ``/health``; a replica that exits first fails the command with the
end of its output. Then the router serves ``--host/--port`` until SIGINT/SIGTERM, which drain the
router's in-flight requests, then stop every replica (SIGTERM, then SIGKILL past the drain time).
Replicas also get SIGTERM if this process dies (``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from plait.router.cli import DATA_PARALLEL_DESTS, routing_settings

REPLICA_HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((REPLICA_HOST, 0))
        return s.getsockname()[1]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in listing.splitlines() if l.startswith("GPU "))]


def replica_arguments(args: argparse.Namespace, serve: argparse.ArgumentParser) -> list[str]:
    """The ``plait serve`` flags given on this command line, for a replica (minus --dp, --host, --port
    and the router's own flags)."""
    skip = DATA_PARALLEL_DESTS | {"host", "port", "help", "handler"}
    out: list[str] = []
    for action in serve._actions:
        if not action.option_strings or action.dest in skip or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class ReplicaProcess:
    """One replica: its process, URL, and the last lines it printed (each also echoed, prefixed)."""

    index: int
    url: str
    process: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))

    def echo_output(self) -> None:
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
            print(f"[replica {self.index}] {line}", end="", file=sys.stderr, flush=True)

    def failure(self) -> str:
        lines = "\n".join(self.tail)
        return f"replica {self.index} ({self.url}) exited with status {self.process.returncode}:\n{lines}"


def start_replicas(count: int, arguments: list[str], tp_size: int) -> list[ReplicaProcess]:
    """Start ``count`` replicas (``plait serve`` with ``arguments``) on free loopback ports."""
    gpus = visible_gpus()
    if gpus and len(gpus) < count * tp_size:
        raise ValueError(f"--dp {count} with --tp {tp_size} needs {count * tp_size} GPUs; {len(gpus)} visible")
    replicas = []
    for i in range(count):
        port = free_port()
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * tp_size:(i + 1) * tp_size])
        command = [sys.executable, "-m", "plait.cli", "serve", *arguments, "--host", REPLICA_HOST, "--port", str(port)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        replica = ReplicaProcess(i, f"http://{REPLICA_HOST}:{port}", process)
        threading.Thread(target=replica.echo_output, name=f"replica-{i}-output", daemon=True).start()
        replicas.append(replica)
    return replicas


def wait_healthy(replicas: list[ReplicaProcess], api_key: str | None) -> None:
    """Return once every replica answers ``/health`` with 200; ``ValueError`` if one exits first."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    waiting = list(replicas)
    while waiting:
        for replica in list(waiting):
            if replica.process.poll() is not None:
                time.sleep(0.2)  # let the output thread read its last lines
                raise ValueError(replica.failure())
            try:
                if httpx.get(replica.url + "/health", headers=headers, timeout=2).status_code == 200:
                    waiting.remove(replica)
            except httpx.HTTPError:
                pass
        if waiting:
            time.sleep(0.1)


def stop_replicas(replicas: list[ReplicaProcess], timeout: float) -> None:
    """SIGTERM every replica (they drain), then SIGKILL what is left after ``timeout`` seconds."""
    for replica in replicas:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for replica in replicas:
        try:
            replica.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(replica.process.pid, signal.SIGKILL)  # its own session: the replica and its children
            replica.process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def serve_data_parallel(args: argparse.Namespace) -> int:
    """``plait serve --dp N``: start the replicas, route over them until SIGTERM, stop them."""
    from plait.cli import build_parser, engine_settings
    from plait.router.app import RouterConfig, run_router
    from plait.runtime.config import EngineConfig

    if args.dp_size < 1:
        raise ValueError(f"--dp must be >= 1, got {args.dp_size}")
    serve_parser = build_parser().subcommands.choices["serve"]
    arguments = replica_arguments(args, serve_parser)
    settings = engine_settings(args)
    EngineConfig.from_kwargs(model=args.model, **settings)  # bad values fail here, before anything starts
    tp_size = int(settings.get("tp_size", 1))
    config = RouterConfig(  # bad router settings fail here, before any replica starts
        replicas=("http://placeholder",), host=args.host, port=args.port, api_key=args.api_key,
        replica_api_key=args.api_key, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth, **routing_settings(args))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM while starting: stop what started
    replicas: list[ReplicaProcess] = []
    try:
        replicas = start_replicas(args.dp_size, arguments, tp_size)
        wait_healthy(replicas, args.api_key)
        signal.signal(signal.SIGTERM, previous)
        urls = tuple(replica.url for replica in replicas)
        print(f"plait serve: {args.dp_size} replicas ({', '.join(urls)})", flush=True)
        import dataclasses

        run_router(dataclasses.replace(config, replicas=urls))
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_replicas(replicas, args.shutdown_timeout + 15.0)
    return 0
