"""Qwen3-MoE: Qwen3's attention (q/k RMSNorm per head) with a MoE MLP (softmax over all experts in
float32, top-k, renormalized when ``norm_topk_prob``; SiLU experts without biases). Layers listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` keep a dense MLP.

Checkpoints: the Hub's per-expert layout (``mlp.experts.N.gate_proj/up_proj/down_proj.weight``,
``mlp.gate.weight``), which is also what transformers' ``save_pretrained`` writes, and transformers'
fused one (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]).
"""

from __future__ import annotations

from torch import nn

from plait.runtime.executor.loader import CheckpointTensor
from plait.runtime.layers.moe import MoE, per_expert_target
from plait.runtime.models.config import ModelConfig
from plait.runtime.models.llama import LlamaForCausalLM, LlamaMLP

EXPERT_NAMES = {"router": "gate", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3 decoder whose sparse layers have a ``MoE`` MLP."""

    def build_mlp(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        if cfg.is_moe_layer(layer_id):
            return MoE.for_layout(cfg, self.layout)
        return LlamaMLP(cfg, self.layout)

    def checkpoint_target(self, name: str, tensor: CheckpointTensor) -> tuple[str, object, CheckpointTensor] | None:
        if ".mlp.gate." in name or ".mlp.experts." in name:
            target = per_expert_target(name, "mlp", EXPERT_NAMES)
            if target is not None:
                return (*target, tensor)
        return super().checkpoint_target(name, tensor)
