"""Running an engine's model over a tensor-parallel group: rank 0 drives, the other ranks follow.

The engine (scheduler, radix cache, constrained decoding, sampling) runs once, in the engine's own
process, which is rank 0 and holds its part of the model like every rank. Ranks 1 .. N-1 are
processes of their own (``TensorParallelRanks`` starts them) that hold their parts and run a
``follow`` loop: for each step rank 0 broadcasts one message (``StepMessage``: the batch's token ids,
positions, KV slots and rows, and the request-to-slot table writes made since the last step; with a
hybrid KV pool also the sliding slots of both, as rank 0 translated them; with LoRA adapters each
token's adapter slot and the adapter changes rank 0's manager journaled) and every rank runs the same
forward, joined by the model's collectives (``distributed.all_reduce``); only rank 0 uses the
logits. Start-up (model build, warm-up steps, CUDA-graph capture) runs in lockstep on every rank
with the same settings, so its collectives pair up without messages.

Across hosts (``EngineConfig.rendezvous``: ``nnodes``, ``node_rank``, ``dist_init_addr``, or torchrun's
environment) each host runs ``tp_size / nnodes`` ranks: host 0 the engine (rank 0) and its local ranks,
every other host only its ranks (``run_node``, which ``plait serve --node-rank R`` runs), all joined at
host 0's address through torch.distributed's TCP rendezvous. Ranks use their host's GPUs 0 .. k-1.

Failures. Rank 0 watches the ranks it started, from their start until ``stop``: a thread
(``TensorParallelRanks._watch``) waits with ``multiprocessing.connection.wait`` on each rank's process
sentinel and on a pipe over which the rank sends the type and message of the exception that ends it
(``run_rank``). The first rank that reports an error or exits is recorded (``failed``) and every other
rank is killed, so that nothing waits on them. During start-up this fails the engine's construction
within moments with ``TensorParallelError`` naming the rank and its error or exit status: rank 0 joins
the group in a thread of its own while its caller waits for the join or a failure (a rank that dies
before joining would otherwise leave rank 0 in the rendezvous for ``COLLECTIVE_TIMEOUT_S``; that thread
is abandoned and leaves the group by itself should it ever join), and its later start-up collectives
(weights, warm-up) fail as soon as their peers are gone. After start-up the next step fails with the
recorded error, and the engine reports itself dead (its requests end with that error); a collective
already in flight fails first with gloo's broken connection. Limits: NCCL (GPUs) does not notice a dead
peer, so a GPU collective already waiting on one is not interrupted (it ends at NCCL's timeout); and
ranks on other hosts cannot be watched by process sentinel: there rank 0 keeps only the collectives'
own detection (a rank that exits after joining breaks its gloo connections, which the next gloo
collective reports; one that never joins, or stops answering, is noticed after
``COLLECTIVE_TIMEOUT_S``). ``run_node`` does not watch its own spawned ranks: it waits for them and
reports their exit statuses when its rank ends.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from typing import Any

import torch

from plait.runtime.distributed import TensorParallelGroup, set_tensor_parallel, tensor_parallel
from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.spawn import start_process

logger = logging.getLogger(__name__)

NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# how long any collective (the start-up's included: loading weights on every rank) may wait for the others
COLLECTIVE_TIMEOUT_S = 900.0
# test hook, read only by ranks 1 .. N-1 as they start (run_rank): "R:join" makes rank R raise before it
# joins the group, "R:build" after it joined (before building its part), "R:exit" end its process there
# with status 3 without reporting anything (tests/runtime/test_tensor_parallel_start.py)
TEST_FAIL_ENV = "PLAIT_TP_TEST_FAIL"


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or exited: the engine cannot run steps any more."""


