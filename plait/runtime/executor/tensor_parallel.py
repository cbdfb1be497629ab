"""Running an engine's model over a tensor-parallel group: rank 0 drives, the other ranks follow.

The engine (scheduler, radix cache, constrained decoding, sampling) runs once, in the engine's own
process, which is rank 0 and holds its part of the model like every rank. Ranks 1 .. N-1 are
processes of their own (``TensorParallelRanks`` starts them) that hold their parts and run a
``follow`` loop: for each step rank 0 broadcasts one message (``StepMessage``: the batch's token ids,
positions, KV slots and rows, and the request-to-slot table writes made since the last step) and
every rank runs the same forward, joined by the model's collectives (``distributed.all_reduce``);
only rank 0 uses the logits. Start-up (model build, warm-up steps, CUDA-graph capture) runs in
lockstep on every rank with the same settings, so its collectives pair up without messages.

A rank that dies fails the step in flight with ``TensorParallelError`` naming it; the engine then
reports itself dead (its requests end with that error) instead of hanging.

Across hosts (``EngineConfig.rendezvous``: ``nnodes``, ``node_rank``, ``dist_init_addr``, or torchrun's
environment) each host runs ``tp_size / nnodes`` ranks: host 0 the engine (rank 0) and its local ranks,
every other host only its ranks (``run_node``, which ``plait serve --node-rank R`` runs), all joined at
host 0's address through torch.distributed's TCP rendezvous. Ranks use their host's GPUs 0 .. k-1.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from plait.runtime.distributed import TensorParallelGroup, set_tensor_parallel, tensor_parallel
from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.spawn import start_process

logger = logging.getLogger(__name__)

NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# how long any collective (the start-up's included: loading weights on every rank) may wait for the others
COLLECTIVE_TIMEOUT_S = 900.0


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or exited: the engine cannot run steps any more."""


@dataclass
class StepMessage:
    """What the other ranks need to run rank 0's step: the table writes first, then the batch."""

    table_writes: list[tuple[int, int, list[int]]]
    input_ids: list[int]
    positions: list[int]
    out_cache_loc: list[int]
    req_rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    extend_starts: list[int]
    logits_indices: list[int]

    @classmethod
    def of(cls, batch: ForwardBatch, table_writes: list) -> StepMessage:
        return cls(table_writes, batch.input_ids.tolist(), batch.positions.tolist(), batch.out_cache_loc.tolist(),
                   batch.req_rows.tolist(), list(batch.prefix_lens), list(batch.extend_lens), list(batch.seq_lens),
                   list(batch.extend_starts), batch.logits_indices.tolist())

    def batch_on(self, runner: Any) -> ForwardBatch:
        """Replay the table writes on ``runner``'s table and build the step's batch on its device."""
        device, table = runner.device, runner.slot_table
        for row, start, slots in self.table_writes:
            table.write(row, start, torch.tensor(slots, dtype=torch.int64, device=device))

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        req_rows, positions, out_cache_loc = tensor(self.req_rows), tensor(self.positions), tensor(self.out_cache_loc)
        token_rows = torch.repeat_interleave(req_rows, tensor(self.extend_lens))
        table.write_at(token_rows, positions, out_cache_loc)  # as rank 0's step builder did
        return ForwardBatch(
            input_ids=tensor(self.input_ids), positions=positions, out_cache_loc=out_cache_loc, req_rows=req_rows,
            prefix_lens=self.prefix_lens, extend_lens=self.extend_lens, seq_lens=self.seq_lens,
            extend_starts=self.extend_starts, logits_indices=tensor(self.logits_indices), pool=runner.pool,
            slot_table=table.table,
        )


def _broadcast(message: Any, group: Any) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def init_group(rank: int, size: int, init_method: str, device: torch.device) -> TensorParallelGroup:
    """Join the group (NCCL for the model's collectives on GPUs, gloo on the CPU and for host
    messages) and make it this process's tensor-parallel group."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # NVLink multicast (NCCL's NVLS all-reduce, PyTorch's symmetric-memory multimem, NVSHMEM's NVLS)
        # stays off unless the environment asks for it: on shared hosts a multicast fault can take every
        # GPU of the host out of service, and plait's figures are taken without it
        for variable, value in NVLINK_MULTICAST_OFF.items():
            os.environ.setdefault(variable, value)
    from datetime import timedelta

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            **({"device_id": device} if device.type == "cuda" else {}))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    group = TensorParallelGroup(rank, size, None, cpu_group)
    set_tensor_parallel(group)
    return group


def rank_device(config: Any, rank: int) -> torch.device:
    """The device of ``rank``: its host's GPU ``rank mod ranks per host`` on a GPU host (counting from the
    engine's ``cuda:N``), else the CPU."""
    device = torch.device(config.resolved_device())
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank % config.rendezvous().ranks_per_node)


def run_rank(rank: int, size: int, init_method: str, config: Any, source: Any, errors: Any) -> None:
    """Entry point of ranks 1 .. N-1: join the group, build this rank's part, follow rank 0's steps."""
    from plait.runtime.executor.model_runner import ModelRunner

    try:
        device = rank_device(config, rank)
        init_group(rank, size, init_method, device)
        runner = ModelRunner(dataclasses.replace(config, device=str(device)), source)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, which fails the engine's start with it
        errors.put((rank, f"{type(exc).__name__}: {exc}"))
        raise
    follow(runner)


