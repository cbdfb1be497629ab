"""Batch-1 linear layer (GEMV): y [1, N] = x [1, K] @ W^T (+ b), W [N, K] row-major, fp32 accumulation.

Batch-1 decode reads every weight once per token, so each linear should run at the card's read
bandwidth. cuBLAS does that for the large shapes but not for every one (on an H100 the 8B model's
4096x4096 ``o_proj`` ran at 1.2 TB/s against 2.8 TB/s for ``gate_up``). ``choose_gemv`` times this
kernel's candidate tilings against cuBLAS on the actual shape, once per shape at model load, and
returns the tiling to use, or None where cuBLAS is as fast.

Each program reduces ``BLOCK_N`` output rows over the whole of K in ``BLOCK_K`` chunks: the loads
along K are contiguous (coalesced, 16 bytes per thread at ``BLOCK_K >= 8 * 32``), every weight byte
is read once, and there is no split-K reduction pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    """A tiling of the GEMV kernel: rows per program, K chunk, warps per program."""

    block_n: int
    block_k: int
    num_warps: int


# Tilings tried by ``choose_gemv``; few, so that tuning at load compiles only a handful of kernels.
CANDIDATES = (
    GemvConfig(4, 512, 4),
    GemvConfig(8, 512, 4),
    GemvConfig(8, 256, 4),
    GemvConfig(16, 256, 8),
    GemvConfig(2, 1024, 4),
    GemvConfig(4, 1024, 8),
)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    safe_rows = tl.where(row_ok, rows, 0)  # out-of-range rows read row 0 and are never stored
    w_rows = w_ptr + safe_rows.to(tl.int64)[:, None] * stride_w  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + cols)
            w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
        else:
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=col_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + safe_rows).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [1, K={weight.shape[1]}], got {tuple(x.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight with unit stride along K")
    x = x.contiguous()
    N, K = weight.shape
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, config.block_n),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, y, N, K, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=K % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )
    return y


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The torch reference: float32 accumulation, cast to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _time_ms(fn, weights: list[torch.Tensor], reps: int = 40) -> float:
    """GPU time of one call: ``reps`` calls (rotating weight copies, so L2 does not hold them) captured
    in a CUDA graph, best of 5 replays. Timing eager launches instead would measure the host's launch
    rate for these few-microsecond kernels (a Triton launch costs more host time than a cuBLAS one),
    not what a decode graph replays."""
    for _ in range(2):
        for w in weights:
            fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    del graph
    return best


_CHOICES: dict[tuple, GemvConfig | None] = {}
_TIMINGS: dict[tuple, tuple[float, float]] = {}  # key -> (cuBLAS ms, chosen ms)


def choose_gemv(weight: torch.Tensor, bias: torch.Tensor | None, min_gain: float = 0.03) -> GemvConfig | None:
    """The fastest tiling for batch-1 ``x @ weight^T`` on this GPU, or None where cuBLAS is as fast.

    Timed once per (shape, dtype, bias, device) on scratch copies of the weight's shape (several of
    them, so the weight does not sit in L2); the result is cached. A tiling must beat cuBLAS by
    ``min_gain`` (a fraction) to be chosen, and must match the torch reference.
    """
    key = (tuple(weight.shape), weight.dtype, bias is not None, weight.device)
    if key in _CHOICES:
        return _CHOICES[key]
    nbytes = weight.numel() * weight.element_size()
    copies = max(2, min(8, (256 << 20) // max(nbytes, 1)))  # >= 256 MB in rotation, 2..8 copies
    gen = torch.Generator(device=weight.device).manual_seed(0)
    scratch = [torch.randn(weight.shape, device=weight.device, dtype=weight.dtype, generator=gen) * 0.02
               for _ in range(copies)]
    x = torch.randn(1, weight.shape[1], device=weight.device, dtype=weight.dtype, generator=gen)
    b = None if bias is None else torch.randn_like(bias)
    torch.cuda.synchronize()
    cublas_ms = _time_ms(lambda w: torch.nn.functional.linear(x, w, b), scratch)
    best_cfg, best_ms = None, cublas_ms
    ref = gemv_ref(x, scratch[0], b).float()
    for cfg in CANDIDATES:
        out = gemv(x, scratch[0], b, cfg).float()
        if not torch.allclose(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            continue  # never pick a tiling that computes something else
        ms = _time_ms(lambda w, cfg=cfg: gemv(x, w, b, cfg), scratch)
        if ms < best_ms:
            best_cfg, best_ms = cfg, ms
    if best_cfg is not None:  # time cuBLAS again now that the GPU is warm; keep it unless clearly beaten
        cublas_ms = min(cublas_ms, _time_ms(lambda w: torch.nn.functional.linear(x, w, b), scratch))
        if best_ms > cublas_ms * (1 - min_gain):
            best_cfg = None
    del scratch
    _CHOICES[key] = best_cfg
    _TIMINGS[key] = (cublas_ms, best_ms if best_cfg is not None else cublas_ms)
    return best_cfg


def tuning_report() -> list[str]:
    """One line per tuned shape: the choice and its time against cuBLAS (for logs and benchmarks)."""
    lines = []
    for key, cfg in _CHOICES.items():
        cublas_ms, ms = _TIMINGS[key]
        shape = "x".join(map(str, key[0]))
        lines.append(f"gemv {shape}: {'cuBLAS' if cfg is None else cfg} {ms * 1e3:.1f} us (cuBLAS {cublas_ms * 1e3:.1f} us)")
    return lines
