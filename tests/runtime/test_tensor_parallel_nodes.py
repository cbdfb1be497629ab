"""Tensor parallelism across hosts: ranks split over ``nnodes`` hosts that meet at node 0's address.

The run is two local processes that believe they are two hosts (one rank each, over gloo): node 0 is
an ``Engine(tp_size=2, nnodes=2, node_rank=0, dist_init_addr=...)`` in the test's process, node 1 is
``plait serve`` given torchrun's environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) instead of
flags, which runs its rank only. The greedy tokens must be transformers' and node 1 must end, with
status 0, when node 0 shuts down. The rendezvous settings are also checked on their own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from plait.runtime.config import EngineConfig, Rendezvous
from plait.runtime.executor.tensor_parallel import rank_device


def test_rendezvous_from_settings_then_torchrun_environment_then_one_host():
    torchrun = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}
    assert EngineConfig(tp_size=4).rendezvous({}) == Rendezvous(1, 0, None, 4)
    assert EngineConfig(tp_size=4).rendezvous(torchrun) == Rendezvous(2, 1, "10.0.0.5:29500", 2)
    explicit = EngineConfig(tp_size=4, nnodes=2, node_rank=0, dist_init_addr="head:1234")
    assert explicit.rendezvous(torchrun) == Rendezvous(2, 0, "head:1234", 2)  # settings win
    assert EngineConfig(tp_size=1).rendezvous(torchrun) == Rendezvous(1, 0, None, 1)  # one rank: no group
    assert Rendezvous(2, 1, "h:1", 4).global_rank(3) == 7


@pytest.mark.parametrize("settings, message", [
    (dict(tp_size=3, nnodes=2, dist_init_addr="h:1"), "multiple of nnodes"),
    (dict(tp_size=2, nnodes=2), "node 0's address"),
    (dict(tp_size=2, nnodes=2, node_rank=2, dist_init_addr="h:1"), "node_rank in"),
    (dict(tp_size=2, nnodes=2, dist_init_addr="no-port"), "host:port"),
    (dict(tp_size=2, nnodes=2, dist_init_addr="h:99999"), "host:port"),
])
def test_bad_rendezvous_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)


def test_each_host_numbers_its_gpus_from_its_first_rank():
    config = EngineConfig(tp_size=4, nnodes=2, node_rank=1, dist_init_addr="h:1", device="cuda:1")
    assert [rank_device(config, rank) for rank in (2, 3)] == [torch.device("cuda", 1), torch.device("cuda", 2)]
    assert rank_device(EngineConfig(tp_size=2, device="cpu"), 1) == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.model
def test_two_hosts_over_gloo_give_transformers_tokens_and_node_1_ends_with_node_0(
        bundled_model_dir, varied_prompt_ids, hf_greedy, monkeypatch):
    from plait.runtime.engine import Engine
    from plait.runtime.executor import tensor_parallel
    from tests.runtime.engine_helpers import greedy_params

    monkeypatch.setattr(tensor_parallel, "COLLECTIVE_TIMEOUT_S", 120.0)  # a node 1 that never joins fails, not hangs

    port = _free_port()
    env = {**os.environ, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    node1 = subprocess.Popen([sys.executable, "-m", "plait.cli", "serve", "--model", str(bundled_model_dir),
                              "--tp", "2", "--max-total-tokens", "1024"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = None
    try:
        engine = Engine(model=str(bundled_model_dir), tp_size=2, nnodes=2, node_rank=0,
                        dist_init_addr=f"127.0.0.1:{port}", max_total_tokens=1024)
        assert engine._tp.processes == []  # node 0's only rank is the engine's own
        outs = engine.generate(input_ids=varied_prompt_ids[:2], sampling_params=greedy_params())
        assert [o["output_ids"] for o in outs] == hf_greedy[:2]
    finally:
        if engine is not None:
            engine.shutdown()
        try:
            output, _ = node1.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            node1.kill()
            output, _ = node1.communicate()
    assert node1.returncode == 0, output
    assert "node 1 of 2: tensor-parallel ranks 1..1 of 2" in output
