"""ForwardBatch: everything one forward pass needs, passed explicitly (never through globals)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without making the host wait for the device.

    From pageable memory, CUDA synchronizes the stream before an "async" host-to-device copy, which
    stalls the host until every step already queued has run (that broke the overlap of scheduling
    with the device's work). Through pinned memory the copy is queued like a kernel; torch's caching
    host allocator does not reuse the pinned block until the copy has run. Other devices: returned as is.
    """
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def values_to_device(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small tensor of per-row values (a list) on ``device`` through ``host_to_device``: a plain
    ``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for every queued step."""
    return host_to_device(torch.tensor(values, dtype=dtype), torch.device(device))


@dataclass
class ForwardBatch:
    """One step's tokens, flattened over the requests in the batch.

    Row ``i`` contributes ``extend_lens[i]`` new tokens, starting at flat offset ``extend_starts[i]``,
    at positions ``prefix_lens[i] .. seq_lens[i] - 1``. A decode row has ``extend_lens[i] == 1``.
    Before the forward, the request-to-slot table already maps every position ``< seq_lens[i]`` of row
    ``req_rows[i]`` to a KV slot, and ``out_cache_loc`` holds the slots of the new tokens.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64, KV slot of each new token
    req_rows: torch.Tensor  # [B] int64, rows of the request-to-slot table
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    extend_starts: list[int]
    logits_indices: torch.Tensor  # [N] int64, flat token indices whose logits are needed
    pool: Any  # KVPool
    slot_table: torch.Tensor  # [max_requests, max_context_len] request-to-slot table
    attn_metadata: Any = field(default=None)
    # a hybrid KV pool (KVPool.hybrid): the sliding-window layers' table and new-token slots; else None
    sliding_slot_table: torch.Tensor | None = None
    sliding_out_cache_loc: torch.Tensor | None = None
    # LoRA: each token's adapter slot (int32 [T], -1: the base model), or None when no token has an adapter
    lora_slots: torch.Tensor | None = None

    def kv_slots(self, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(request-to-slot table, new tokens' slots) for a layer with this window: the sliding ones
        where the pool keeps sliding-window layers apart (their buffers are indexed by sliding slots)."""
        if sliding_window is not None and self.sliding_slot_table is not None:
            assert self.sliding_out_cache_loc is not None
            return self.sliding_slot_table, self.sliding_out_cache_loc
        return self.slot_table, self.out_cache_loc

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.extend_lens)
