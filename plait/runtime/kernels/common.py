"""Checks shared by the attention kernels' Python wrappers."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def cache_values(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the KV cache's element type; into FP8 saturated at the format's largest finite value
    (what the Triton writers do, ``kv_store.to_cache_dtype``; torch's own cast gives e5m2 infinities)."""
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        x = x.float().clamp(-limit, limit)
    return x.to(dtype)


def compute_dtype(q: torch.Tensor, k_buffer: torch.Tensor) -> torch.dtype:
    """The dtype the attention kernels multiply in: the cache's, except that an FP8 cache is read in
    ``q``'s dtype (``EngineConfig.kv_cache_dtype``)."""
    return q.dtype if k_buffer.dtype in FP8_DTYPES else k_buffer.dtype


def check_attention_inputs(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> torch.Tensor:
    """Validate q [N, H, D] against the pool buffers [S, KVH, D]; returns q with a unit last stride."""
    H, D = q.shape[1], q.shape[2]
    KVH = k_buffer.shape[1]
    if H % KVH != 0:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {KVH}")
    if k_buffer.shape[2] != D or v_buffer.shape[2] != D:
        raise ValueError(f"head_dim mismatch: q {D}, k {k_buffer.shape[2]}, v {v_buffer.shape[2]}")
    return q if q.stride(-1) == 1 else q.contiguous()


def attention_rows_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain float32 attention of one request's queries to its keys (the kernels' references use it).

    Args:
        q: [E, H, D] queries at absolute positions ``q_positions`` [E].
        k, v: [S, KVH, D] the request's keys and values at positions ``0 .. S - 1``.
        scale: softmax scale.
        sliding_window: the query at position ``i`` sees the keys ``j`` with ``i - W < j <= i``
            (transformers' ``sliding_window_causal``); None: every ``j <= i``.
        sinks: [H] per-head sink logits, one more softmax term per head that adds no value.

    Returns:
        [E, H, D] float32.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # [S, H, D]
    v = v.float().repeat_interleave(group, dim=1)  # [S, H, D]
    scores = torch.einsum("ehd,shd->hes", q.float(), k) * scale  # [H, E, S]
    q_pos = q_positions.to(q.device)[:, None]  # [E, 1]
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]  # [1, S]
    allowed = k_pos <= q_pos  # [E, S]
    if sliding_window is not None:
        allowed &= q_pos - k_pos < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_col = sinks.float().to(q.device)[:, None, None].expand(-1, scores.shape[1], 1)  # [H, E, 1]
        scores = torch.cat((scores, sink_col), dim=-1)  # [H, E, S + 1]
    probs = scores.softmax(-1).nan_to_num(0.0)  # a query that sees nothing gets zeros
    return torch.einsum("hes,shd->ehd", probs[..., : k.shape[0]], v)


def check_window_sinks(sliding_window: int | None, sinks: torch.Tensor | None, num_heads: int) -> int:
    """Validate the attention options on the host (shapes only, no device read); returns the window
    as the kernels' int argument (0 when there is none)."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != num_heads or sinks.stride(0) != 1):
        raise ValueError(f"sinks must be a contiguous [{num_heads}] tensor, got shape {tuple(sinks.shape)}")
    return 0 if sliding_window is None else int(sliding_window)