def follow(runner: Any) -> None:
    """Run rank 0's steps until it says stop (None) or the group breaks."""
    import torch.distributed as dist

    group = tensor_parallel().cpu_group
    while True:
        try:
            message = _broadcast(None, group)
        except Exception:  # noqa: BLE001 - rank 0 went away: nothing left to follow
            logger.warning("tensor-parallel rank %d: rank 0 went away", tensor_parallel().rank)
            return
        if message is None:
            break
        runner.forward(message.batch_on(runner))
    dist.destroy_process_group()


def _init_method(config: Any) -> str:
    """The rendezvous URL: host 0's ``dist_init_addr`` across hosts, else a free local port."""
    address = config.rendezvous().address
    return f"tcp://{address}" if address is not None else f"tcp://127.0.0.1:{_free_port()}"


def _start_local_ranks(config: Any, source: Any, ranks: range, init_method: str, errors: Any) -> list:
    ctx = multiprocessing.get_context("spawn")
    processes = []
    for rank in ranks:
        process = ctx.Process(target=run_rank, args=(rank, config.tp_size, init_method, config, source, errors),
                              name=f"plait-tp-rank-{rank}", daemon=True)
        start_process(process)
        processes.append(process)
    return processes


def run_node(config: Any, source: Any) -> int:
    """A host other than host 0 (``node_rank`` > 0): run this host's ranks until rank 0 stops them;
    returns 0, or 1 when a rank failed (its error is logged). The first rank runs in this process."""
    place = config.rendezvous()
    if place.node_rank == 0:
        raise ValueError("node 0 runs the engine itself (Engine / plait serve); run_node is for node_rank > 0")
    first = place.global_rank(0)
    errors = multiprocessing.get_context("spawn").Queue()
    init_method = f"tcp://{place.address}"
    processes = _start_local_ranks(config, source, range(first + 1, first + place.ranks_per_node), init_method, errors)
    status = 0
    try:
        run_rank(first, config.tp_size, init_method, config, source, errors)
    except BaseException as exc:  # noqa: BLE001 - reported below; the other ranks are stopped
        logger.error("tensor-parallel rank %d failed: %s: %s", first, type(exc).__name__, exc)
        status = 1
        for process in processes:
            process.kill()
    for rank, process in enumerate(processes, start=first + 1):
        process.join()
        if process.exitcode != 0:
            logger.error("tensor-parallel rank %d exited with status %s", rank, process.exitcode)
            status = 1
    return status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelRanks:
    """Rank 0's side: starts ranks 1 .. N-1 and joins the group with them (``start``); after the
    runner is built, ``attach`` makes each of its forwards broadcast the step first; ``stop`` ends them.
    One tensor-parallel engine per process (torch.distributed has one default group per process)."""

    def __init__(self, config: Any, source: Any):
        self.config, self.source = config, source
        self.size = config.tp_size
        self.processes: list[multiprocessing.Process] = []
        self.group: TensorParallelGroup | None = None
        self.failed: str | None = None
        self._journal: list | None = None

    def start(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: one tensor-parallel "
                               "engine per process")
        place = self.config.rendezvous()
        if place.node_rank != 0:
            raise ValueError(f"node_rank {place.node_rank}: only node 0 runs the engine; the other hosts run "
                             "their ranks with `plait serve --node-rank R` (tensor_parallel.run_node)")
        self._errors = multiprocessing.get_context("spawn").Queue()
        init_method = _init_method(self.config)
        self.processes = _start_local_ranks(self.config, self.source, range(1, place.ranks_per_node), init_method,
                                            self._errors)
        self.group = init_group(0, self.size, init_method, rank_device(self.config, 0))

    def attach(self, runner: Any) -> None:
        """From now on every forward of ``runner`` first sends its step to the other ranks."""
        self._journal = runner.slot_table.journal = []
        runner.before_forward = self.send_step

    def first_error(self, exc: BaseException) -> str:
        """Why the start failed: the first error a rank reported, else ``exc``."""
        import queue

        try:
            rank, message = self._errors.get(timeout=5)
            return f"rank {rank}: {message}"
        except (queue.Empty, AttributeError, OSError):
            return f"rank 0: {type(exc).__name__}: {exc}"

    def check(self) -> None:
        """Raise ``TensorParallelError`` if a rank has exited or reported an error."""
        if self.failed is not None:
            raise TensorParallelError(self.failed)
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                self.failed = f"tensor-parallel rank {rank} exited with status {process.exitcode}"
                raise TensorParallelError(self.failed)

    def send_step(self, batch: ForwardBatch) -> None:
        self.check()
        writes, self._journal[:] = list(self._journal), []
        try:
            _broadcast(StepMessage.of(batch, writes), self.group.cpu_group)
        except Exception as exc:  # noqa: BLE001 - a broken group: no further step can run
            self.failed = f"tensor-parallel group broke: {type(exc).__name__}: {exc}"
            raise TensorParallelError(self.failed) from exc

    def stop(self, graceful: bool = True) -> None:
        """Tell the other ranks to stop (``graceful``; else, as after a failed start whose ranks may be
        mid-collective, kill them), wait for them (killing any that do not end), leave the group."""
        import torch.distributed as dist

        if not graceful:
            for process in self.processes:
                process.kill()
        elif self.group is not None and self.failed is None:
            try:
                _broadcast(None, self.group.cpu_group)
            except Exception:  # noqa: BLE001 - a rank already gone
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group cannot be torn down cleanly
                pass
        self.group = None
        self.processes = []
        set_tensor_parallel(TensorParallelGroup())