@dataclass
class StepMessage:
    """What the other ranks need to run rank 0's step: the table writes first, then the batch.

    Hybrid KV pools (``KVPool.hybrid``): the scheduler on rank 0 alone allocates and frees sliding slots,
    so only rank 0's pool maps full slots to sliding ones (``full_to_sliding``). Its table writes
    therefore carry the sliding slots rank 0 wrote (``ReqToSlotTable.journal``: the map as it was at
    that write, after the frees made before it), and ``sliding_out_cache_loc`` the new tokens'; the
    other ranks store them as they are (their maps stay empty). Without a hybrid pool both are None."""

    table_writes: list[tuple[int, int, list[int], list[int] | None]]
    input_ids: list[int]
    positions: list[int]
    out_cache_loc: list[int]
    req_rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    extend_starts: list[int]
    logits_indices: list[int]
    sliding_out_cache_loc: list[int] | None = None
    lora_journal: list[tuple] | None = None  # rank 0's LoRA manager changes since the last step (LoraManager.journal)
    lora_slots: list[int] | None = None  # each token's adapter slot, once some request has an adapter

    @classmethod
    def of(cls, batch: ForwardBatch, table_writes: list, lora_journal: list | None = None) -> StepMessage:
        sliding = None if batch.sliding_out_cache_loc is None else batch.sliding_out_cache_loc.tolist()
        lora_slots = None if batch.lora_slots is None else batch.lora_slots.tolist()
        return cls(table_writes, batch.input_ids.tolist(), batch.positions.tolist(), batch.out_cache_loc.tolist(),
                   batch.req_rows.tolist(), list(batch.prefix_lens), list(batch.extend_lens), list(batch.seq_lens),
                   list(batch.extend_starts), batch.logits_indices.tolist(), sliding, lora_journal or None, lora_slots)

    def batch_on(self, runner: Any) -> ForwardBatch:
        """Replay the table writes (and LoRA changes) on ``runner`` and build the step's batch on its device."""
        device, table = runner.device, runner.slot_table
        if (self.sliding_out_cache_loc is not None) != (table.sliding_table is not None):
            raise RuntimeError("rank 0's KV layout and this rank's differ (hybrid sliding-window pool on one only)")
        if (self.lora_journal or self.lora_slots is not None) and runner.lora is None:
            raise RuntimeError("rank 0 serves LoRA adapters and this rank has no LoRA buffers")
        if self.lora_journal:
            runner.lora.apply_journal(self.lora_journal)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        for row, start, slots, sliding in self.table_writes:
            table.write(row, start, tensor(slots), None if sliding is None else tensor(sliding))
        req_rows, positions, out_cache_loc = tensor(self.req_rows), tensor(self.positions), tensor(self.out_cache_loc)
        sliding_out_cache_loc = None if self.sliding_out_cache_loc is None else tensor(self.sliding_out_cache_loc)
        token_rows = torch.repeat_interleave(req_rows, tensor(self.extend_lens))
        table.write_at(token_rows, positions, out_cache_loc, sliding_out_cache_loc)  # as rank 0's step builder did
        return ForwardBatch(
            input_ids=tensor(self.input_ids), positions=positions, out_cache_loc=out_cache_loc, req_rows=req_rows,
            prefix_lens=self.prefix_lens, extend_lens=self.extend_lens, seq_lens=self.seq_lens,
            extend_starts=self.extend_starts, logits_indices=tensor(self.logits_indices), pool=runner.pool,
            slot_table=table.table, sliding_slot_table=table.sliding_table,
            sliding_out_cache_loc=sliding_out_cache_loc,
            lora_slots=None if self.lora_slots is None else torch.tensor(self.lora_slots, dtype=torch.int32,
                                                                         device=device),
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

    _restart_group_numbering()
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            **({"device_id": device} if device.type == "cuda" else {}))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    group = TensorParallelGroup(rank, size, None, cpu_group)
    set_tensor_parallel(group)
    return group


def _restart_group_numbering() -> None:
    """Number this process's next torch.distributed group 0, as in a fresh process (the other ranks).

    torch names a group's keys in the rendezvous store by a per-process count of the groups made
    (``destroy_process_group()`` starts it again at 0), and takes the number before the rendezvous. A
    start that failed because a rank died before joining leaves rank 0's joining thread in the
    rendezvous (``TensorParallelRanks._join``) holding number 0; the next engine's rank 0 would name
    its group 1, its fresh ranks 0, and they would wait for each other's keys until the collective
    timeout. With no group left in this process, nothing else uses the count."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    world = getattr(distributed_c10d, "_world", None)
    if world is not None and not dist.is_initialized() and getattr(world, "group_count", 0):
        world.group_count = 0


def rank_device(config: Any, rank: int) -> torch.device:
    """The device of ``rank``: its host's GPU ``rank mod ranks per host`` on a GPU host (counting from the
    engine's ``cuda:N``), else the CPU."""
    device = torch.device(config.resolved_device())
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank % config.rendezvous().ranks_per_node)


def _test_failure(rank: int, where: str) -> None:
    """The ``TEST_FAIL_ENV`` hook: fail here if the environment asks rank ``rank`` to fail at ``where``."""
    spec = os.environ.get(TEST_FAIL_ENV, "")
    target, _, how = spec.partition(":")
    if not spec or target != str(rank):
        return
    if how == where:
        raise RuntimeError(f"{TEST_FAIL_ENV}={spec}: rank {rank} fails at '{where}'")
    if how == "exit" and where == "build":
        os._exit(3)


