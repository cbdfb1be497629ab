"""ModelConfig: the architecture facts plait's decoders need, read from a Hugging Face config dict.

One dataclass covers the dense Llama family and the MoE models (Mixtral, Qwen3-MoE, GPT-OSS): a MoE
model carries a ``MoEConfig`` in ``moe``; per-layer attention differences (sliding windows) are
``layer_types``; how expert weights are stored (model dtype or MXFP4) is ``quantization``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.models.architectures import SUPPORTED_MODEL_TYPES, check_model_type
from plait.runtime.models.errors import ModelLoadError

__all__ = ["MXFP4_BYTES_PER_PARAM", "QUANTIZATIONS", "SUPPORTED_MODEL_TYPES", "MoEConfig", "ModelConfig"]

QUANTIZATIONS = ("mxfp4",)
# MXFP4: 4-bit values (half a byte) plus one 8-bit scale per block of 32 values
MXFP4_BYTES_PER_PARAM = 0.5 + 1 / 32


@dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of a MoE model: router, experts, and which layers have one.

    ``routing``: "softmax_then_topk" (Mixtral, Qwen3-MoE: softmax over all experts in float32, top-k,
    renormalized when ``norm_topk_prob``) or "topk_then_softmax" (GPT-OSS: top-k router logits,
    softmax over those k). ``activation``: "silu" (w13 = gate rows then up rows) or "swiglu_oai"
    (GPT-OSS: interleaved gate/up rows, clamped SwiGLU with ``swiglu_alpha`` / ``swiglu_limit``).
    ``round_weights``: the reference casts the routing weights to the activation dtype before using them.
    """

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    routing: str
    norm_topk_prob: bool
    activation: str
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    round_weights: bool = False
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead (Qwen3-MoE mlp_only_layers, sparse step)

    def expert_parameters(self, hidden_size: int) -> int:
        """Parameters of one layer's experts (weights only, no biases)."""
        return self.num_experts * 3 * hidden_size * self.intermediate_size


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder: Llama 2/3/3.1, SmolLM2, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE, GPT-OSS."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, GPT-OSS)
    attention_out_bias: bool = False  # bias on o_proj (GPT-OSS; Llama/Qwen3 when attention_bias)
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit in every softmax
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before rotary
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    # per layer "sliding_attention" | "full_attention"; empty: every layer uses ``sliding_window``
    layer_types: tuple[str, ...] = ()
    moe: MoEConfig | None = None
    quantization: str | None = None  # how expert weights are stored: None (model dtype) | "mxfp4"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict; an unsupported architecture or quantization raises
        ModelLoadError naming it and what is supported."""
        model_type = cfg.get("model_type", "llama")
        check_model_type(model_type)
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        max_positions = int(cfg.get("max_position_embeddings", 4096))
        # transformers >= 5 moves rope settings under "rope_parameters"; older configs keep them at top level.
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_scaling = cfg.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        rope_scaling = _complete_rope_scaling(rope_scaling, max_positions)
        rope_theta = float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        sliding, layer_types = _sliding_windows(model_type, cfg, num_layers)
        attention_bias = bool(cfg.get("attention_bias", model_type in ("qwen2", "gpt_oss")))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            attention_out_bias=attention_bias and model_type in ("llama", "qwen3", "qwen3_moe", "gpt_oss"),
            attention_sinks=model_type == "gpt_oss",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            layer_types=layer_types,
            moe=_moe_config(model_type, cfg, num_layers),
            quantization=_quantization(cfg),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            raw=dict(cfg),
        )

    def with_quantization(self, quantization: str | None) -> "ModelConfig":
        """This config with expert weights stored as ``quantization`` (None: the model dtype).

        Raises ValueError for an unknown format or for MXFP4 on a model without experts."""
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ValueError(f"unsupported quantization {quantization!r}; plait supports {', '.join(QUANTIZATIONS)}")
        if quantization is not None and self.moe is None:
            raise ValueError(f"quantization={quantization!r} applies to MoE experts; {self.model_type} has none")
        return dataclasses.replace(self, quantization=quantization)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_sliding_window(self, layer_id: int) -> int | None:
        """The attention window of a layer (keys within the last ``window`` positions), None for full attention."""
        if self.sliding_window is None:
            return None
        if not self.layer_types or self.layer_types[layer_id] == "sliding_attention":
            return self.sliding_window
        return None

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe is not None and layer_id not in self.moe.dense_layers

    def _attention_parameters(self) -> int:
        params = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        params += (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        params += self.hidden_size if self.attention_out_bias else 0
        params += self.num_heads if self.attention_sinks else 0
        return params + (2 * self.head_dim if self.qk_norm else 0)

    def _parameter_split(self) -> tuple[int, int]:
        """(expert weight parameters, all other parameters); the embedding counted once when tied."""
        experts = other = 0
        for layer_id in range(self.num_layers):
            other += self._attention_parameters() + 2 * self.hidden_size
            if not self.is_moe_layer(layer_id):
                other += 3 * self.hidden_size * self.intermediate_size
                continue
            moe = self.moe
            experts += moe.expert_parameters(self.hidden_size)
            other += moe.num_experts * self.hidden_size + (moe.num_experts if moe.router_bias else 0)
            other += moe.num_experts * (2 * moe.intermediate_size + self.hidden_size) if moe.expert_bias else 0
        emb = self.vocab_size * self.hidden_size
        return experts, other + emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied; MXFP4 experts count their values, not bytes)."""
        return sum(self._parameter_split())

    def num_active_parameters(self) -> int:
        """Parameters one token's forward reads: only ``top_k`` of each MoE layer's experts."""
        experts, other = self._parameter_split()
        if self.moe is None:
            return other
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_layers))
        per_expert = 3 * self.hidden_size * self.moe.intermediate_size
        return other + moe_layers * self.moe.top_k * per_expert

    def weight_bytes(self, element_size: int) -> int:
        """Bytes of all weights: ``element_size`` per parameter, MXFP4 experts at 4.25 bits each."""
        experts, other = self._parameter_split()
        per_expert_param = MXFP4_BYTES_PER_PARAM if self.quantization == "mxfp4" else element_size
        return int(experts * per_expert_param + other * element_size)


