"""Zero-filled buffers for the KV pool and the request-to-slot tables."""

from __future__ import annotations

import math

import numpy as np
import torch


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``; on the CPU its memory comes from ``calloc``
    (through numpy), whose large blocks are fresh pages that the OS zero-fills on first touch. A CPU KV
    pool of ``kv_cache_gb`` and a slot table of every (request, position) then cost resident memory
    and start-up time only for the slots written, where ``torch.zeros`` writes (and keeps resident) all
    of it at construction. Other devices allocate as ``torch.zeros`` does."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.zeros(math.prod(shape) * itemsize, dtype=np.uint8))  # numpy aligns to 16 bytes
    return raw.view(dtype).view(shape)
