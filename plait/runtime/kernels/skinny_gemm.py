"""Linear layers of a batched decode step (y [M, N] = x [M, K] @ W^T, W [N, K], M of 16-256 rows):
a Triton GEMM whose operand tiles come in through the Hopper tensor-memory accelerator (TMA).

At these batch sizes a decode step's GEMMs read every weight once and do little arithmetic per byte
(M FLOPs per weight byte, under the H200's ~200 at M <= 128), so they should run near the card's read
bandwidth. cuBLAS reaches 0.75-0.8 of it on the Llama-3.1-8B shapes at batch 64-128.
``choose_skinny_gemm`` times this kernel's candidate tilings against cuBLAS per shape and row count at
load and returns the tiling to use, or None where cuBLAS is as fast (as ``gemv.choose_gemv`` does
for batch 1).

Each program computes one ``BLOCK_M x BLOCK_N`` tile of y over the whole of K (no split-K pass);
programs that share a weight tile (several row blocks) are adjacent in launch order, so the second
read of a weight tile hits the L2 cache. Rows and columns past the ends are zero-filled on load and
clipped on store by the TMA unit, so any M, N and K (K a multiple of 8: 16-byte rows) are served.
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
    y_desc = TensorDescriptor.from_tensor(y, [c.block_m, c.block_n])
    grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
    _skinny_gemm_kernel[grid](x_desc, w_desc, y_desc, m, n, k, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
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
