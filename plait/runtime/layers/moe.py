"""The mixture-of-experts MLP shared by Mixtral, Qwen3-MoE and GPT-OSS: a router, top-k routing and the
experts, run by the fused MoE kernel (Triton on CUDA, its torch reference elsewhere).

Expert weights are held as ``w13 [E, 2I, H]`` (gate and up projections: gate rows then up rows for
"silu"; interleaved gate/up rows for GPT-OSS's "swiglu_oai") and ``w2 [E, H, I]``, plus optional biases
``b13 [E, 2I]`` and ``b2 [E, H]``. The storage format is a property of the weights, not of the model:
in the model dtype (parameters ``w13``, ``w2``) or MXFP4 (uint8 ``w13_blocks [E, 2I, H/32, 16]``,
``w13_scales [E, 2I, H/32]``, ``w2_blocks``, ``w2_scales``), decoded inside the kernel. After loading,
``prepare_for_kernels`` puts MXFP4 codes on a GPU in the K-swizzled byte order the kernel reads fastest
(``mxfp4.swizzle_k``); ``expert_weights`` says which order they are in.

Parallelism: a layer holds the local experts ``[expert_start, expert_end)`` and the local slice
``[intermediate_start, intermediate_end)`` of the intermediate dimension (default: everything).
Tensor parallelism (``distributed.TensorParallelLayout``) slices the intermediate dimension and keeps
every expert. The router always scores all experts; routed ids outside the local range contribute
nothing here (the kernel skips them), so each rank's output is its partial sum; with
``reduce_results`` the layer sums it over the tensor-parallel group itself (one all-reduce).
``b2`` is loaded whole everywhere but added only by the slice that starts at 0 (else every rank
would add it); MXFP4 slices of I must be multiples of 32.

Loading: every local slice is a range of the checkpoint tensor's dims (the local experts along dim 0;
the local rows of gate/up, interleaved or each half; the local columns of down, in whole 32-value
blocks for MXFP4 codes and scales), so a rank handed a ``loader.LazyTensor`` narrows it first and
reads only those bytes; the router and ``b2`` are replicated and read whole.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.runtime.kernels.fused_moe import fused_moe, fused_moe_ref, sm90_bf16_decode
from plait.runtime.kernels.moe_routing import ROUTINGS, route_topk, route_topk_ref
from plait.runtime.kernels.mxfp4 import (
    BLOCK_SIZE, ROW_PAIR_SPAN, Mxfp4Weight, has_small_scales, pack_fragments, pair_rows, random_mxfp4, swizzle_k,
)
from plait.runtime.executor.loader import CheckpointTensor, materialized
from plait.runtime.layers.linear import Linear
from plait.runtime.distributed import TensorParallelLayout
from plait.runtime.models.config import ModelConfig, MoEConfig
from plait.runtime.models.errors import ModelLoadError

# Fragment-packed MXFP4 codes (mxfp4.pack_fragments) where the sm_90 bf16 decode reads them: 11 integer
# operations for 8 values instead of 18 (sm_90 SASS); on an H200 the fused MoE kernel 3-6% faster than on
# row-paired codes at every token count tuned (benchmarks/RESULTS.md, 2026-12-01). The GPT-OSS tilings of
# fused_moe_config.TUNED were tuned on packed codes; False = row-paired codes only.
PACK_FRAGMENTS = True

# A checkpoint tensor's shard id: (expert, part). expert: a global expert id for a per-expert tensor,
# None for a tensor holding every expert along dim 0. part: "gate" / "up" (one expert's [I, H]),
# "w13" ([.., 2I, H] in this layer's gate/up layout), "w2" ([.., H, I]), "b13", "b2".
ExpertShard = tuple[int | None, str]


class MoE(nn.Module):
    """Router + top-k + experts: ``x [T, H]`` -> ``[T, H]`` (the sum over this layer's local experts and
    intermediate slice; summed over the tensor-parallel group too with ``reduce_results``)."""

    def __init__(
        self,
        hidden_size: int,
        moe: MoEConfig,
        quantization: str | None = None,
        *,
        expert_range: tuple[int, int] | None = None,
        intermediate_range: tuple[int, int] | None = None,
        reduce_results: bool = False,
    ):
        super().__init__()
        if moe.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {moe.routing!r}")
        self.moe = moe
        self.hidden_size = hidden_size
        self.quantization = quantization
        self.expert_start, self.expert_end = expert_range or (0, moe.num_experts)
        self.intermediate_start, self.intermediate_end = intermediate_range or (0, moe.intermediate_size)
        self.interleaved = moe.activation == "swiglu_oai"
        self.reduce_results = reduce_results  # all-reduce the partial sum over the tensor-parallel group
        self.adds_down_bias = self.intermediate_start == 0  # b2 once per expert, not once per slice
        E = self.expert_end - self.expert_start
        I = self.intermediate_end - self.intermediate_start  # noqa: E741 -- the usual name of the dimension
        H = hidden_size
        self.router = Linear(H, moe.num_experts, bias=moe.router_bias)
        if quantization == "mxfp4":
            if H % BLOCK_SIZE or I % BLOCK_SIZE:
                raise ValueError(f"MXFP4 experts need hidden and intermediate sizes divisible by 32, got {H}, {I}")
            self.w13_blocks = self._param((E, 2 * I, H // BLOCK_SIZE, BLOCK_SIZE // 2), torch.uint8)
            self.w13_scales = self._param((E, 2 * I, H // BLOCK_SIZE), torch.uint8)
            self.w2_blocks = self._param((E, H, I // BLOCK_SIZE, BLOCK_SIZE // 2), torch.uint8)
            self.w2_scales = self._param((E, H, I // BLOCK_SIZE), torch.uint8)
        elif quantization is None:
            self.w13 = self._param((E, 2 * I, H))
            self.w2 = self._param((E, H, I))
        else:
            raise ValueError(f"unsupported expert weight format {quantization!r}; plait supports mxfp4")
        self.b13 = self._param((E, 2 * I)) if moe.expert_bias else None
        self.b2 = self._param((E, H)) if moe.expert_bias else None
        self.k_swizzled = False  # MXFP4 codes in mxfp4.swizzle_k's order (set by prepare_for_kernels)
        self.small_scales = (False, False)  # per weight (w13, w2): mxfp4.has_small_scales (prepare_for_kernels)
        self.row_paired = (False, False)  # per weight (w13, w2): codes in mxfp4.pair_rows's pairing (likewise)
        self.fragment_packed = (False, False)  # per weight: row-paired codes also in mxfp4.pack_fragments's form

    @classmethod
    def for_layout(cls, cfg: ModelConfig, layout: TensorParallelLayout | None) -> MoE:
        """The MoE layer of a model whose config is ``cfg``, as the rank of ``layout`` holds it (None or a
        group of one: the whole layer): its slice of every expert's intermediate dimension, the partial
        sums all-reduced over the group."""
        if layout is None or layout.size == 1:
            return cls(cfg.hidden_size, cfg.moe, cfg.quantization)
        return cls(cfg.hidden_size, cfg.moe, cfg.quantization, intermediate_range=layout.moe_intermediate_range,
                   reduce_results=True)

    def _param(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        param.weight_loader = self._load_expert_tensor
        return param

    # --- routing and forward -----------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_weights [T, K] float32, topk_ids [T, K] global expert ids: int32 from the
        fused routing kernel on CUDA, int64 from its torch reference elsewhere)."""
        logits = self.router(x)  # [T, E]
        route = route_topk if logits.is_cuda else route_topk_ref
        return route(logits, self.moe.top_k, self.moe.routing, self.moe.norm_topk_prob,
                     x.dtype if self.moe.round_weights else None)

    def expert_weights(self) -> tuple[torch.Tensor | Mxfp4Weight, torch.Tensor | Mxfp4Weight]:
        """(w13, w2) as the fused MoE kernel takes them."""
        if self.quantization == "mxfp4":
            return (Mxfp4Weight(self.w13_blocks, self.w13_scales, self.k_swizzled, self.small_scales[0],
                                self.row_paired[0], self.fragment_packed[0]),
                    Mxfp4Weight(self.w2_blocks, self.w2_scales, self.k_swizzled, self.small_scales[1],
                                self.row_paired[1], self.fragment_packed[1]))
        return self.w13, self.w2

    def prepare_for_kernels(self, swizzle: bool | None = None, pack: bool | None = None) -> None:
        """Once the weights are loaded: MXFP4 codes move, in place and one expert at a time (no full-size
        temporary), to the K-swizzled order (``mxfp4.swizzle_k``) in which the fused kernel's loads are
        vector loads and, where the rows allow it, to the row pairing (``mxfp4.pair_rows``) whose decode
        needs no byte permutes; the scales are checked once (``mxfp4.has_small_scales``: the kernel's
        decode can then fold a constant into them). ``swizzle``: None = where the kernel runs (CUDA).
        Needs both reduction sizes (H, the local I) to be multiples of 64; else, for dense experts or when
        already done, the codes stay as they are. Row pairing needs the weight's rows in 16s: gate/up
        where the local I is a multiple of 16 (so that silu's up half starts on a 16), down where H is.
        ``pack``: row-paired codes also fragment-packed (``mxfp4.pack_fragments``, read by the sm_90 bf16
        decode only); None = ``PACK_FRAGMENTS`` where that decode runs (an sm_90 GPU, bf16 layer)."""
        if self.quantization != "mxfp4" or self.k_swizzled:
            return
        if not (self.w13_blocks.is_cuda if swizzle is None else swizzle):
            return
        self.small_scales = (has_small_scales(self.w13_scales), has_small_scales(self.w2_scales))
        if self.w13_blocks.shape[-2] % 2 or self.w2_blocks.shape[-2] % 2:
            return  # K not a multiple of 64: the natural order (the kernel reads both)
        intermediate, hidden = self.w13_blocks.shape[1] // 2, self.w2_blocks.shape[1]
        paired = (intermediate % ROW_PAIR_SPAN == 0, hidden % ROW_PAIR_SPAN == 0)
        if pack is None:
            pack = PACK_FRAGMENTS and self._sm90_bf16_decode()
        packed = (paired[0] and pack, paired[1] and pack)
        for blocks, pair, pack_codes in zip((self.w13_blocks, self.w2_blocks), paired, packed):
            for e in range(blocks.shape[0]):
                codes = pair_rows(blocks.data[e]) if pair else blocks.data[e]
                if pack_codes:  # on the logical order, before the swizzle moves the bytes
                    codes = pack_fragments(codes)
                blocks.data[e].copy_(swizzle_k(codes))
        self.k_swizzled, self.row_paired, self.fragment_packed = True, paired, packed

    def _sm90_bf16_decode(self) -> bool:
        """Whether the fused kernel decodes this layer's MXFP4 codes with its sm_90 bf16 PTX
        (``fused_moe.sm90_bf16_decode``; the activations are in the router's dtype): the one reader of
        fragment-packed codes."""
        return sm90_bf16_decode(self.w13_blocks.device, self.router.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        if self.expert_start:
            ids = ids - self.expert_start  # local ids; experts held elsewhere fall outside [0, E_local)
        w13, w2 = self.expert_weights()
        run = fused_moe if x.is_cuda else fused_moe_ref
        out = run(
            x, w13, w2, weights, ids, b13=self.b13, b2=self.b2 if self.adds_down_bias else None,
            activation=self.moe.activation, swiglu_alpha=self.moe.swiglu_alpha, swiglu_limit=self.moe.swiglu_limit,
        )
        if self.reduce_results:
            from plait.runtime.distributed import all_reduce

            out = all_reduce(out)
        return out

    # --- dummy weights -------------------------------------------------------------------------------

    def init_dummy_weights(self, generator: torch.Generator) -> None:
        """Random MXFP4 experts (``random_mxfp4``); float parameters are left to the generic dummy init."""
        if self.quantization != "mxfp4":
            return
        for blocks, scales in ((self.w13_blocks, self.w13_scales), (self.w2_blocks, self.w2_scales)):
            E, N, G, _ = blocks.shape
            weight = random_mxfp4(E, N, G * BLOCK_SIZE, generator, blocks.device)
            blocks.data.copy_(weight.blocks)
            scales.data.copy_(weight.scales)

    # --- loading ---------------------------------------------------------------------------------------

    def _load_expert_tensor(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: ExpertShard) -> None:
        """Copy a checkpoint tensor (one expert's or all experts') into this layer's local part of ``param``,
        narrowing it to that part before it is read."""
        expert, part = shard_id
        if self.k_swizzled:
            raise ModelLoadError("expert weights were already prepared for the kernels; load them before that")
        if loaded.is_floating_point() != param.is_floating_point():
            raise ModelLoadError(
                f"checkpoint expert tensor is {loaded.dtype} but the layer holds {param.dtype} "
                f"(expert weight format {self.quantization or 'model dtype'}); the checkpoint's format and "
                f"the engine's quantization setting disagree"
            )
        if expert is None:  # every expert along dim 0: the local ones
            loaded = loaded.narrow(0, self.expert_start, self.expert_end - self.expert_start)
            target, lead = param.data, 1  # lead: the dims before one expert's own
        elif not self.expert_start <= expert < self.expert_end:
            return  # held by another rank
        else:
            target, lead = param.data[expert - self.expert_start], 0
        if part in ("gate", "up"):
            loaded = self._local_rows(loaded, lead, halves=False)
            half = target.shape[lead] // 2
            target = target.narrow(lead, 0 if part == "gate" else half, half)
        elif part in ("w13", "b13"):
            loaded = self._local_rows(loaded, lead, halves=True)
        elif part == "w2":
            groups = BLOCK_SIZE if loaded.dtype == torch.uint8 else 1  # MXFP4: the I dim counts 32-blocks
            start, end = self.intermediate_start // groups, self.intermediate_end // groups
            loaded = loaded.narrow(lead + 1, start, end - start)
        elif part != "b2":  # b2 [.., H]: replicated, read whole
            raise ValueError(f"unknown expert tensor part {part!r}")
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"expert tensor {part!r}: parameter {tuple(target.shape)} vs checkpoint {tuple(loaded.shape)}"
            )
        target.copy_(materialized(loaded))

    def _local_rows(self, t: CheckpointTensor, dim: int, *, halves: bool) -> CheckpointTensor:
        """The local intermediate rows along ``dim``: of one [I, ...] projection (``halves=False``), or of
        a [2I, ...] gate/up tensor in this layer's layout (interleaved or gate-then-up: the two halves'
        rows read, then joined)."""
        start, end, full = self.intermediate_start, self.intermediate_end, self.moe.intermediate_size
        if (start, end) == (0, full):
            return t
        if not halves:
            return t.narrow(dim, start, end - start)
        if self.interleaved:
            return t.narrow(dim, 2 * start, 2 * (end - start))
        gate, up = t.narrow(dim, start, end - start), t.narrow(dim, full + start, end - start)
        return torch.cat((materialized(gate), materialized(up)), dim)


