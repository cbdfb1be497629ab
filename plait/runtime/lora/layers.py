"""``LoraLinear``: a base linear layer plus the LoRA terms of the adapters in the batch.

The model file stays plain: the adapter manager wraps the targeted linears of a built model (a
transform, as quantization is). Each wrapped layer adds, for every shard it packs (q/k/v of
``qkv_proj``, gate/up of ``gate_up_proj``, or the whole output), ``lora_expand(lora_shrink(x))`` at the
shard's column offset, with each token's adapter slot from the manager (-1: the base model, no term).

Under tensor parallelism the manager's buffers hold this rank's part of each adapter (``LoraManager``):
a column-parallel linear's LoRA term is this rank's columns of it, and a row-parallel linear's
(``RowParallelLinear``: ``o_proj``, ``down_proj``) is added to this rank's partial output before the
group's sum, so the sum carries the whole term with no collective of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from plait.runtime.lora.manager import LoraManager


class LoraLinear(nn.Module):
    """``base(x)`` plus each shard's LoRA term. ``shards``: (module name, column offset) per packed shard;
    the A/B buffers of (``layer_id``, module) are the manager's stacked slot buffers."""

    def __init__(self, base: nn.Module, manager: LoraManager, layer_id: int, shards: list[tuple[str, int]]):
        super().__init__()
        self.base = base
        self.layer_id = layer_id
        self.shards = shards
        self._manager = [manager]  # a list: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:  # what code reading the base layer's weight expects
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from plait.runtime.layers.linear import RowParallelLinear

        row_parallel = isinstance(self.base, RowParallelLinear)
        y = self.base.partial(x) if row_parallel else self.base(x)
        manager = self._manager[0]
        slots = manager.slots_for(x.shape[0])
        if slots is not None:  # None: no adapter in this step (eager), the base model's output
            from plait.runtime.kernels.lora import lora_expand, lora_shrink

            for module, offset in self.shards:
                a, b = manager.buffers(self.layer_id, module)
                h = lora_shrink(x, a, slots)  # [T, max_rank] float32
                lora_expand(h, b, slots, manager.scaling, y, column_offset=offset)
        return self.base.finish(y) if row_parallel else y
