"""Tensor parallelism on the CPU: a rank that fails during start-up fails ``Engine(tp_size=2)`` at once.

Rank 1 is made to fail through the test hook ``PLAIT_TP_TEST_FAIL`` (``tensor_parallel.TEST_FAIL_ENV``,
read only by ranks 1 .. N-1 as they start; the spawned rank inherits the test's environment): it raises
before it joins the group (rank 0 would otherwise wait in the rendezvous for the 900 s collective
timeout), raises after joining (before building its part), or ends its process with status 3 without a
word. Each time the construction must raise ``TensorParallelError`` naming rank 1 and its error (or
exit status) within seconds, and no rank process may be left. Then an engine on the same tiny model
starts and generates in the same process: a failed start leaves nothing behind that gets in its way.
"""

from __future__ import annotations

import time

import psutil
import pytest

pytestmark = pytest.mark.model

transformers = pytest.importorskip("transformers")

PROMPT = [1, 17, 99, 3, 42]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama checkpoint (one layer): the ranks build it in moments."""
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return str(path)


def _spawned_children() -> set[int]:
    """Pids of this process's multiprocessing children (rank processes among them) that are alive."""
    alive = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                alive.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("where, expected", [
    ("join", r"rank 1 failed: RuntimeError: PLAIT_TP_TEST_FAIL=1:join"),
    ("build", r"rank 1 failed: RuntimeError: PLAIT_TP_TEST_FAIL=1:build"),
    ("exit", r"rank 1 exited \(exit status 3\)"),
])
def test_a_rank_that_fails_at_start_fails_the_engine_at_once_and_leaves_no_process(
        tiny_llama, monkeypatch, where, expected):
    from plait.runtime.engine import Engine
    from plait.runtime.executor.tensor_parallel import TEST_FAIL_ENV, TensorParallelError

    before = _spawned_children()
    monkeypatch.setenv(TEST_FAIL_ENV, f"1:{where}")
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match=expected) as failure:
        Engine(model=tiny_llama, tp_size=2, max_total_tokens=256)
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"the start took {elapsed:.1f} s to fail"
    assert "could not start" in str(failure.value)
    deadline = time.monotonic() + 10  # killed and joined already; the check allows for slow reaping
    while _spawned_children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _spawned_children() - before, "a rank process outlived the failed start"


def test_an_engine_starts_after_failed_starts_in_the_same_process(tiny_llama):
    """(Runs after the failures above: a rank that never joined leaves rank 0's joining thread waiting
    in the rendezvous, abandoned; it must not get in the way of the next group.)"""
    from plait.runtime.engine import Engine

    engine = Engine(model=tiny_llama, tp_size=2, max_total_tokens=256)
    try:
        out = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 3, "temperature": 0,
                                                                 "ignore_eos": True})
        assert len(out["output_ids"]) == 3
        rank = engine._tp.processes[0]
    finally:
        engine.shutdown()
    rank.join(timeout=30)
    assert rank.exitcode == 0
