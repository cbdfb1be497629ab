"""GPU (marked ``gpu``; skipped without CUDA): gpt-oss-20b-shaped layers in bf16 against transformers.

The engine runs the gpt-oss-20b config cut to 4 layers (two sliding-window, two full) with random
weights; transformers runs the same weights (copied from the engine's tensors: q/k/v rows of the
packed projection, experts transposed back to its [E, in, out] layout). Both are compared with a
float32 transformers copy of those weights: plait's bf16 error must be no larger than transformers'
own bf16 error (plus a margin). Prompts of 17 and 300 tokens (the window is 128). With
``quantization="mxfp4"`` the engine keeps MXFP4 experts and decodes them in the fused kernel;
transformers gets the dequantized values (exact in bf16).
"""

from __future__ import annotations

import copy
import gc
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from plait.runtime.engine import Engine  # noqa: E402
from plait.runtime.kernels.mxfp4 import Mxfp4Weight  # noqa: E402
from plait.runtime.models.registry import preset_config  # noqa: E402

pytestmark = pytest.mark.gpu

LAYERS = 4


def _config_dir(path) -> None:
    config = preset_config("gpt-oss-20b")
    config.pop("quantization_config")  # the engine setting decides the expert format here
    config.update(num_hidden_layers=LAYERS, layer_types=config["layer_types"][:LAYERS])
    (path / "config.json").write_text(json.dumps(config))


def _normal_init(model: torch.nn.Module) -> None:
    """normal(0, 0.02) for every float weight but the norms (1): logits far from uniform."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not name.endswith("norm.weight"):
            param.data.normal_(0.0, 0.02, generator=gen)


def _hf_state_dict(model: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """transformers' GPT-OSS parameters from plait's (float32 copies)."""
    state = {}
    q, kv = cfg.q_size, cfg.kv_size
    for name, param in model.named_parameters():
        t = param.data
        if ".qkv_proj." in name:
            for proj, rows in (("q_proj", (0, q)), ("k_proj", (q, kv)), ("v_proj", (q + kv, kv))):
                state[name.replace("qkv_proj", proj)] = t.narrow(0, *rows).float()
        elif name.endswith(("mlp.w13", "mlp.w2", "mlp.w13_blocks", "mlp.w2_blocks")):
            layer = model.get_submodule(name.rsplit(".", 1)[0])
            w13, w2 = layer.expert_weights()
            w = w13 if ".w13" in name else w2
            dense = w.dequantize(torch.float32) if isinstance(w, Mxfp4Weight) else w.float()
            leaf = "gate_up_proj" if ".w13" in name else "down_proj"
            state[name.rsplit(".", 1)[0] + f".experts.{leaf}"] = dense.transpose(1, 2).contiguous()
        elif name.endswith("_scales"):
            continue  # decoded with the blocks
        elif name.endswith((".b13", ".b2")):
            leaf = "gate_up_proj_bias" if name.endswith(".b13") else "down_proj_bias"
            state[name.rsplit(".", 1)[0] + f".experts.{leaf}"] = t.float()
        else:
            state[name] = t.float()
    return state


def _hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda")).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0].cpu()


def _plait_prompt_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])


@pytest.mark.parametrize("quantization", [None, "mxfp4"], ids=["bf16-experts", "mxfp4-experts"])
def test_gpt_oss_20b_layers_bf16_match_transformers(tmp_path, quantization):
    _config_dir(tmp_path)
    engine = Engine(model=str(tmp_path), load_format="dummy", device="cuda", dtype="bfloat16",
                    quantization=quantization, max_total_tokens=4096, max_running_requests=4, cuda_graph_max_bs=4)
    try:
        _normal_init(engine.runner.model)  # MXFP4 experts keep their random_mxfp4 values
        state = _hf_state_dict(engine.runner.model, engine.model_config)
        config = transformers.AutoConfig.for_model(**engine.model_source.config)
        with torch.device("cuda"):
            hf32 = transformers.GptOssForCausalLM(config).float().eval()
        missing, unexpected = hf32.load_state_dict(state, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        del state
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (17, 300)]
        for ids in prompts:
            ref = _hf_prompt_logprobs(hf32, ids)
            hf_err = (_hf_prompt_logprobs(hf16, ids) - ref).abs().mean().item()
            our_err = (_plait_prompt_logprobs(engine, ids) - ref).abs().mean().item()
            print(f"{quantization}, {len(ids)} tokens: plait bf16 error {our_err:.4f}, transformers {hf_err:.4f}")
            assert our_err <= 1.5 * hf_err + 0.01, (our_err, hf_err)
        greedy = {"temperature": 0.0, "max_new_tokens": 16, "min_new_tokens": 16}
        outs = engine.generate(input_ids=prompts, sampling_params=greedy)  # decode through CUDA graphs
        assert all(len(o["output_ids"]) == 16 for o in outs)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
