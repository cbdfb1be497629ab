"""Mixtral: Mistral's attention (sliding window when the config sets one) with a MoE MLP in every layer
(softmax over all experts, top-k renormalized, SiLU experts without biases).

Checkpoints: the Hub's per-expert layout (``block_sparse_moe.experts.N.w1/w2/w3.weight``,
``block_sparse_moe.gate.weight``), which is also what transformers' ``save_pretrained`` writes, and
transformers' in-memory fused layout (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
[E, H, I], ``mlp.gate.weight``).
"""

from __future__ import annotations

from torch import nn

from plait.runtime.executor.loader import CheckpointTensor
from plait.runtime.layers.moe import MoE, per_expert_target
from plait.runtime.models.config import ModelConfig
from plait.runtime.models.llama import LlamaForCausalLM

EXPERT_NAMES = {"router": "gate", "gate": "w1", "up": "w3", "down": "w2"}


class MixtralForCausalLM(LlamaForCausalLM):
    """Mistral decoder with a ``MoE`` MLP in every layer."""

    def build_mlp(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return MoE.for_layout(cfg, self.layout)

    def checkpoint_target(self, name: str, tensor: CheckpointTensor) -> tuple[str, object, CheckpointTensor] | None:
        for block in ("block_sparse_moe", "mlp"):
            target = per_expert_target(name, block, EXPERT_NAMES)
            if target is not None:
                return (*target, tensor)
        return super().checkpoint_target(name, tensor)
