"""Random LoRA adapters made with peft, saved in PEFT format, for the tests that serve adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_random_adapters(model: Any, adapters: dict[str, dict[str, Any]], root: Path,
                         scale_b: float | None = None) -> tuple[Any, dict[str, str]]:
    """Wrap ``model`` (a transformers model, changed in place) in a peft model holding one random adapter
    per entry of ``adapters`` (name -> ``LoraConfig`` arguments; random A and B, no dropout), optionally
    scale every B by ``scale_b`` (peft's random B is as large as A; a fine-tune's is smaller), save each
    adapter under ``root``; returns (the peft model in eval mode, {name: its adapter directory})."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for name, args in adapters.items():
        config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **args)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    if scale_b is not None:
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.mul_(scale_b)
    peft_model.eval()
    paths = {}
    for name in adapters:
        peft_model.save_pretrained(str(root), selected_adapters=[name])  # the first lands in root, the rest below
        paths[name] = str(root / name) if (root / name / "adapter_config.json").is_file() else str(root)
    return peft_model, paths
