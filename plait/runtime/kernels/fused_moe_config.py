"""Tile sizes of the fused MoE kernels: the config type, the measured table, the fallback heuristic.

``FusedMoeConfig`` fixes ``block_m`` (rows of one expert per program, shared by both GEMMs since the
pairs are padded to it once) and a ``TileConfig`` for each GEMM. ``TUNED`` holds winners measured
on an H200 by ``benchmarks/moe_kernel.py --tune`` keyed by ``MoeShape`` and a token bucket; shapes
not in it get ``default_config``. Decode (few rows per expert) is bound by the bytes of the experts
touched, so it wants ``block_m = 16`` (the smallest MMA tile) and enough programs along N to keep
every SM streaming weights; prefill is bound by the MMAs, so it wants large tiles.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """One GEMM's tiling: output columns and reduction chunk per program, warps, pipeline stages, and
    ``split_k``: the reduction split over that many programs (float32 partial sums, added by a small
    second pass), for decode where too few programs stream the weights to hide memory latency.
    ``max_registers``: a cap on registers per thread (the compiler's ``maxnreg``; None: its own choice), so
    that more programs fit on an SM where the compiler's choice leaves too few to hide latency (compiled
    kernels only; the interpreter ignores it)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    max_registers: int | None = None

    def __post_init__(self) -> None:
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.max_registers is not None and not 24 <= self.max_registers <= 255:
            raise ValueError(f"max_registers must be in [24, 255], got {self.max_registers}")

    def launch_options(self, compiled: bool) -> dict:
        """Triton launch options for this tiling: warps, stages and, compiled, the register cap."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if compiled and self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options

    def short(self) -> str:
        return (f"N{self.block_n} K{self.block_k} w{self.num_warps} s{self.num_stages}"
                + (f" split{self.split_k}" if self.split_k > 1 else "")
                + (f" r{self.max_registers}" if self.max_registers is not None else ""))


@dataclass(frozen=True)
class FusedMoeConfig:
    """Both GEMMs' tilings; ``group_m`` row blocks are walked together for L2 reuse of weights."""

    block_m: int
    up: TileConfig  # gate/up GEMM (N = I per gate and up half, K = H)
    down: TileConfig  # down GEMM (N = H, K = I)
    group_m: int = 1
    scaled_dot: bool = True  # MXFP4, bf16 activations, block_k >= 64: tl.dot_scaled (False: explicit decode)
    swap_ab: bool = False  # MXFP4: weights decoded in registers as the MMA's first operand (wins over scaled_dot)

    def short(self) -> str:
        return (f"M{self.block_m} G{self.group_m} up({self.up.short()}) down({self.down.short()})"
                + (" swap" if self.swap_ab else "" if self.scaled_dot else " decode"))


@dataclass(frozen=True)
class MoeShape:
    """What a tiling depends on: experts held, hidden and intermediate sizes, choices per token,
    weight format ("mxfp4" or the dense dtype's name, e.g. "bfloat16") and activation dtype."""

    num_experts: int
    hidden: int
    intermediate: int
    top_k: int
    weight_format: str
    dtype: str = "bfloat16"


def token_bucket(num_tokens: int) -> int:
    """The power of two at or above ``num_tokens`` (1, 2, 4, ..., capped at 4096): the table's T key."""
    bucket = 1
    while bucket < num_tokens and bucket < 4096:
        bucket *= 2
    return bucket


_GPT_OSS_120B = MoeShape(128, 2880, 2880, 4, "mxfp4")
_GPT_OSS_20B = MoeShape(32, 2880, 2880, 4, "mxfp4")
_QWEN3_30B_A3B = MoeShape(128, 2048, 768, 8, "bfloat16")

