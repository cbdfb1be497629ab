"""Tensor parallelism: which part of a model one rank holds, and the collectives that join the parts.

A tensor-parallel group of ``size`` ranks runs one model: attention heads, the MLP's intermediate
columns and the vocabulary are split across ranks (Megatron-LM's column- and row-parallel layers, as
vLLM and SGLang do); after each row-parallel layer (``o_proj``, ``down_proj``) and after the
vocabulary-parallel embedding the partial results are summed with an all-reduce, and the LM head's
logits are gathered. The group is torch.distributed's (NCCL on GPUs, gloo on the CPU).

``TensorParallelLayout`` says which heads, columns and vocabulary rows a rank holds. Splits need not be
even: query heads follow their key/value head (grouped-query attention), so a model with 3 KV heads
over 2 ranks puts 2 KV heads (and their query heads) on rank 0 and 1 on rank 1. With fewer KV heads
than ranks each KV head is replicated on ``size / num_kv_heads`` ranks and the query heads are split
evenly (then ``size`` must be a multiple of the KV heads, and the query heads of ``size``).

Mixture-of-experts layers are split as SGLang's MoE tensor parallelism does by default: every rank
holds every expert, each expert's intermediate dimension split across ranks (gate/up rows
column-parallel, down columns row-parallel), the router whole on every rank, one all-reduce after the
layer. MXFP4 experts are split in whole 32-value scale blocks (``moe_split_granule``); a split need
not be even (rank 0 takes the extra blocks). Expert parallelism (whole experts per rank) is not built.

The rank's group is process-wide state (``set_tensor_parallel``), read when a model is built and by
the collectives; without one, a model is whole (rank 0 of 1) and the collectives do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from plait.runtime.models.config import ModelConfig


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in a tensor-parallel group. ``group``: the torch.distributed process group
    of the model's collectives (None: the default group, or none at all when ``size`` is 1);
    ``cpu_group``: a gloo group for host-side messages (each step's batch, start-up agreements), the
    same group on the CPU."""

    rank: int = 0
    size: int = 1
    group: Any = None
    cpu_group: Any = None


_CURRENT = TensorParallelGroup()


def set_tensor_parallel(group: TensorParallelGroup) -> None:
    """Make ``group`` this process's tensor-parallel group (before a model is built)."""
    global _CURRENT
    if not 0 <= group.rank < group.size:
        raise ValueError(f"tensor-parallel rank {group.rank} is outside a group of {group.size}")
    _CURRENT = group


def tensor_parallel() -> TensorParallelGroup:
    """This process's tensor-parallel group (rank 0 of 1 unless ``set_tensor_parallel`` said otherwise)."""
    return _CURRENT


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group, in place; returns it (unchanged in a group of one)."""
    tp = _CURRENT
    if tp.size > 1:
        import torch.distributed as dist

        dist.all_reduce(x, group=tp.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` [..., n] side by side along the last dim: [..., size * n] (``x`` in a group of one)."""
    tp = _CURRENT
    if tp.size == 1:
        return x
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, count) of part ``index`` when ``total`` items are split into ``parts`` consecutive parts
    whose sizes differ by at most one (the first ``total % parts`` parts get one more)."""
    base, extra = divmod(total, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


@dataclass(frozen=True)
class TensorParallelLayout:
    """The slices of a model that one rank of a tensor-parallel group holds (starts and counts in the
    checkpoint's numbering). ``vocab_rows`` is the same on every rank (the vocabulary padded to a
    multiple of the group size); this rank's real rows are ``vocab_count`` from ``vocab_start``."""

    rank: int
    size: int
    head_start: int
    head_count: int
    kv_head_start: int
    kv_head_count: int
    intermediate_start: int
    intermediate_count: int
    vocab_start: int
    vocab_count: int
    vocab_rows: int
    moe_intermediate_start: int = 0  # this rank's slice of every expert's intermediate dim (MoE models)
    moe_intermediate_count: int = 0

    @classmethod
    def for_model(cls, cfg: ModelConfig, rank: int = 0, size: int = 1) -> TensorParallelLayout:
        """The layout of rank ``rank`` of ``size``; ValueError when the model cannot be split that way."""
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank} of {size} is not a valid place in a group")
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads do not group evenly over {kv_heads} key/value heads")
        group = heads // kv_heads  # query heads per KV head
        if kv_heads >= size:
            kv_start, kv_count = split_range(kv_heads, size, rank)
            head_start, head_count = kv_start * group, kv_count * group
        else:
            if size % kv_heads or heads % size:
                raise ValueError(
                    f"tensor parallelism of {size}: the model's {kv_heads} key/value heads are fewer than the ranks, "
                    f"so the ranks must be a multiple of them and divide its {heads} query heads")
            head_start, head_count = split_range(heads, size, rank)
            kv_start, kv_count = head_start // group, 1
        if cfg.intermediate_size < size:
            raise ValueError(f"an intermediate size of {cfg.intermediate_size} cannot be split over {size} ranks")
        inter_start, inter_count = split_range(cfg.intermediate_size, size, rank)
        vocab_rows = -(-cfg.vocab_size // size)
        vocab_start = min(rank * vocab_rows, cfg.vocab_size)
        vocab_count = min(vocab_rows, cfg.vocab_size - vocab_start)
        moe_start, moe_count = _moe_split(cfg, rank, size)
        return cls(rank, size, head_start, head_count, kv_start, kv_count, inter_start, inter_count,
                   vocab_start, vocab_count, vocab_rows, moe_start, moe_count)

    @property
    def moe_intermediate_range(self) -> tuple[int, int]:
        """[start, end) of every expert's intermediate dimension that this rank holds."""
        return self.moe_intermediate_start, self.moe_intermediate_start + self.moe_intermediate_count

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` with this rank's head counts and (dense) intermediate size (what its layers, attention
        backend and KV cache are sized by); the vocabulary, hidden size and ``moe`` stay the model's (a
        MoE layer takes its slice of the experts from ``moe_intermediate_range``)."""
        import dataclasses

        if self.size == 1:
            return cfg
        return dataclasses.replace(cfg, num_heads=self.head_count, num_kv_heads=self.kv_head_count,
                                   intermediate_size=self.intermediate_count)


def moe_split_granule(cfg: ModelConfig) -> int:
    """The unit in which an expert's intermediate dimension is split across ranks: MXFP4 experts in
    whole scale blocks (32 values share a scale, and the down projection's codes are stored per
    block), experts in the model dtype in single rows."""
    from plait.runtime.kernels.mxfp4 import BLOCK_SIZE

    return BLOCK_SIZE if cfg.quantization == "mxfp4" else 1


def _moe_split(cfg: ModelConfig, rank: int, size: int) -> tuple[int, int]:
    """(start, count) of the experts' intermediate dimension on ``rank`` of ``size`` ((0, 0) without
    experts); ValueError naming the sizes when it does not split into whole granules on every rank."""
    if cfg.moe is None:
        return 0, 0
    total, granule = cfg.moe.intermediate_size, moe_split_granule(cfg)
    if total % granule:
        raise ValueError(f"the experts' intermediate size {total} is not a multiple of {granule} "
                         f"(MXFP4 scale blocks), so it cannot be split over ranks")
    units = total // granule
    if units < size:
        unit = "intermediate rows" if granule == 1 else f"blocks of {granule}"
        raise ValueError(f"the experts' intermediate size {total} ({units} {unit}) cannot be split over {size} ranks")
    start, count = split_range(units, size, rank)
    return start * granule, count * granule
