"""Multi-LoRA serving on tiny random MoE models (GPT-OSS, Mixtral, Qwen3-MoE) against transformers + peft
(CPU, float32). A MoE layer's LoRA targets are its attention's q/k/v/o (its experts are not targets):
two adapters made with peft, served by one engine, alone and in one batch with the base model; an
engine started with ``enable_lora`` and no adapters keeps buffers for the attention only; an adapter
that targets the experts is refused with a typed error."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.engine import Engine
from plait.runtime.lora import LoraFormatError
from tests.lora_helpers import save_random_adapters
from tests.runtime.engine_helpers import assert_no_leak

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.runtime.models.moe_helpers import (  # noqa: E402 -- needs transformers
    ARCHITECTURES,
    PROMPTS,
    build_hf,
    greedy,
    hf_greedy,
    hf_prompt_logprobs,
)

pytestmark = pytest.mark.model
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {"a1": {"r": 4, "lora_alpha": 8, "target_modules": ATTENTION},
            "a2": {"r": 2, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def served(request, tmp_path_factory):
    """(architecture, the peft model holding both adapters, the engine serving them)."""
    hf = build_hf(request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    hf.save_pretrained(root / "base", safe_serialization=True)
    torch.manual_seed(1)
    (root / "adapters").mkdir()
    model, paths = save_random_adapters(hf, ADAPTERS, root / "adapters")
    engine = Engine(model=str(root / "base"), max_total_tokens=2048, max_running_requests=8, lora_paths=paths)
    yield request.param, model, engine
    engine.shutdown()


def _reference(model, name: str | None, ids: list[int]) -> list[int]:
    if name is None:
        with model.disable_adapter():
            return hf_greedy(model, ids)
    model.set_adapter(name)
    return hf_greedy(model, ids)


def test_each_adapter_and_a_mixed_batch_equal_peft(served):
    arch, model, engine = served
    assert sorted(engine.runner.lora.targets) == sorted(ATTENTION)
    names = [None, "a1", "a2"]
    refs = {name: [_reference(model, name, ids) for ids in PROMPTS[:2]] for name in names}
    assert refs["a1"] != refs[None] and refs["a2"] != refs[None], f"{arch}: the adapters change nothing"
    for name in ("a1", "a2"):
        outs = engine.generate(input_ids=PROMPTS[:2], sampling_params=greedy(), lora_path=[name, name])
        assert [o["output_ids"] for o in outs] == refs[name], (arch, name)
    batch = [(ids, name) for name in names for ids in PROMPTS[:2]]  # one batch: base and both adapters
    outs = engine.generate(input_ids=[ids for ids, _ in batch], sampling_params=greedy(),
                           lora_path=[name for _, name in batch])
    assert [o["output_ids"] for o in outs] == [refs[name][i % 2] for i, (_, name) in enumerate(batch)], arch
    assert_no_leak(engine)


def test_prompt_logprobs_under_an_adapter(served):
    arch, model, engine = served
    ids = PROMPTS[1]
    model.set_adapter("a1")
    ref = hf_prompt_logprobs(model, ids)
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0, lora_path="a1")
    ours = torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])
    assert torch.allclose(ours, ref, atol=1e-4), f"{arch}: max diff {(ours - ref).abs().max():.2e}"


def test_enable_lora_keeps_attention_buffers_and_refuses_expert_adapters(tmp_path):
    """Without start-up adapters a MoE engine's LoRA buffers cover what its layers have; an adapter whose
    tensors target the experts is a LoraFormatError naming the tensor."""
    from safetensors.torch import save_file

    hf = build_hf("qwen3_moe")
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    with Engine(model=str(tmp_path / "base"), max_total_tokens=512, enable_lora=True, max_lora_rank=4) as engine:
        assert engine.runner.lora.targets == tuple(ATTENTION)
        experts = tmp_path / "experts"
        experts.mkdir()
        (experts / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"]}')
        save_file({"base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_A.weight": torch.zeros(2, 64),
                   "base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_B.weight": torch.zeros(32, 2)},
                  str(experts / "adapter_model.safetensors"))
        with pytest.raises(LoraFormatError, match="experts"):
            engine.load_lora_adapter("experts", str(experts))
