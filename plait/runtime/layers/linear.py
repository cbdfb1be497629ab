"""Linear layers whose parameters know how to load themselves.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)``; packed layers (q/k/v, gate/up)
declare their shards once and copy each checkpoint tensor into its slice. ``loaded`` is a tensor or, on
a rank of a tensor-parallel group, a ``loader.LazyTensor``: loaders narrow it to the rows or columns
they keep before ``materialized`` reads it, so a rank reads only its part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from plait.runtime.executor.loader import CheckpointTensor, materialized

# MKL's plain sgemm is slow for a handful of rows (batched decode on CPU); a weight prepacked for
# small batches runs those shapes 2-3x faster. Outside this row range plain F.linear is as fast.
PACKED_MIN_ROWS, PACKED_MAX_ROWS = 2, 16


def mkl_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """An MKL-prepacked copy of a float32 CPU weight for small-batch GEMMs, or None where unavailable."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkl.is_available():
        return None
    try:
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, PACKED_MAX_ROWS // 2)
    except (RuntimeError, AttributeError):
        return None


def apply_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None,
    gemv_config: object | None = None,
) -> torch.Tensor:
    """x [M, in] @ weight^T (+ bias): through the prepacked weight when M is small (CPU), through the
    tuned Triton GEMV when M is 1 and tuning chose one (GPU), else ``F.linear``."""
    if gemv_config is not None and x.shape[0] == 1:
        from plait.runtime.kernels.gemv import gemv

        return gemv(x, weight, bias, gemv_config)
    if packed is not None and PACKED_MIN_ROWS <= x.shape[0] <= PACKED_MAX_ROWS:
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])
    return F.linear(x, weight, bias)


def default_weight_loader(param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
    """The whole checkpoint tensor into ``param`` (same shape; a replicated parameter reads it whole)."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(materialized(loaded))


class Linear(nn.Module):
    """y = x W^T (+ b); W is [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # set by prepack() after loading
        self.gemv_config = None  # set by tune_gemv() on CUDA: the batch-1 Triton tiling, or None for cuBLAS

    def prepack(self) -> None:
        """Prepare the small-batch CPU fast path (call once the weights are final)."""
        self.packed_weight = mkl_pack(self.weight.data)

    def tune_gemv(self) -> None:
        """Pick the batch-1 kernel for this shape on this GPU (Triton GEMV or cuBLAS), by timing both."""
        from plait.runtime.kernels.gemv import choose_gemv

        self.gemv_config = choose_gemv(self.weight.data, None if self.bias is None else self.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias, self.packed_weight, self.gemv_config)


class MergedLinear(Linear):
    """Several linear maps of the same input packed along the output dim (q/k/v, gate/up).

    ``shards`` maps a shard id (e.g. "q") to its output size, in packing order. Column-parallel
    (tensor parallelism): ``checkpoint_rows`` maps a shard id to the first of the checkpoint tensor's
    rows that this rank holds (its count is the shard's size); the rest of the tensor is not kept.
    """

    def __init__(self, in_features: int, shards: Sequence[tuple[object, int]], bias: bool = False,
                 checkpoint_rows: dict[object, int] | None = None):
        super().__init__(in_features, sum(size for _, size in shards), bias)
        self.checkpoint_rows = checkpoint_rows or {}
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shards:
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        start = self.checkpoint_rows.get(shard_id)
        if start is not None:
            if loaded.shape[0] < start + size:
                raise ValueError(f"shard {shard_id!r}: checkpoint has {loaded.shape[0]} rows, this rank needs rows "
                                 f"{start}..{start + size}")
            loaded = loaded.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard_id!r}: parameter slice {tuple(target.shape)} vs {tuple(loaded.shape)}")
        target.copy_(materialized(loaded))


class RowParallelLinear(Linear):
    """Tensor parallelism's row-parallel linear (``o_proj``, ``down_proj``): this rank holds the input
    columns ``input_start .. input_start + in_features`` of the checkpoint's weight, multiplies its
    part of the input, and the partial outputs are summed over the group (all-reduce); the bias, whole
    on every rank, is added once after the sum."""

    def __init__(self, in_features: int, out_features: int, input_start: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.input_start = input_start
        self.weight.weight_loader = self._load_columns

    def _load_columns(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if loaded.dim() != 2 or loaded.shape[1] < self.input_start + self.in_features:
            raise ValueError(f"checkpoint weight {tuple(loaded.shape)} lacks input columns "
                             f"{self.input_start}..{self.input_start + self.in_features}")
        default_weight_loader(param, loaded.narrow(1, self.input_start, self.in_features))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial output (its input columns' share), before the sum over the group."""
        return apply_linear(x, self.weight, None, self.packed_weight, self.gemv_config)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The partial outputs summed over the group (all-reduce), plus the bias."""
        from plait.runtime.distributed import all_reduce

        y = all_reduce(y)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.partial(x))


class VocabParallelEmbedding(nn.Module):
    """Tensor parallelism's vocabulary-parallel embedding: this rank holds ``count`` rows of the
    checkpoint's table from ``start`` in a table of ``rows`` (the vocabulary padded to a multiple of
    the group; rows past the vocabulary stay zero). Tokens outside its rows embed to zero here and the
    ranks' embeddings are summed (all-reduce). The LM head of a tied model uses the same rows."""

    def __init__(self, rows: int, hidden_size: int, start: int, count: int):
        super().__init__()
        self.start, self.count = start, count
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load_rows

    def _load_rows(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if loaded.dim() != 2 or loaded.shape[0] < self.start + self.count or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"checkpoint table {tuple(loaded.shape)} does not hold rows {self.start}.."
                             f"{self.start + self.count} of width {param.shape[1]}")
        param.data.zero_()
        param.data[: self.count].copy_(materialized(loaded.narrow(0, self.start, self.count)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from plait.runtime.distributed import all_reduce

        local = ids - self.start
        outside = (local < 0) | (local >= self.count)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


class VocabParallelLMHead(VocabParallelEmbedding):
    """The LM head's rows of this rank (as ``VocabParallelEmbedding`` splits them), untied."""
