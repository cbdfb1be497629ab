"""Linear layers of a batched decode step (y [M, N] = x [M, K] @ W^T, W [N, K], M of 16-256 rows):
a Triton GEMM whose operand tiles come in through the Hopper tensor-memory accelerator (TMA).

At these batch sizes a decode step's GEMMs read every weight once and do little arithmetic per byte
(M FLOPs per weight byte, under the H200's ~200 at M <= 128), so they should run near the card's read
bandwidth. cuBLAS reaches 0.84-0.92 of it on wide shapes (Llama-3.1-8B's gate_up, lm_head) but only
0.6-0.77 on narrow ones (o, qkv, down): an N of 4096-6144 cut into output tiles gives too few programs
to keep 132 SMs reading.

Two kernels:

- ``split_k == 1``: each program computes one ``BLOCK_M x BLOCK_N`` tile of y over the whole of K;
  programs that share a weight tile (several row blocks) are adjacent in launch order, so the second
  read of a weight tile hits the L2 cache.
- ``split_k > 1`` (serial split-K, as CUTLASS's "split-K serial"): each tile's K range is cut into
  ``split_k`` slices, one program each, so a narrow shape launches ``split_k`` times the programs.
  Every program writes its float32 partial tile to a workspace and counts itself in on the tile's
  counter; the last one to arrive adds the partials in slice order (deterministic: no float atomics)
  and writes y, then resets the counter for the next call (so CUDA graphs replay it as captured).
  The workspace and counters are one grow-only buffer per device (``_SplitKWorkspace``): GEMMs of one
  device must run on one stream at a time, as a model step's do.

Rows and columns past the ends are zero-filled on load and clipped on store by the TMA unit (or
masked), so any M, N and K (K a multiple of 8: 16-byte rows) are served.
``choose_skinny_gemm`` times the candidate tilings against cuBLAS per shape and row count and returns
the tiling to use, or None where cuBLAS is as fast (as ``gemv.choose_gemv`` does for batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass(frozen=True)
class SkinnyGemmConfig:
    """A tiling: output tile rows and columns, K chunk, pipeline stages, warps per program."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    split_k: int = 1  # programs per output tile, each over 1/split_k of K (serial split-K when > 1)

    def __str__(self) -> str:
        split = f" splitK{self.split_k}" if self.split_k > 1 else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} s{self.num_stages} w{self.num_warps}{split}"


