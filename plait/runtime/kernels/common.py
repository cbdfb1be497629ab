"""Checks shared by the attention kernels' Python wrappers."""

from __future__ import annotations

import torch


def check_attention_inputs(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> torch.Tensor:
    """Validate q [N, H, D] against the pool buffers [S, KVH, D]; returns q with a unit last stride."""
    H, D = q.shape[1], q.shape[2]
    KVH = k_buffer.shape[1]
    if H % KVH != 0:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {KVH}")
    if k_buffer.shape[2] != D or v_buffer.shape[2] != D:
        raise ValueError(f"head_dim mismatch: q {D}, k {k_buffer.shape[2]}, v {v_buffer.shape[2]}")
    return q if q.stride(-1) == 1 else q.contiguous()
