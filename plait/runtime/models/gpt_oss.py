"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): Llama-style attention with q/k/v/o biases, learned per-head
sinks and layers alternating sliding-window and full attention (``layer_types``), YaRN rotary, and a
MoE MLP in every layer: router with a bias, top-k logits then softmax, experts with biases and the
clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``) over interleaved gate/up rows.

The attention is ``LlamaAttention`` with the options ``ModelConfig`` turns on for ``gpt_oss``
(``attention_bias``, ``attention_out_bias``, ``attention_sinks``, per-layer windows); it owns the
``sinks`` parameter (checkpoint name ``model.layers.N.self_attn.sinks``).

Checkpoints (``model.layers.N.mlp.experts.*``):

- bf16 (what transformers' ``save_pretrained`` writes): ``gate_up_proj`` [E, H, 2I] and ``down_proj``
  [E, I, H], input dim first, transposed here to the kernel's [E, 2I, H] / [E, H, I] (a view, or on a
  tensor-parallel rank a ``LazyTensor`` transposed before it is narrowed: each rank reads its slice);
- MXFP4 (the published checkpoints, ``quantization_config.quant_method == "mxfp4"``):
  ``gate_up_proj_blocks`` [E, 2I, H/32, 16] + ``gate_up_proj_scales`` [E, 2I, H/32] and
  ``down_proj_blocks`` / ``down_proj_scales``, already output-major, kept as MXFP4 in memory;
- both: ``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]; ``mlp.router.weight`` / ``.bias``.
"""

from __future__ import annotations

from torch import nn

from plait.runtime.executor.loader import CheckpointTensor
from plait.runtime.layers.moe import MoE
from plait.runtime.models.config import ModelConfig
from plait.runtime.models.llama import LlamaForCausalLM

# experts.<checkpoint name> -> (parameter name, shard part, transpose the last two dims)
EXPERT_TENSORS = {
    "gate_up_proj": ("w13", "w13", True),
    "down_proj": ("w2", "w2", True),
    "gate_up_proj_blocks": ("w13_blocks", "w13", False),
    "gate_up_proj_scales": ("w13_scales", "w13", False),
    "down_proj_blocks": ("w2_blocks", "w2", False),
    "down_proj_scales": ("w2_scales", "w2", False),
    "gate_up_proj_bias": ("b13", "b13", False),
    "down_proj_bias": ("b2", "b2", False),
}


class GptOssForCausalLM(LlamaForCausalLM):
    """GPT-OSS: the shared decoder with sinks, per-layer windows and a ``MoE`` MLP in every layer."""

    def build_mlp(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return MoE.for_layout(cfg, self.layout)

    def checkpoint_target(self, name: str, tensor: CheckpointTensor) -> tuple[str, object, CheckpointTensor] | None:
        if ".mlp.experts." in name:
            prefix, leaf = name.split(".mlp.experts.", 1)
            if leaf in EXPERT_TENSORS:
                param, part, transpose = EXPERT_TENSORS[leaf]
                return f"{prefix}.mlp.{param}", (None, part), tensor.transpose(-1, -2) if transpose else tensor
        return super().checkpoint_target(name, tensor)