@triton.jit
def _skinny_gemm_kernel(x_desc, w_desc, y_desc, M, N, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(M, BLOCK_M)
    m0 = (pid % row_blocks) * BLOCK_M  # row blocks of one weight tile run next to each other
    n0 = (pid // row_blocks) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        x = x_desc.load([m0, k0])
        w = w_desc.load([n0, k0])
        acc = tl.dot(x, w.T, acc)
    y_desc.store([m0, n0], acc.to(y_desc.dtype))


@triton.jit
def _skinny_gemm_split_k_kernel(x_desc, w_desc, y_ptr, partial_ptr, counter_ptr, M, N, K, k_per_split,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    split = pid % SPLIT_K  # the slices of one tile run next to each other: their partials meet in L2
    tile = pid // SPLIT_K
    row_blocks = tl.cdiv(M, BLOCK_M)
    m0 = (tile % row_blocks) * BLOCK_M
    n0 = (tile // row_blocks) * BLOCK_N
    k_start = split * k_per_split  # a multiple of BLOCK_K; the last slice's loads past K are zero-filled
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + k_per_split, BLOCK_K, num_stages=NUM_STAGES):
        x = x_desc.load([m0, k0])
        w = w_desc.load([n0, k0])
        acc = tl.dot(x, w.T, acc)
    rows = m0 + tl.arange(0, BLOCK_M)[:, None]
    cols = n0 + tl.arange(0, BLOCK_N)[None, :]
    inside = (rows < M) & (cols < N)
    offsets = rows * N + cols
    tl.store(partial_ptr + split * M * N + offsets, acc, mask=inside)
    tl.debug_barrier()  # every thread's partial is written before the program counts itself in
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:  # the last slice of this tile: add the partials in slice order
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(SPLIT_K):
            # .cg: read through L2, never a stale L1 line of another program's partial
            total += tl.load(partial_ptr + s * M * N + offsets, mask=inside, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + offsets, total.to(y_ptr.dtype.element_ty), mask=inside)
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next call


class _SplitKWorkspace:
    """Per device: float32 partial tiles and int32 per-tile counters (zero between calls), grown on demand.

    Grow it (``reserve``) before a CUDA graph is captured: a capture must not allocate it anew.
    """

    def __init__(self) -> None:
        self.partials: dict[torch.device, torch.Tensor] = {}
        self.counters: dict[torch.device, torch.Tensor] = {}

    def clear(self) -> None:
        """Drop every buffer (tuning grows them for every tiling it tries; reserve the chosen ones after)."""
        self.partials.clear()
        self.counters.clear()

    def reserve(self, device: torch.device, partial_floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        partials = self.partials.get(device)
        if partials is None or partials.numel() < partial_floats:
            partials = self.partials[device] = torch.empty(max(partial_floats, 1), dtype=torch.float32, device=device)
        counters = self.counters.get(device)
        if counters is None or counters.numel() < tiles:
            counters = self.counters[device] = torch.zeros(max(tiles, 1), dtype=torch.int32, device=device)
        return partials, counters


SPLIT_K_WORKSPACE = _SplitKWorkspace()


def reserve_workspace(config: SkinnyGemmConfig, rows: int, n: int, device: torch.device | str) -> None:
    """Grow the split-K workspace for ``rows x n`` outputs under ``config`` (call before graph capture)."""
    if config.split_k > 1:
        tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(n, config.block_n)
        SPLIT_K_WORKSPACE.reserve(torch.device(device), config.split_k * rows * n, tiles)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, config: SkinnyGemmConfig,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T through the TMA kernel with ``config``; bf16 or fp16, contiguous."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} columns but the weight has {weight.shape[1]}")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if out is None else out
    c = config
    x_desc = TensorDescriptor.from_tensor(x, [c.block_m, c.block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [c.block_n, c.block_k])
    tiles = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n)
    if c.split_k > 1:
        partials, counters = SPLIT_K_WORKSPACE.reserve(x.device, c.split_k * m * n, tiles)
        k_per_split = triton.cdiv(triton.cdiv(k, c.split_k), c.block_k) * c.block_k
        _skinny_gemm_split_k_kernel[(tiles * c.split_k,)](
            x_desc, w_desc, y, partials, counters, m, n, k, k_per_split, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            BLOCK_K=c.block_k, SPLIT_K=c.split_k, NUM_STAGES=c.num_stages, num_warps=c.num_warps)
        return y
    y_desc = TensorDescriptor.from_tensor(y, [c.block_m, c.block_n])
    _skinny_gemm_kernel[(tiles,)](x_desc, w_desc, y_desc, m, n, k, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                                  BLOCK_K=c.block_k, NUM_STAGES=c.num_stages, num_warps=c.num_warps)
    return y


def candidate_configs(rows: int) -> list[SkinnyGemmConfig]:
    """Tilings worth trying for ``rows`` output rows (block rows of 64 or 128, at most the rows rounded
    up to 64), within the H100/H200's 227 KiB of shared memory per block."""
    configs = []
    for block_m in (64, 128):
        if block_m > max(64, -(-rows // 64) * 64):
            continue
        for block_n in (64, 128, 256):
            for block_k in (64, 128):
                for stages in (3, 4, 5, 6):
                    smem = stages * (block_m + block_n) * block_k * 2 + block_m * block_n * 2
                    if smem > 220 * 1024:
                        continue
                    for warps in (4, 8):
                        configs.append(SkinnyGemmConfig(block_m, block_n, block_k, stages, warps))
    return configs


def split_k_configs(rows: int, n: int, k: int, sm_count: int = 132) -> list[SkinnyGemmConfig]:
    """Split-K tilings worth trying for a ``rows x n`` output over ``k``: those that launch between one
    and four waves of ``sm_count`` programs, each slice at least two K chunks long."""
    block_m = 64 if rows <= 64 else 128
    configs = []
    for block_n in (64, 128):
        tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
        for split in (2, 3, 4, 6, 8):
            if not sm_count <= tiles * split <= 4 * sm_count:
                continue
            for block_k, stages in ((64, 4), (128, 3)):
                if k // split < 2 * block_k:
                    continue
                configs.append(SkinnyGemmConfig(block_m, block_n, block_k, stages, 4, split))
    return configs


def chooser_candidates(rows: int, n: int, k: int, sm_count: int = 132) -> list[SkinnyGemmConfig]:
    """What ``choose_skinny_gemm`` times for one shape: a few whole-K tilings (the wide shapes' best in
    the sweep) and the split-K tilings that fill the card (the narrow shapes')."""
    block_m = 64 if rows <= 64 else 128
    whole_k = [SkinnyGemmConfig(block_m, block_n, 64, 4, 4) for block_n in (64, 128)]
    whole_k += [SkinnyGemmConfig(block_m, 256, 64, 3, 8)]
    return whole_k + split_k_configs(rows, n, k, sm_count)


# The engine tunes at these row counts; a batch of MIN_ROWS..64 rows uses the 64-row choice, 65..128 the
# 128-row one, 129..256 the 256-row one; fewer rows (GEMV-like) and more (prefill) stay on cuBLAS.
ROW_BUCKETS = [64, 128, 256]
MIN_ROWS = 33

_CHOICES: dict[tuple, SkinnyGemmConfig | None] = {}
_TIMINGS: dict[tuple, tuple[float, float]] = {}


def choose_skinny_gemm(weight: torch.Tensor, rows: int, min_gain: float = 0.03,
                       candidates: list[SkinnyGemmConfig] | None = None) -> SkinnyGemmConfig | None:
    """The fastest tiling for ``x [rows, K] @ weight^T`` on this GPU, or None where cuBLAS is as fast.

    Timed once per (shape, dtype, rows, device) on scratch copies of the weight's shape (enough of them
    that L2 does not hold them), each figure a CUDA-graph replay as a decode step runs it; the result
    is cached. A tiling must match the torch product and beat cuBLAS by ``min_gain`` (a fraction).
    Trying split-K tilings grows the shared workspace: once every shape is chosen, ``clear`` it and
    ``reserve_workspace`` the chosen tilings (``tune_table`` callers do), before any graph capture.
    """
    from plait.runtime.kernels.gemv import _time_ms

    n, k = weight.shape
    key = (n, k, weight.dtype, rows, weight.device)
    if key in _CHOICES:
        return _CHOICES[key]
    if k % 8 or weight.dtype not in (torch.bfloat16, torch.float16):
        _CHOICES[key] = None
        return None
    sm_count = torch.cuda.get_device_properties(weight.device).multi_processor_count
    nbytes = weight.numel() * weight.element_size()
    copies = max(2, min(8, (256 << 20) // max(nbytes, 1)))
    gen = torch.Generator(device=weight.device).manual_seed(0)
    scratch = [torch.randn(weight.shape, device=weight.device, dtype=weight.dtype, generator=gen) * 0.02
               for _ in range(copies)]
    x = torch.randn(rows, k, device=weight.device, dtype=weight.dtype, generator=gen)
    out = torch.empty(rows, n, device=weight.device, dtype=weight.dtype)
    cublas_ms = _time_ms(lambda w: torch.matmul(x, w.t(), out=out), scratch)
    ref = (x.float() @ scratch[0].float().t())
    best_cfg, best_ms = None, cublas_ms
    for cfg in candidates if candidates is not None else chooser_candidates(rows, n, k, sm_count):
        try:
            got = skinny_gemm(x, scratch[0], cfg).float()
        except Exception:  # noqa: BLE001 - a tiling this card cannot run (shared memory) is skipped
            continue
        if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            continue  # never pick a tiling that computes something else
        ms = _time_ms(lambda w, cfg=cfg: skinny_gemm(x, w, cfg, out=out), scratch)
        if ms < best_ms:
            best_cfg, best_ms = cfg, ms
    if best_cfg is not None:  # cuBLAS again, the GPU now warm: keep it unless clearly beaten
        cublas_ms = min(cublas_ms, _time_ms(lambda w: torch.matmul(x, w.t(), out=out), scratch))
        if best_ms > cublas_ms * (1 - min_gain):
            best_cfg = None
    del scratch
    _CHOICES[key] = best_cfg
    _TIMINGS[key] = (cublas_ms, best_ms if best_cfg is not None else cublas_ms)
    return best_cfg


def tuning_report() -> list[str]:
    """One line per tuned (shape, rows): the choice and its time against cuBLAS."""
    lines = []
    for (n, k, _dtype, rows, _device), cfg in _CHOICES.items():
        if (n, k, _dtype, rows, _device) not in _TIMINGS:
            continue
        cublas_ms, ms = _TIMINGS[(n, k, _dtype, rows, _device)]
        lines.append(f"skinny gemm {n}x{k} rows {rows}: {'cuBLAS' if cfg is None else cfg} {ms * 1e3:.1f} us "
                     f"(cuBLAS {cublas_ms * 1e3:.1f} us)")
    return lines


class SkinnyGemmTable:
    """A linear layer's tuned tilings by row count: ``(max_rows, config or None)`` ascending; a batch
    of M rows uses the first entry with M <= max_rows, cuBLAS past the last or where config is None."""

    def __init__(self, entries: list[tuple[int, SkinnyGemmConfig | None]], min_rows: int):
        self.entries = sorted(entries, key=lambda e: e[0])
        self.min_rows = min_rows

    def lookup(self, rows: int) -> SkinnyGemmConfig | None:
        if rows < self.min_rows:
            return None
        for max_rows, config in self.entries:
            if rows <= max_rows:
                return config
        return None

    def __bool__(self) -> bool:
        return any(config is not None for _, config in self.entries)


def tune_table(weight: torch.Tensor, row_buckets: list[int], min_rows: int) -> SkinnyGemmTable | None:
    """Tune ``weight``'s shape at each row count of ``row_buckets`` (a batch uses the tiling of the
    smallest bucket at or above its rows); None when cuBLAS wins everywhere."""
    table = SkinnyGemmTable([(rows, choose_skinny_gemm(weight, rows)) for rows in row_buckets], min_rows)
    return table if table else None
