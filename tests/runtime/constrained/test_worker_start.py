"""Grammar compile workers always start or fail clearly: from a script read from stdin (whose ``__main__``
a spawned child cannot run again), and within the start-up timeout when a worker never says ready."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from plait.runtime.constrained import ConstraintError, ConstraintKind, ConstraintSpec
from plait.runtime.constrained.compile_worker import CompileWorkerPool, WorkerStartError
from plait.runtime.spawn import HelperStartError

REPO = Path(__file__).resolve().parents[3]


class NeverLoads:
    """A tokenizer view whose unpickling (in a worker, before it says ready) sleeps for an hour."""

    def __reduce__(self):
        return time.sleep, (3600,)


def answered_by_the_worker(spec: ConstraintSpec) -> None:
    """Worker hook: every compile fails with a message only a worker gives."""
    raise ConstraintError(f"answered by a worker: {spec.source}")


def test_a_worker_that_never_says_ready_fails_waiting_jobs_at_the_start_timeout():
    pool = CompileWorkerPool(NeverLoads(), load=lambda *args: None, workers=1, timeout_s=30.0, start_timeout_s=1.0)
    info_path = pool._info_path
    try:
        assert pool.start_wait_s() > 0  # a compile() waits for the start on top of its own timeout
        began = time.monotonic()
        future = pool.submit(ConstraintSpec(ConstraintKind.REGEX, "[0-9]+"), ("llguidance",))
        with pytest.raises(WorkerStartError, match=r"did not say ready within 1 s") as caught:
            future.result(timeout=30)
        assert time.monotonic() - began < 1.0 + 4  # not the 30 s compile timeout, nor for ever
        # a request's error (the engine answers it and goes on) and a helper start error
        assert isinstance(caught.value, ConstraintError) and isinstance(caught.value, HelperStartError)
        assert pool.restarts == 1  # the worker was replaced: the next request gets a fresh one
    finally:
        pool.shutdown()
    assert not os.path.exists(info_path)  # the workers' copy of the tokenizer view is removed


def test_a_job_that_waited_for_a_starting_worker_is_compiled_not_expired():
    """Waiting for a worker to start is not waiting for a busy one: with a start slower than the compile
    timeout (a worker imports torch), the job once failed "waited ... for a grammar compile worker" the
    moment the worker said ready."""
    pool = CompileWorkerPool(None, load=lambda *args: None, workers=1, timeout_s=0.2, hook=answered_by_the_worker)
    try:
        future = pool.submit(ConstraintSpec(ConstraintKind.REGEX, "[0-9]+"), ("llguidance",))
        with pytest.raises(ConstraintError, match=r"answered by a worker: \[0-9\]\+"):
            future.result(timeout=60)
    finally:
        pool.shutdown()


@pytest.mark.model
def test_an_engine_in_a_script_read_from_stdin_serves_a_constrained_request(bundled_model_dir):
    """``python - <<EOF``: the compile worker's child once died re-running '<stdin>' and the engine hung."""
    script = textwrap.dedent(r"""
        import re, sys
        from plait.runtime.engine import Engine

        engine = Engine(model=sys.argv[1], max_total_tokens=1024, grammar_compile_workers=1)
        out = engine.generate("Phone: ", {"regex": r"\d{3}-\d{4}", "max_new_tokens": 12, "temperature": 0})
        assert re.fullmatch(r"\d{3}-\d{4}", out["text"]), out["text"]
        engine.shutdown()
        print("served", out["text"])
    """)
    result = subprocess.run([sys.executable, "-", str(bundled_model_dir)], input=script, capture_output=True,
                            text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served" in result.stdout
    assert "<stdin>" not in result.stderr  # no child tried to run the script again
