"""A run's end on the real engine (the bundled model): leaving ``text_iter`` and ``timeout=`` abort the engine's
requests, and exiting Python with a stream open ends the process cleanly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import plait as pl
from plait.lang import ProgramAbortedError, ProgramTimeoutError

pytestmark = pytest.mark.model
REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 2000  # far more than the tests wait for: finishing early shows the request was aborted


@pl.function
def story(s):
    s += "Once upon a time" + pl.gen("story", max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)
    s += "\nThe end." + pl.gen("after", max_tokens=8)


def wait_idle(runtime, timeout: float = 5.0) -> None:
    """Until the engine runs and queues nothing (fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = runtime.engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.02)


def test_leaving_text_iter_aborts_the_engine_request(shared_runtime):
    before = shared_runtime.engine.stats()["generated_tokens"]
    state = story.run(backend=shared_runtime, stream=True)
    pieces = []
    for piece in state.text_iter("story"):
        pieces.append(piece)
        if len(pieces) == 3:
            break
    wait_idle(shared_runtime)
    assert isinstance(state.error(), ProgramAbortedError)
    assert shared_runtime.engine.stats()["generated_tokens"] - before < 200  # not the 2000 asked for


def test_a_timeout_aborts_the_engine_request(shared_runtime):
    before = shared_runtime.engine.stats()["generated_tokens"]
    started = time.monotonic()
    with pytest.raises(ProgramTimeoutError, match="timeout=1 s"):
        story.run(backend=shared_runtime, timeout=1.0)
    assert time.monotonic() - started < 3
    wait_idle(shared_runtime)
    assert shared_runtime.engine.stats()["generated_tokens"] - before < 200
    hello = pl.function(lambda s: s.__iadd__("Hello" + pl.gen("next", max_tokens=4, temperature=0)))
    assert hello.run(backend=shared_runtime, timeout=60)["next"]  # the engine serves the next run


EXIT_WITH_A_STREAM_OPEN = textwrap.dedent("""
    import plait as pl
    from plait.runtime.models.registry import ensure_preset_dir

    runtime = pl.Runtime(model=str(ensure_preset_dir("smollm2-135m-instruct")), dtype="float32",
                         max_total_tokens=4096)

    @pl.function
    def story(s):
        s += "Once upon a time" + pl.gen("story", max_tokens=2000, ignore_eos=True)

    state = story.run(backend=runtime, stream=True)
    pieces = state.text_iter("story")
    print("first piece:", repr(next(pieces)), flush=True)
    # the script ends here, with the generation still running
""")


def test_exiting_with_a_stream_open_ends_the_process_cleanly(bundled_model_dir):
    run = subprocess.run([sys.executable, "-c", EXIT_WITH_A_STREAM_OPEN], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert "first piece:" in run.stdout, run.stderr[-2000:]
    assert run.returncode == 0, run.stderr[-2000:]
    for fatal in ("Fatal Python error", "terminate called", "Traceback"):
        assert fatal not in run.stderr, run.stderr[-2000:]
