"""Zero-filled buffers for the KV pool and the request-to-slot tables."""

from __future__ import annotations

import math
import mmap

import torch


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``; on the CPU its memory is an anonymous private
    ``mmap``: pages that the OS maps and zero-fills only when first written. A CPU KV pool of
    ``kv_cache_gb`` and a slot table of every (request, position) then cost resident memory and
    start-up time only for the slots written, where ``torch.zeros`` writes (and keeps resident) all of
    it at construction. Unlike ``calloc``, which reuses (and must clear) heap pages once the allocator
    holds freed memory, a fresh mapping is untouched whatever the process did before. The mapping is
    unmapped when the last tensor viewing it is freed. Other devices allocate as ``torch.zeros`` does."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)  # page-aligned, zero-filled on touch
    return raw.view(dtype).view(shape)