# Winners of `python benchmarks/moe_kernel.py --tune` on an H200 (one run each; margins over the
# default were 0-15% at decode, 20-40% at 4096 tokens): {(MoeShape, token bucket): config}.
TUNED: dict[tuple[MoeShape, int], FusedMoeConfig] = {
    # GPT-OSS-120B, tuned 2026-12-01 on fragment-packed codes (mxfp4.pack_fragments, the layer's default on
    # sm_90), us per call: T=1 38.4, 2 62.6, 4 110.4, 8 196.4, 16 325.5, 32 483.6, 64 667.3, 128 765.6, 256 825.7,
    # 512 931.5, 1024 1,176, 4096 2,840. Row-paired codes, tuned in the same session: T=64 688.7, 128 800.0,
    # 256 863.9, 512 991.9 (the earlier entries' history: RESULTS.md, the MoE kernel sections).
    (_GPT_OSS_120B, 1): FusedMoeConfig(16, TileConfig(32, 128, 4, 3), TileConfig(64, 128, 4, 3, 2), swap_ab=True),
    (_GPT_OSS_120B, 2): FusedMoeConfig(16, TileConfig(64, 128, 4, 3, max_registers=128),
                                       TileConfig(128, 128, 4, 3, 2, max_registers=128), swap_ab=True),
    (_GPT_OSS_120B, 4): FusedMoeConfig(16, TileConfig(32, 128, 4, 3), TileConfig(128, 128, 4, 3), swap_ab=True),
    (_GPT_OSS_120B, 8): FusedMoeConfig(16, TileConfig(64, 64, 4, 4, max_registers=168),
                                       TileConfig(128, 64, 4, 3, 2), swap_ab=True),
    (_GPT_OSS_120B, 16): FusedMoeConfig(16, TileConfig(64, 64, 4, 3, max_registers=128),
                                        TileConfig(128, 64, 4, 3, max_registers=96), swap_ab=True),
    (_GPT_OSS_120B, 32): FusedMoeConfig(16, TileConfig(64, 64, 4, 3, max_registers=128),
                                        TileConfig(128, 64, 4, 3), swap_ab=True),
    (_GPT_OSS_120B, 64): FusedMoeConfig(16, TileConfig(64, 64, 4, 3, max_registers=168),
                                        TileConfig(128, 64, 4, 3, max_registers=96), swap_ab=True),
    (_GPT_OSS_120B, 128): FusedMoeConfig(16, TileConfig(64, 64, 4, 3, max_registers=128),
                                         TileConfig(128, 64, 4, 3), swap_ab=True),
    (_GPT_OSS_120B, 256): FusedMoeConfig(16, TileConfig(64, 64, 4, 4, max_registers=168),
                                         TileConfig(128, 64, 4, 3), swap_ab=True),
    (_GPT_OSS_120B, 512): FusedMoeConfig(32, TileConfig(64, 64, 4, 4, max_registers=96),
                                         TileConfig(128, 64, 4, 3, max_registers=128), swap_ab=True),
    (_GPT_OSS_120B, 1024): FusedMoeConfig(64, TileConfig(64, 64, 4, 3),
                                          TileConfig(128, 64, 4, 4, max_registers=168), swap_ab=True),
    (_GPT_OSS_120B, 4096): FusedMoeConfig(64, TileConfig(64, 64, 4, 5),
                                          TileConfig(128, 64, 4, 4, max_registers=168), swap_ab=True),
    # GPT-OSS-20B, tuned 2026-12-01 on fragment-packed codes: T=1 38.4 us, 2 62.1, 4 109.5, 8 143.4, 16 193.2,
    # 32 217.6, 64 223.7, 128 248.2, 256 318.4 (the previous row-paired entries: 41.6, 67.9, -, -, -, -, 239.3,
    # 296.3, 328.6).
    (_GPT_OSS_20B, 1): FusedMoeConfig(16, TileConfig(64, 128, 4, 3, 2, max_registers=168),
                                      TileConfig(64, 128, 4, 3, 2, max_registers=168), swap_ab=True),
    (_GPT_OSS_20B, 2): FusedMoeConfig(16, TileConfig(64, 128, 4, 3, max_registers=168),
                                      TileConfig(128, 128, 4, 3, 2, max_registers=128), swap_ab=True),
    (_GPT_OSS_20B, 4): FusedMoeConfig(16, TileConfig(128, 64, 4, 3), TileConfig(128, 128, 4, 3), swap_ab=True),
    (_GPT_OSS_20B, 8): FusedMoeConfig(16, TileConfig(32, 128, 4, 3), TileConfig(128, 64, 4, 3, 2), swap_ab=True),
    (_GPT_OSS_20B, 16): FusedMoeConfig(16, TileConfig(64, 64, 4, 3, max_registers=168),
                                       TileConfig(128, 64, 4, 3, 2), swap_ab=True),
    (_GPT_OSS_20B, 32): FusedMoeConfig(16, TileConfig(32, 128, 4, 3), TileConfig(64, 128, 4, 3), swap_ab=True),
    (_GPT_OSS_20B, 64): FusedMoeConfig(16, TileConfig(32, 128, 4, 3),
                                       TileConfig(64, 128, 4, 3, max_registers=96), swap_ab=True),
    (_GPT_OSS_20B, 128): FusedMoeConfig(32, TileConfig(64, 64, 4, 3, max_registers=168),
                                        TileConfig(128, 64, 4, 4), swap_ab=True),
    (_GPT_OSS_20B, 256): FusedMoeConfig(64, TileConfig(64, 64, 4, 5),
                                        TileConfig(128, 64, 4, 4, max_registers=168), swap_ab=True),
    (_QWEN3_30B_A3B, 1): FusedMoeConfig(16, TileConfig(32, 128, 4, 3), TileConfig(64, 128, 4, 3)),
    (_QWEN3_30B_A3B, 8): FusedMoeConfig(16, TileConfig(32, 128, 4, 3), TileConfig(64, 128, 4, 3)),
    (_QWEN3_30B_A3B, 256): FusedMoeConfig(16, TileConfig(64, 128, 4, 3), TileConfig(128, 128, 4, 3)),
    (_QWEN3_30B_A3B, 1024): FusedMoeConfig(64, TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3), group_m=4),
    (_QWEN3_30B_A3B, 4096): FusedMoeConfig(128, TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 3), group_m=8),
}


def default_config(shape: MoeShape, num_tokens: int) -> FusedMoeConfig:
    """A reasonable tiling where nothing was measured, by rows per expert (T*K/E)."""
    rows_per_expert = num_tokens * shape.top_k / max(shape.num_experts, 1)
    if rows_per_expert <= 16:  # decode: stream the weights with many narrow programs
        # MXFP4: the swapped product (weights as the register operand) won at every decode size measured
        return FusedMoeConfig(16, TileConfig(32, 128, 4, 3), TileConfig(64, 128, 4, 3), group_m=1,
                              swap_ab=shape.weight_format == "mxfp4")
    if shape.weight_format == "mxfp4":  # and at prefill sizes too (GPT-OSS-120B, T = 1024 and 4096)
        return FusedMoeConfig(64, TileConfig(64, 64, 4, 3), TileConfig(128, 64, 4, 4), swap_ab=True)
    if rows_per_expert <= 64:
        return FusedMoeConfig(32, TileConfig(64, 128, 4, 3), TileConfig(64, 128, 4, 3), group_m=4)
    return FusedMoeConfig(64, TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 3), group_m=8)


def get_config(shape: MoeShape, num_tokens: int) -> FusedMoeConfig:
    """The tuned tiling for this shape and token count, else ``default_config``."""
    tuned = TUNED.get((shape, token_bucket(num_tokens)))
    return tuned if tuned is not None else default_config(shape, num_tokens)
