"""One Llama-family decoder: Llama 2/3/3.1, SmolLM2, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

Built on the meta device and materialized in place by the model runner; ``load_weights`` consumes
(name, tensor) pairs with Hugging Face names and routes each to its parameter's ``weight_loader``
(on a rank of a tensor-parallel group the tensors are ``loader.LazyTensor``s, read once narrowed).

The MoE models reuse these pieces: the attention (with the options ``ModelConfig`` turns on: biases,
q/k norm, per-layer sliding windows, sinks), the decoder layer and the causal LM, overriding
``build_mlp`` (which layers get a MoE) and ``checkpoint_target`` (their checkpoint names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from plait.runtime.distributed import TensorParallelLayout, all_gather_last_dim
from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.executor.loader import CheckpointTensor
from plait.runtime.layers.activation import SiluAndMul
from plait.runtime.layers.attention import Attention, AttentionBackend
from plait.runtime.layers.linear import (
    Linear,
    MergedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    apply_linear,
    default_weight_loader,
    mkl_pack,
)
from plait.runtime.layers.norm import RMSNorm
from plait.runtime.layers.rotary import RotaryEmbedding
from plait.runtime.models.config import ModelConfig

# checkpoint name fragment -> (packed parameter fragment, shard id)
PACKED_WEIGHTS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class LlamaAttention(nn.Module):
    """Attention of one layer. ``cfg`` has this rank's head counts (``TensorParallelLayout.local_config``)
    and ``layout`` says where they start in the checkpoint (None: the whole model, one rank)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryEmbedding, backend: AttentionBackend,
                 layout: TensorParallelLayout | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        split = layout is not None and layout.size > 1
        rows = None
        if split:
            d = cfg.head_dim
            rows = {"q": layout.head_start * d, "k": layout.kv_head_start * d, "v": layout.kv_head_start * d}
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, [("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)], bias=cfg.attention_bias,
            checkpoint_rows=rows,
        )
        if split:
            self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, layout.head_start * cfg.head_dim,
                                            bias=cfg.attention_out_bias)
        else:
            self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary
        self.attn = Attention(layer_id, cfg.head_dim, backend, sliding_window=cfg.layer_sliding_window(layer_id))
        # GPT-OSS: a learned sink logit per head (checkpoint name ``self_attn.sinks``)
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads), requires_grad=False) if cfg.attention_sinks else None
        if self.sinks is not None:
            head_start = layout.head_start if split else 0
            self.sinks.weight_loader = lambda param, loaded, shard_id=None: default_weight_loader(
                param, loaded.narrow(0, head_start, param.shape[0]))  # this rank's heads' sinks
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, q + 2 kv]
        T = qkv.shape[0]
        v = qkv[:, self.q_size + self.kv_size :].reshape(T, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        if self.q_norm is None and self.attn.can_fuse_rope_store(rope):
            # CUDA: rotate q/k and write k/v into the KV pool in one kernel
            heads = qkv.view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            out = self.attn.rope_store_attend(rope, heads, self.num_heads, self.num_kv_heads, batch, sinks=self.sinks)
            return self.o_proj(out.reshape(-1, self.q_size))
        if self.q_norm is None:
            # q and k heads are adjacent in qkv: rotate them in one go
            qk = qkv[:, : self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim)
            qk = self.rotary.apply(rope, qk)  # [T, H + KVH, D]
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = qkv[:, : self.q_size].reshape(T, self.num_heads, self.head_dim)  # [T, H, D]
            k = qkv[:, self.q_size : self.q_size + self.kv_size].reshape(T, self.num_kv_heads, self.head_dim)
            q, k = self.rotary.apply(rope, self.q_norm(q)), self.rotary.apply(rope, self.k_norm(k))
        out = self.attn(q, k, v, batch, sinks=self.sinks)  # [T, H, D]
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    """The dense SwiGLU MLP; with a split ``layout`` this rank holds its intermediate columns
    (gate/up column-parallel, down row-parallel)."""

    def __init__(self, cfg: ModelConfig, layout: TensorParallelLayout | None = None):
        super().__init__()
        split = layout is not None and layout.size > 1
        size = cfg.intermediate_size
        rows = {0: layout.intermediate_start, 1: layout.intermediate_start} if split else None
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [(0, size), (1, size)], checkpoint_rows=rows)
        if split:
            self.down_proj = RowParallelLinear(size, cfg.hidden_size, layout.intermediate_start)
        else:
            self.down_proj = Linear(size, cfg.hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP (``mlp``: the dense ``LlamaMLP`` or a ``MoE``), residuals fused."""

    def __init__(
        self, cfg: ModelConfig, layer_id: int, rotary: RotaryEmbedding, backend: AttentionBackend, mlp: nn.Module,
        layout: TensorParallelLayout | None = None,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_id, rotary, backend, layout)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        build_mlp: Callable[[ModelConfig, int], nn.Module],
        layout: TensorParallelLayout | None = None,
    ):
        super().__init__()
        self.rotary = rotary
        if layout is not None and layout.size > 1:
            self.embed_tokens = VocabParallelEmbedding(layout.vocab_rows, cfg.hidden_size, layout.vocab_start,
                                                       layout.vocab_count)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.embed_tokens.weight.requires_grad_(False)
            self.embed_tokens.weight.weight_loader = default_weight_loader
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, rotary, backend, build_mlp(cfg, i), layout) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        residual = None
        rope = self.rotary.lookup(batch.positions)
        for layer in self.layers:
            x, residual = layer(rope, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. ``forward`` returns hidden states [T, hidden]; ``compute_logits`` the float32 logits.

    ``cfg`` is the whole model's config; with a split ``layout`` (a rank of a tensor-parallel group)
    this builds that rank's part, and ``compute_logits`` gathers the whole vocabulary's logits from
    the ranks (the collectives use ``distributed.tensor_parallel()``'s group)."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int,
                 layout: TensorParallelLayout | None = None):
        super().__init__()
        self.config = cfg
        self.layout = layout if layout is not None else TensorParallelLayout.for_model(cfg)
        local = self.layout.local_config(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.model = LlamaModel(local, self.rotary, backend, self.build_mlp, self.layout)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        elif self.layout.size > 1:
            layout = self.layout
            self.lm_head = VocabParallelLMHead(layout.vocab_rows, cfg.hidden_size, layout.vocab_start,
                                               layout.vocab_count)
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

        self.lm_head_packed: torch.Tensor | None = None
        self.lm_head_gemv = None

    def build_mlp(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        """The MLP of layer ``layer_id`` (MoE models override this); ``cfg`` has this rank's sizes."""
        return LlamaMLP(cfg, self.layout)

    def prepack(self) -> None:
        """Prepack every linear weight (and the LM head) for fast small-batch GEMMs on CPU."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()
        self.lm_head_packed = mkl_pack(self.lm_head_weight().data)

    def tune_gemv(self) -> None:
        """CUDA: choose the batch-1 kernel (Triton GEMV or cuBLAS) of every linear and the LM head."""
        from plait.runtime.kernels.gemv import choose_gemv

        for module in self.modules():
            if isinstance(module, Linear):
                module.tune_gemv()
        self.lm_head_gemv = choose_gemv(self.lm_head_weight().data, None)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = apply_linear(hidden, self.lm_head_weight(), None, self.lm_head_packed, self.lm_head_gemv)
        if self.layout.size > 1:  # each rank's vocabulary rows, padded alike: side by side, then the padding cut
            logits = all_gather_last_dim(logits)[:, : self.config.vocab_size]
        return logits.float()

    def checkpoint_target(self, name: str, tensor: CheckpointTensor) -> tuple[str, object, CheckpointTensor] | None:
        """Where a checkpoint tensor goes: (parameter name, shard id, tensor), or None to skip it.

        MoE models override this for their expert and router names and defer to it for the rest.
        """
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: the embedding is the head
        for ckpt_part, (param_part, sid) in PACKED_WEIGHTS.items():
            if ckpt_part in name:
                return name.replace(ckpt_part, param_part), sid, tensor
        return name, None, tensor

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters; returns the names of parameters that were loaded.

        Floating-point tensors are cast to their parameter's dtype (a ``LazyTensor`` after its loader has
        narrowed it: only the part read); others (MXFP4 codes) are copied as they are. Raises ValueError
        for a checkpoint tensor that matches no parameter.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self.checkpoint_target(name, tensor)
            if target is None:
                continue
            param_name, shard_id, tensor = target
            param = params.get(param_name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__}")
            if tensor.is_floating_point() and param.is_floating_point():
                tensor = tensor.to(param.dtype)
            param.weight_loader(param, tensor, shard_id)
            loaded.add(param_name)
        return loaded