def per_expert_target(
    name: str, block: str, names: dict[str, str]
) -> tuple[str, ExpertShard | None] | None:
    """Map a Mixtral/Qwen-MoE style checkpoint name inside a MoE block to (parameter name, shard id).

    ``block``: the checkpoint's module name of the sparse MLP ("block_sparse_moe", "mlp"). ``names``:
    the checkpoint's names of the router and of the per-expert projections, keys "router", "gate",
    "up", "down" (e.g. Mixtral: gate, w1, w3, w2). Handles the Hub's per-expert layout
    (``experts.N.<proj>.weight``) and transformers' fused one (``experts.gate_up_proj [E, 2I, H]``,
    ``experts.down_proj [E, H, I]``). Returns None for a name outside a MoE block.
    """
    marker = f".{block}."
    if marker not in name:
        return None
    prefix, rest = name.split(marker, 1)
    target = prefix + ".mlp."
    if rest in (f"{names['router']}.weight", f"{names['router']}.bias"):
        return target + "router." + rest.rsplit(".", 1)[1], None
    if rest == "experts.gate_up_proj":
        return target + "w13", (None, "w13")
    if rest == "experts.down_proj":
        return target + "w2", (None, "w2")
    parts = rest.split(".")  # experts, N, <proj>, weight
    if len(parts) == 4 and parts[0] == "experts" and parts[3] == "weight":
        by_name = {names["gate"]: ("w13", "gate"), names["up"]: ("w13", "up"), names["down"]: ("w2", "w2")}
        if parts[2] in by_name:
            param, part = by_name[parts[2]]
            return target + param, (int(parts[1]), part)
    return None