def _complete_rope_scaling(scaling: dict[str, Any] | None, max_positions: int) -> dict[str, Any] | None:
    """YaRN without ``factor`` derives it from the position limits (as transformers does)."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "yarn" or scaling.get("factor") is not None:
        return scaling
    return {**scaling, "factor": max_positions / float(scaling["original_max_position_embeddings"])}


def _sliding_windows(model_type: str, cfg: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(window, per-layer types) with transformers' rules: Mistral honours ``use_sliding_window``
    (default on), Mixtral and GPT-OSS any ``sliding_window``, the Qwen models only with
    ``use_sliding_window``. ``layer_types`` picks the sliding layers; GPT-OSS defaults to alternating
    (sliding first), Qwen2/3 to the layers from ``max_window_layers`` on."""
    if model_type in ("mixtral", "gpt_oss"):
        enabled = True
    else:
        enabled = bool(cfg.get("use_sliding_window", model_type == "mistral"))
    window = cfg.get("sliding_window") if enabled else None
    if not window:
        return None, ()
    layer_types = cfg.get("layer_types")
    if layer_types is None and model_type == "gpt_oss":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    elif layer_types is None and model_type in ("qwen2", "qwen3") and "max_window_layers" in cfg:
        first = int(cfg["max_window_layers"])
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if layer_types is not None and len(layer_types) != num_layers:
        raise ModelLoadError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    return int(window), tuple(layer_types or ())


def _moe_config(model_type: str, cfg: dict[str, Any], num_layers: int) -> MoEConfig | None:
    num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0)
    if model_type == "mixtral":
        return MoEConfig(num_experts, top_k, int(cfg["intermediate_size"]), "softmax_then_topk", True, "silu")
    if model_type == "qwen3_moe":
        sparse_step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % sparse_step != 0)
        return MoEConfig(
            num_experts, top_k, int(cfg["moe_intermediate_size"]), "softmax_then_topk",
            bool(cfg.get("norm_topk_prob", False)), "silu", round_weights=True, dense_layers=dense,
        )
    if model_type == "gpt_oss":
        return MoEConfig(
            num_experts, top_k, int(cfg["intermediate_size"]), "topk_then_softmax", False, "swiglu_oai",
            router_bias=True, expert_bias=True, swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)), round_weights=True,
        )
    return None


def _quantization(cfg: dict[str, Any]) -> str | None:
    """The checkpoint's weight format from ``quantization_config``; unsupported methods raise ModelLoadError."""
    quant = cfg.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in QUANTIZATIONS:
        raise ModelLoadError(
            f"unsupported quantization_config.quant_method {method!r}; plait supports {', '.join(QUANTIZATIONS)}"
        )
    if cfg.get("model_type") != "gpt_oss":
        raise ModelLoadError(f"MXFP4 checkpoints are supported for gpt_oss, not {cfg.get('model_type')!r}")
    return method
