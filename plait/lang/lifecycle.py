"""A program run's end: aborting it (``state.abort()``, a closed ``text_iter``, ``timeout=``) and winding it down.

Aborting a run fails every executor of the run with the abort error (queued nodes are dropped; the
program's next ``s += ...`` or variable read raises it) and asks the backend to abort the run's calls in
flight: ``backend.abort_program(program_id)`` where the backend has it (an optional part of the Backend
protocol: Runtime, Endpoint and MockBackend have it). A streamed gen also closes its stream at the next
chunk, which aborts the request on every backend. A call a backend cannot abort ends on its own; the run
is wound down in the background (``end_program`` after the last call returns) so the caller returns now.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plait.lang.interpreter import Executor
    from plait.lang.records import RunContext

__all__ = ["abort_run", "check_timeout", "start_deadline", "wind_down"]

logger = logging.getLogger(__name__)
_POLL_S = 0.05  # how often a wind-down that waits for workers checks whether the run was aborted


def abort_run(run: RunContext, error: BaseException) -> bool:
    """Abort ``run`` with ``error`` (see the module docstring). False if it had ended or was aborted already."""
    with run.lock:
        if run.ended or run.abort_error is not None:
            return False
        run.abort_error = error
        executors = list(run.executors)
    for ex in executors:
        ex.fail(error)
    abort = getattr(run.backend, "abort_program", None)
    if abort is not None and run.program_id is not None and not run.symbolic:
        try:
            abort(run.program_id)
        except Exception as exc:  # noqa: BLE001 - the run is aborted regardless; the backend may be gone
            logger.warning("backend %r could not abort program %s: %s", getattr(run.backend, "name", run.backend),
                           run.program_id, exc)
    return True


def check_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is None or a positive finite number of seconds; else ``ValueError``."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (or None), got {timeout!r}")
    return float(timeout)


def start_deadline(run: RunContext, timeout: float, error: BaseException) -> None:
    """Abort ``run`` with ``error`` after ``timeout`` seconds unless it ended before (``wind_down`` cancels it)."""
    timer = threading.Timer(timeout, abort_run, args=(run, error))
    timer.daemon = True
    run.deadline = timer
    timer.start()


def wind_down(run: RunContext, error: BaseException | None) -> BaseException | None:
    """End the run after its program function returned: close every executor, wait for the calls in
    flight, merge the forks' call records, ``end_program``. Returns the run's first error.

    If the run is (or gets) aborted meanwhile, the rest happens on a background thread and the abort
    error is returned at once.
    """
    with run.lock:
        executors = list(run.executors)
    for ex in executors:
        ex.end()
    for i, ex in enumerate(executors):
        while not ex.wait_finished(_POLL_S):
            if run.abort_error is not None:
                threading.Thread(target=_finish_quietly, args=(run, executors[i:]), name="plait-wind-down",
                                 daemon=True).start()
                return error if error is not None else run.abort_error
        if error is None and ex.error is not None:
            error = ex.error
    _finish(run, [])
    return error if error is not None else run.abort_error


def _finish_quietly(run: RunContext, pending: list[Executor]) -> None:
    try:
        _finish(run, pending)
    except Exception as exc:  # noqa: BLE001 - nobody is waiting for this aborted run any more
        logger.warning("ending aborted program %s failed: %s", run.program_id, exc)


def _finish(run: RunContext, pending: list[Executor]) -> None:
    for ex in pending:
        ex.wait_finished()
    try:
        with run.lock:
            executors = list(run.executors)
        for ex in reversed(executors):  # forks never joined: their calls join the root's record
            ex.merge_calls_into_parent()
    finally:
        if run.deadline is not None:
            run.deadline.cancel()
        with run.lock:  # every call has returned: nothing is left to abort
            run.ended = True
        if run.backend is not None and run.program_id is not None:
            run.backend.end_program(run.program_id)
