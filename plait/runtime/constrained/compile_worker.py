"""Grammar compilation in worker processes that may crash, hang or be killed without touching the engine.

Grammar libraries run native code that recurses over the grammar: a pathological grammar can overflow
the stack (SIGSEGV kills the whole process) or run for minutes, and a thread cannot be stopped. So the
expensive half of compiling (``GrammarBackend.prepare``) runs in a small pool of spawned processes;
the engine process only ``load``s the validated result (see backends/base.py).

``CompileWorkerPool.submit`` returns a ``Future`` at once; one dispatcher thread feeds idle workers,
reads their answers and watches deadlines:

- a job a worker has run for ``timeout_s`` fails (``ConstraintError``) and that worker is killed (the
  compile is really stopped) and a fresh one started; a job that waited ``timeout_s`` for a busy
  worker fails too (time spent waiting for a worker to start does not count: it waits for that one);
- a worker that dies (a crash in the grammar library) fails its job with a ``ConstraintError`` naming
  the crash, and is replaced;
- a worker that has not said ready ``start_timeout_s`` after it was started is killed and replaced, and
  while no worker is ready the jobs waiting fail with ``WorkerStartError`` (so do they when workers keep
  dying while they start): a constrained request fails clearly instead of waiting for ever;
- queued jobs beyond ``max_queued`` are refused at once.

Workers compile on a thread with a smaller stack (``WORKER_STACK_BYTES``) than the engine's threads,
so a grammar a worker compiled has stack headroom when the engine builds its matcher. Workers run at a
lower CPU priority than the engine (``os.nice``).

Workers are spawned with ``plait.runtime.spawn.start_process`` (safe from a ``__main__`` read from
stdin). The tokenizer view, megabytes of it, reaches them through a private temporary file rather than
the process arguments: multiprocessing writes the arguments into a pipe whose read end the parent keeps
open until the write ends, so a child that died before reading them all would block ``Process.start``
for ever.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from plait.runtime.constrained.backends.base import BackendUnavailable, UnsupportedConstraint
from plait.runtime.constrained.relax import RELAXED_LEVELS, is_relaxable, relax_schema
from plait.runtime.constrained.spec import ConstraintError, ConstraintKind, ConstraintSpec
from plait.runtime.spawn import HelperStartError, start_process

__all__ = ["CompileWorkerPool", "WorkerStartError", "prepare_first", "prepare_relaxing"]

logger = logging.getLogger(__name__)

WORKER_STACK_BYTES = 4 * 2**20  # half the usual 8 MiB thread stack of the engine process
WORKER_NICE = 5
_MAX_START_FAILURES = 3
WORKER_START_TIMEOUT_S = 120.0  # a worker imports torch and builds llguidance's tokenizer: seconds, not minutes


class WorkerStartError(ConstraintError, HelperStartError):
    """No grammar compile worker could start (each died while starting, or none said ready within the
    start-up timeout): the constrained requests waiting for one fail with it; the engine goes on."""


def prepare_first(spec: ConstraintSpec, names: tuple[str, ...], attempt: Callable[[str], Any]) -> tuple[str, Any]:
    """``attempt(name)`` (a backend's prepare or compile of ``spec``) with the first *installed* backend
    of ``names``: (backend name, result). A backend that is not installed passes to the next; one that
    refuses the spec ends the search (``ConstraintError`` with every reason so far): on MaskBench,
    outlines-core rescued none of the 1,791 schemas llguidance refuses, and spent up to 23 s on one
    (``benchmarks/outlines_fallback.py``)."""
    reasons: list[str] = []
    for name in names:
        try:
            return name, attempt(name)
        except BackendUnavailable as exc:
            reasons.append(str(exc))
        except UnsupportedConstraint as exc:
            reasons.append(str(exc))
            break
    raise ConstraintError(f"cannot serve the {spec.describe()} constraint: " + "; ".join(reasons))


def prepare_relaxing(spec: ConstraintSpec, names: tuple[str, ...],
                     attempt: Callable[[ConstraintSpec, str], Any]) -> tuple[str, Any, tuple[str, list[str]] | None]:
    """``prepare_first`` of ``spec``; when the backend refuses a JSON schema for a relaxable feature
    (``relax.is_relaxable``: never a syntax error, a limit or an unsatisfiable schema), the same with the
    tightest relaxed schema that compiles (``relax.relax_schema``, levels 0 then 1). Returns (backend name,
    result, None) or (backend name, result, (relaxed schema's JSON text, keywords relaxed)). Raises the
    exact schema's ``ConstraintError`` (with the relaxed attempt's reason) when nothing compiles."""
    try:
        name, result = prepare_first(spec, names, lambda n: attempt(spec, n))
        return name, result, None
    except ConstraintError as exc:
        if spec.kind is not ConstraintKind.JSON_SCHEMA or not is_relaxable(str(exc)):
            raise
        original = exc
    schema, tried, last = spec.schema, set(), ""
    for level in range(RELAXED_LEVELS):
        relaxed, keywords = relax_schema(schema, level)
        source = json.dumps(relaxed, separators=(",", ":"))
        if not keywords or source in tried:
            continue
        tried.add(source)
        relaxed_spec = ConstraintSpec(ConstraintKind.JSON_SCHEMA, source)
        try:
            name, result = prepare_first(relaxed_spec, names, lambda n: attempt(relaxed_spec, n))
        except ConstraintError as exc:
            last = str(exc)
            continue
        return name, result, (source, keywords)
    if last:
        raise ConstraintError(f"{original}; the schema relaxed (see docs/constrained.md) is refused too: "
                              f"{last.split(': ', 1)[-1]}") from None
    raise original


# ------------------------------------------------------------------------------------- worker process
def _exit_with_parent(parent_pid: int) -> None:
    """End this worker once the engine process is gone (even in the middle of a hung compile)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _worker_main(conn: Connection, info_path: str, hook: Callable[[ConstraintSpec], None] | None,
                 warm: tuple[str, ...] = ()) -> None:
    """A worker: unpickle the tokenizer view (the file ``info_path``), build the per-tokenizer state of
    the backends ``warm`` names (``GrammarBackend.warm_up``: llguidance's tokenizer takes a second or
    more, which the first compile on a fresh worker would otherwise spend inside its timeout), say
    ``("ready", the backends warmed)``, then answer ``(job_id, spec, names)`` messages with ``(job_id,
    True, backend name, payload, relaxed)`` (``relaxed``: see ``prepare_relaxing``) or ``(job_id, False,
    message)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when workers end
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        os.nice(WORKER_NICE)
    except OSError:
        pass
    from plait.runtime.constrained.compiler import load_backend

    with open(info_path, "rb") as file:
        info = pickle.load(file)  # the engine's TokenizerInfo (loading the tokenizer again is slower)
    backends: dict[str, Any] = {}

    def backend_named(name: str) -> Any:
        if name not in backends:
            backends[name] = load_backend(name)
        return backends[name]

    warmed = []
    for name in warm:
        try:
            backend_named(name).warm_up(info)
        except Exception:  # noqa: BLE001 -- not installed or failing: the jobs that need it say so
            continue
        warmed.append(name)
    threading.stack_size(WORKER_STACK_BYTES)
    conn.send(("ready", tuple(warmed)))
    while True:
        try:
            job_id, spec, names = conn.recv()
        except (EOFError, OSError):
            return
        answer: list[tuple] = []

        def run(job_id: int = job_id, spec: ConstraintSpec = spec, names: tuple[str, ...] = names) -> None:
            try:
                if hook is not None:
                    hook(spec)
                answer.append((job_id, True, *prepare_relaxing(spec, names, lambda s, n: backend_named(n).prepare(s, info))))
            except ConstraintError as exc:
                answer.append((job_id, False, str(exc)))
            except Exception as exc:  # noqa: BLE001 -- a library bug must become that request's error
                answer.append((job_id, False, f"compiling the {spec.describe()} constraint failed: {exc!r}"))

        thread = threading.Thread(target=run, name="plait-compile")
        thread.start()
        thread.join()
        conn.send(answer[0])


# ------------------------------------------------------------------------------------- engine side
@dataclass
class _Job:
    job_id: int
    spec: ConstraintSpec
    names: tuple[str, ...]
    deadline: float
    future: Future


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    warmed: tuple[str, ...] = ()  # the backends it built before saying ready
    job: _Job | None = None
    started_at: float = field(default_factory=time.monotonic)


class CompileWorkerPool:
    """A bounded pool of compile worker processes.

    Args:
        info: the tokenizer's grammar view (``TokenizerInfo``; pickled once for every worker).
        load: turns a worker's ``(spec, backend name, payload)`` into the engine's compiled grammar
            (runs on the dispatcher thread; a ``ConstraintError`` it raises fails the job).
        workers: worker processes (each holds a copy of the tokenizer view).
        timeout_s: per job: most seconds waiting for a worker, and most seconds compiling.
        max_queued: jobs waiting for a worker beyond this are refused.
        hook: called in the worker before each compile (tests use it to simulate a crash or a hang).
        warm: backends each worker builds for the tokenizer before it takes jobs (``GrammarBackend.warm_up``).
        start_timeout_s: most seconds from starting a worker to its ``ready``; past it the worker is
            replaced and, while no worker is ready, the jobs waiting fail with ``WorkerStartError``.
    """

    def __init__(self, info: Any, load: Callable[[ConstraintSpec, str, Any, Any], Any], workers: int = 2,
                 timeout_s: float = 30.0, max_queued: int = 64,
                 hook: Callable[[ConstraintSpec], None] | None = None, warm: tuple[str, ...] = (),
                 start_timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
        if workers < 1:
            raise ValueError(f"grammar compile workers must be >= 1, got {workers}")
        if start_timeout_s <= 0:
            raise ValueError(f"the compile workers' start timeout must be > 0, got {start_timeout_s}")
        self.start_timeout_s = start_timeout_s
        fd, self._info_path = tempfile.mkstemp(prefix="plait-grammar-view-", suffix=".pickle")  # mode 0600
        self._remove_info = weakref.finalize(self, _remove_file, self._info_path)  # at shutdown, else at exit
        with os.fdopen(fd, "wb") as file:
            pickle.dump(info, file)
        self._load, self.timeout_s, self.max_queued = load, timeout_s, max_queued
        self._hook, self._warm = hook, warm
        self._ctx = multiprocessing.get_context("spawn")  # never fork the engine (threads, CUDA)
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._workers: list[_Worker] = []
        self._ids = 0
        self._closed = False
        self._start_failures = 0
        self.restarts = 0  # workers replaced after a crash or a kill (tests and metrics read it)
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        for _ in range(workers):
            self._workers.append(self._spawn())
        self._thread = threading.Thread(target=self._dispatch_loop, name="plait-compile-dispatch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, spec: ConstraintSpec, names: tuple[str, ...]) -> Future:
        """A future of ``load``'s result for ``spec`` (tried with backends ``names`` in order)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.set_exception(ConstraintError("the grammar compiler is shut down"))
                return future
            if len(self._queue) >= self.max_queued:
                future.set_exception(ConstraintError(
                    f"{len(self._queue)} grammars are waiting to compile (grammar_compile_max_queued); retry later"))
                return future
            self._ids += 1
            self._queue.append(_Job(self._ids, spec, names, time.monotonic() + self.timeout_s, future))
        self._wake()
        return future

    @property
    def warmed(self) -> list[tuple[str, ...]]:
        """The backends each current worker built before it said ready (empty while it starts)."""
        with self._lock:
            return [w.warmed for w in self._workers]

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        with self._lock:
            return [w.process.pid for w in self._workers]

    def shutdown(self) -> None:
        """Kill the workers and fail every job not finished."""
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ dispatcher thread
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self._info_path, self._hook, self._warm),
                                    name="plait-grammar-compile", daemon=True)
        # The server's engine process is itself a daemonic multiprocessing child, and multiprocessing
        # refuses children of daemons (it cannot promise to clean them up). Workers clean up after
        # themselves: they exit when the engine process is gone (``_exit_with_parent``).
        try:
            start_process(process, from_daemon=True)
        finally:
            child.close()
        return _Worker(process, parent)

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"x")
        except OSError:  # shut down
            pass

    def _dispatch_loop(self) -> None:
        try:
            while not self._closed:
                self._expire_and_assign()
                timeout = self._next_deadline()
                ready = wait([self._wake_r] + [w.conn for w in self._workers], timeout)
                for conn in ready:
                    if conn is self._wake_r:
                        while self._wake_r.poll():
                            self._wake_r.recv_bytes()
                    else:
                        self._on_message(conn)
        except Exception:  # noqa: BLE001 -- never leave futures hanging: fail them below
            logger.exception("the grammar compile dispatcher failed")
        finally:
            self._close_all()

    def _next_deadline(self) -> float:
        with self._lock:
            deadlines = [j.deadline for j in self._queue] + [w.job.deadline for w in self._workers if w.job]
            deadlines += [w.started_at + self.start_timeout_s for w in self._workers if not w.ready]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0

    def start_wait_s(self) -> float:
        """Seconds a job may still wait for a worker to start: 0 while some worker is ready, else the
        longest start-up time left to a starting worker (callers add it to a compile's own timeout)."""
        with self._lock:
            if any(w.ready for w in self._workers):
                return 0.0
            now = time.monotonic()
            return max((w.started_at + self.start_timeout_s - now for w in self._workers), default=0.0) + 1.0

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until every worker has started (tests; a warm-up). False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if all(w.ready for w in self._workers):
                    return True
            time.sleep(0.05)
        return False

    def _expire_and_assign(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            job = worker.job
            if job is not None and now >= job.deadline:
                self._replace(worker, f"was killed after {self.timeout_s:g} s")
                self._fail(job, ConstraintError(
                    f"compiling the {job.spec.describe()} constraint took longer than {self.timeout_s:g} s "
                    "(grammar_compile_timeout_s); it was stopped. Simplify it (fewer rules or alternatives, "
                    "smaller bounded repetitions)"))
        for worker in list(self._workers):
            if not worker.ready and now - worker.started_at >= self.start_timeout_s:
                self._start_failures += 1
                how = f"did not say ready within {self.start_timeout_s:g} s of its start"
                self._replace(worker, how)
                if not any(w.ready for w in self._workers):
                    self._fail_queued(f"no grammar compile worker process started: the last one {how}")
        starting = any(not w.ready for w in self._workers)
        with self._lock:
            if starting:  # queued jobs wait for it (its start is bounded above), then timeout_s at most for a
                # busy worker: a job that waited through a start once expired the moment the worker was ready
                for job in self._queue:
                    job.deadline = max(job.deadline, now + self.timeout_s)
                expired = []
            else:
                expired = [j for j in self._queue if now >= j.deadline]
            for job in expired:
                self._queue.remove(job)
        for job in expired:
            self._fail(job, ConstraintError(
                f"the {job.spec.describe()} constraint waited {self.timeout_s:g} s for a grammar compile worker "
                "(grammar_compile_timeout_s); the compilers are busy, retry later"))
        for worker in self._workers:
            if worker.ready and worker.job is None:
                with self._lock:
                    job = self._queue.popleft() if self._queue else None
                if job is None:
                    break
                job.deadline = time.monotonic() + self.timeout_s  # from now on: the compile's own time
                worker.job = job
                try:
                    worker.conn.send((job.job_id, job.spec, job.names))
                except (OSError, EOFError):  # died meanwhile: the read side reports it
                    pass

    def _on_message(self, conn: Connection) -> None:
        worker = next((w for w in self._workers if w.conn is conn), None)
        if worker is None:  # replaced while its message was pending
            return
        try:
            message = conn.recv()
        except (EOFError, OSError):
            self._on_death(worker)
            return
        if message[0] == "ready":
            worker.ready, worker.warmed = True, message[1]
            self._start_failures = 0
            return
        job, worker.job = worker.job, None
        if job is None or message[0] != job.job_id:
            return
        if not message[1]:
            self._fail(job, ConstraintError(message[2]))
            return
        try:
            job.future.set_result(self._load(job.spec, message[2], message[3], message[4]))
        except ConstraintError as exc:
            self._fail(job, exc)
        except Exception as exc:  # noqa: BLE001 -- a load failure fails that request only
            self._fail(job, ConstraintError(f"loading the compiled {job.spec.describe()} constraint failed: {exc!r}"))

    def _on_death(self, worker: _Worker) -> None:
        worker.process.join(timeout=1)
        code = worker.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        job = worker.job
        self._start_failures = 0 if worker.ready else self._start_failures + 1
        self._replace(worker, how)
        if job is not None:
            self._fail(job, ConstraintError(
                f"the grammar compiler crashed on the {job.spec.describe()} constraint (its worker process {how}); "
                "simplify the constraint"))
        if self._start_failures >= _MAX_START_FAILURES:  # workers die while starting: fail what waits
            self._start_failures = 0
            self._fail_queued(f"grammar compile workers cannot start (the last one {how})")

    def _fail_queued(self, why: str) -> None:
        """Fail every job waiting for a worker with ``WorkerStartError``."""
        with self._lock:
            queued, self._queue = list(self._queue), deque()
        for job in queued:
            self._fail(job, WorkerStartError(f"the {job.spec.describe()} constraint cannot be compiled: {why}"))

    def _replace(self, worker: _Worker, how: str) -> None:
        logger.warning("grammar compile worker %s %s; starting a new one", worker.process.pid, how)
        self._kill(worker)
        worker.job = None
        self._workers[self._workers.index(worker)] = self._spawn()
        self.restarts += 1

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()

    @staticmethod
    def _fail(job: _Job, exc: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(exc)

    def _close_all(self) -> None:
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
        for worker in self._workers:
            if worker.job is not None:
                queued.append(worker.job)
            self._kill(worker)
        for job in queued:
            self._fail(job, ConstraintError("the grammar compiler is shut down"))
        self._wake_r.close()
        self._wake_w.close()
        self._remove_info()


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