def run_rank(rank: int, size: int, init_method: str, config: Any, source: Any, report: Any = None) -> None:
    """Entry point of ranks 1 .. N-1: join the group, build this rank's part, follow rank 0's steps.
    ``report``: the write end of a pipe to rank 0 (None: none), which receives the type and message of
    an exception that ends this rank (rank 0 fails the engine's start, or its next step, with it)."""
    from plait.runtime.executor.model_runner import ModelRunner

    try:
        _test_failure(rank, "join")
        device = rank_device(config, rank)
        init_group(rank, size, init_method, device)
        _test_failure(rank, "build")
        runner = ModelRunner(dataclasses.replace(config, device=str(device)), source)
        follow(runner)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then raised (the process ends with it)
        if report is not None:
            try:
                report.send(f"{type(exc).__name__}: {exc}"[:2000])
            except (OSError, ValueError):  # rank 0 is gone: nobody to tell
                pass
        raise


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


def _start_local_ranks(config: Any, source: Any, ranks: range, init_method: str,
                       report: bool = False) -> tuple[list, list]:
    """Spawn ``ranks`` (``run_rank``); returns their processes and, with ``report``, the read ends of
    the pipes over which each reports the error that ends it (else Nones)."""
    ctx = multiprocessing.get_context("spawn")
    processes, readers = [], []
    for rank in ranks:
        reader, writer = ctx.Pipe(duplex=False) if report else (None, None)
        process = ctx.Process(target=run_rank, args=(rank, config.tp_size, init_method, config, source, writer),
                              name=f"plait-tp-rank-{rank}", daemon=True)
        try:
            start_process(process)
        finally:
            if writer is not None:
                writer.close()  # the rank's copy is the only one left: its exit closes the pipe
        processes.append(process)
        readers.append(reader)
    return processes, readers


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _leave_group() -> None:
    """Leave this process's torch.distributed group (as far as a broken one can be left) and its
    tensor-parallel group."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group cannot be torn down cleanly
            pass
    set_tensor_parallel(TensorParallelGroup())


def run_node(config: Any, source: Any) -> int:
    """A host other than host 0 (``node_rank`` > 0): run this host's ranks until rank 0 stops them;
    returns 0, or 1 when a rank failed (its error is logged). The first rank runs in this process."""
    place = config.rendezvous()
    if place.node_rank == 0:
        raise ValueError("node 0 runs the engine itself (Engine / plait serve); run_node is for node_rank > 0")
    first = place.global_rank(0)
    init_method = f"tcp://{place.address}"
    processes, _ = _start_local_ranks(config, source, range(first + 1, first + place.ranks_per_node), init_method)
    status = 0
    try:
        run_rank(first, config.tp_size, init_method, config, source)
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
    From ``start`` to ``stop`` a thread watches the ranks (``_watch``, module docstring: "Failures").
    One tensor-parallel engine per process (torch.distributed has one default group per process)."""

    def __init__(self, config: Any, source: Any):
        self.config, self.source = config, source
        self.size = config.tp_size
        self.processes: list[multiprocessing.Process] = []
        self.group: TensorParallelGroup | None = None
        self.failed: str | None = None
        self._journal: list | None = None
        self._lora_journal: list | None = None  # the LoRA manager's journal while attached
        self._lock = threading.Lock()
        self._failure = threading.Event()  # set once ``failed`` is
        self._joined_or_failed = threading.Event()
        self._abandoned = False  # start gave up (or stop ran): a join that completes later leaves again
        self._watcher: threading.Thread | None = None
        self._end_watch: Any = None  # closing this write end ends the watcher

    def start(self) -> None:
        """Start the other ranks and join the group with them; ``TensorParallelError`` naming the rank
        as soon as one of them fails or exits first (the others are killed)."""
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: one tensor-parallel "
                               "engine per process")
        place = self.config.rendezvous()
        if place.node_rank != 0:
            raise ValueError(f"node_rank {place.node_rank}: only node 0 runs the engine; the other hosts run "
                             "their ranks with `plait serve --node-rank R` (tensor_parallel.run_node)")
        init_method = _init_method(self.config)
        self.processes, readers = _start_local_ranks(self.config, self.source, range(1, place.ranks_per_node),
                                                     init_method, report=True)
        end_reader, self._end_watch = multiprocessing.Pipe(duplex=False)
        self._watcher = threading.Thread(target=self._watch, args=(readers, end_reader), name="plait-tp-watch",
                                         daemon=True)
        self._watcher.start()
        device = rank_device(self.config, 0)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this thread's device too (init_group sets the joining thread's)
        self.group = self._join(init_method, device)

    def _join(self, init_method: str, device: torch.device) -> TensorParallelGroup:
        """``init_group`` for rank 0, in a thread of its own, while this thread waits for it or for a
        rank's failure (the rendezvous and gloo's connection set-up wait up to ``COLLECTIVE_TIMEOUT_S``
        for a rank that never comes)."""
        outcome: dict[str, Any] = {}

        def join() -> None:
            try:
                group = init_group(0, self.size, init_method, device)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = exc
            else:
                with self._lock:
                    if self._abandoned:  # too late: the start already failed
                        _leave_group()
                    else:
                        outcome["group"] = group
            finally:
                self._joined_or_failed.set()

        threading.Thread(target=join, name="plait-tp-join", daemon=True).start()
        self._joined_or_failed.wait()
        with self._lock:
            if self.failed is None and "group" in outcome:
                return outcome["group"]
            self._abandoned = True
        if self.failed is not None:
            raise TensorParallelError(self.failed)
        raise outcome["error"]

    def _watch(self, readers: list, end: Any) -> None:
        """Until ``end`` closes: wait on every rank's process sentinel and report pipe; the first rank
        that reports an error or exits is recorded in ``failed`` and every rank is killed."""
        owner: dict[Any, int] = {}
        for index, (process, reader) in enumerate(zip(self.processes, readers)):
            owner[process.sentinel] = index
            if reader is not None:
                owner[reader] = index
        watched = [*owner, end]
        try:
            while True:
                ready = wait_for(watched)
                if end in ready:
                    return
                for item in ready:
                    index = owner[item]
                    process, reader = self.processes[index], readers[index]
                    error = None
                    if reader is not None and reader in watched:
                        try:
                            if reader.poll():
                                error = reader.recv()
                        except (EOFError, OSError):  # the rank closed its end: it is exiting
                            watched.remove(reader)
                    if error is None and process.is_alive():
                        continue  # only its pipe closed; its sentinel says when it has exited
                    status = _exit_status(process.exitcode)
                    what = f"failed: {error}" if error is not None else f"exited ({status})"
                    self._fail(f"tensor-parallel rank {index + 1} {what}")
                    for other in self.processes:
                        other.kill()
                    return
        finally:
            end.close()
            for reader in readers:
                if reader is not None:
                    reader.close()

    def _fail(self, reason: str) -> None:
        """Record the first failure (later ones are its consequences)."""
        with self._lock:
            if self.failed is None:
                self.failed = reason
        self._failure.set()
        self._joined_or_failed.set()

    def _stop_watching(self) -> None:
        if self._end_watch is not None:
            self._end_watch.close()
            self._end_watch = None
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None

    def attach(self, runner: Any) -> None:
        """From now on every forward of ``runner`` first sends its step to the other ranks."""
        self._journal = runner.slot_table.journal = []
        self._lora_journal = None
        if runner.lora is not None:  # the start-up adapters every rank registered itself
            self._lora_journal = runner.lora.journal = []
        runner.before_forward = self.send_step

    def first_error(self, exc: BaseException) -> str:
        """Why the start failed: the first rank that failed (a moment is given for a rank whose failure
        broke rank 0's start to be noticed), else ``exc``."""
        if self._failure.wait(timeout=3 if self.processes else 0):
            return self.failed
        return f"rank 0: {type(exc).__name__}: {exc}"

    def check(self) -> None:
        """Raise ``TensorParallelError`` if a rank has failed or exited (as the watcher saw)."""
        if self.failed is not None:
            raise TensorParallelError(self.failed)

    def failure_behind(self, exc: BaseException) -> TensorParallelError | None:
        """After a step raised ``exc`` (a collective inside the forward, say): the rank failure behind it,
        if a rank has failed or exits within a moment (the watcher names it), else None."""
        if self.failed is None and not self._failure.wait(timeout=2):
            return None
        return TensorParallelError(self.failed)

    def send_step(self, batch: ForwardBatch) -> None:
        self.check()
        writes, self._journal[:] = list(self._journal), []
        lora_changes = None
        if self._lora_journal:
            lora_changes, self._lora_journal[:] = list(self._lora_journal), []
        try:
            _broadcast(StepMessage.of(batch, writes, lora_changes), self.group.cpu_group)
        except Exception as exc:  # noqa: BLE001 - a broken group: no further step can run
            if self.failure_behind(exc) is None:
                self._fail(f"tensor-parallel group broke: {type(exc).__name__}: {exc}")
            raise TensorParallelError(self.failed) from exc

    def stop(self, graceful: bool = True) -> None:
        """Tell the other ranks to stop (``graceful``; else, as after a failed start whose ranks may be
        mid-collective, kill them), wait for them (killing any that do not end), leave the group."""
        self._stop_watching()  # the ranks' exits from here on are no failure
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
        with self._lock:
            self._abandoned = True  # a join still under way leaves by itself
            _leave_group()
        self.group = None
        self.processes = []
