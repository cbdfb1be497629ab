"""Which plait class serves each Hugging Face ``model_type``.

Kept free of torch imports: resolving and validating a config (``plait models list``, the server's
argument checks) must stay cheap; the class itself is imported only when a model is built.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType

from plait.runtime.models.errors import ModelLoadError

# model_type -> "module:class"
ARCHITECTURES: MappingProxyType[str, str] = MappingProxyType(
    {
        "llama": "plait.runtime.models.llama:LlamaForCausalLM",
        "mistral": "plait.runtime.models.llama:LlamaForCausalLM",
        "qwen2": "plait.runtime.models.llama:LlamaForCausalLM",
        "qwen3": "plait.runtime.models.llama:LlamaForCausalLM",
        "mixtral": "plait.runtime.models.mixtral:MixtralForCausalLM",
        "qwen3_moe": "plait.runtime.models.qwen3_moe:Qwen3MoeForCausalLM",
        "gpt_oss": "plait.runtime.models.gpt_oss:GptOssForCausalLM",
    }
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)


def check_model_type(model_type: str) -> None:
    """Raise ModelLoadError naming ``model_type`` and the supported ones unless plait implements it."""
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}; plait supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def model_class(model_type: str) -> type:
    """The ``nn.Module`` class (constructor ``(ModelConfig, AttentionBackend, max_positions)``) of a model type."""
    check_model_type(model_type)
    module_name, class_name = ARCHITECTURES[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)
