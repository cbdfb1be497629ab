"""LoRA on a GPU (marked ``gpu``; skipped without CUDA): CUDA graphs keep working with adapters.

SmolLM2-135M's config with random normal(0, 0.02) weights (no checkpoint needed), float32, TF32 off.
Three random adapters written in PEFT's file layout. One engine replays decode CUDA graphs and
piecewise prefill graphs for a batch mixing the base model and the adapters (the slots copied into
the graphs' static buffer); the reference is an engine without LoRA, graphs off, whose weights have
each adapter merged in (W + scaling * B @ A) in turn: the same function computed another way.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from plait.runtime.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 8
ADAPTERS = {  # name -> (rank, alpha, rslora, modules)
    "a1": (8, 16, False, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "a2": (4, 8, True, ("q_proj", "v_proj", "down_proj")),
    "a3": (16, 8, False, ("o_proj", "up_proj")),
}


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _normal_init(engine: Engine, seed: int = 0) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for name, param in engine.runner.model.named_parameters():
        if not name.endswith("norm.weight"):
            param.data.normal_(0.0, 0.02, generator=gen)


def _write_adapters(root, hidden: int, q: int, kv: int, inter: int, layers: int) -> dict[str, dict]:
    """PEFT-layout adapter directories; returns name -> {path, scaling, weights {(layer, module): (A, B)}}."""
    from safetensors.torch import save_file

    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, (rank, alpha, rslora, modules) in ADAPTERS.items():
        tensors, weights = {}, {}
        for layer in range(layers):
            for module in modules:
                k, n = shapes[module]
                a = torch.randn(rank, k, generator=gen) / math.sqrt(k)
                b = torch.randn(n, rank, generator=gen) * 0.05
                part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
                tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
                weights[(layer, module)] = (a, b)
        path = root / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "bias": "none",
            "target_modules": list(modules)}))
        save_file(tensors, str(path / "adapter_model.safetensors"))
        out[name] = {"path": str(path), "scaling": alpha / (math.sqrt(rank) if rslora else rank), "weights": weights}
    return out


def _merge(engine: Engine, adapter: dict, sign: float) -> None:
    """Add (sign=1) or remove (-1) an adapter's scaling * B @ A into the engine's weights."""
    places = {"q_proj": ("self_attn", "qkv_proj", "q"), "k_proj": ("self_attn", "qkv_proj", "k"),
              "v_proj": ("self_attn", "qkv_proj", "v"), "o_proj": ("self_attn", "o_proj", None),
              "gate_proj": ("mlp", "gate_up_proj", 0), "up_proj": ("mlp", "gate_up_proj", 1),
              "down_proj": ("mlp", "down_proj", None)}
    layers = engine.runner.model.model.layers
    for (layer, module), (a, b) in adapter["weights"].items():
        parent, attr, shard = places[module]
        linear = getattr(getattr(layers[layer], parent), attr)
        offset, size = linear.shard_offsets[shard] if shard is not None else (0, linear.out_features)
        delta = (b.double() @ a.double() * adapter["scaling"] * sign).to(torch.float32).cuda()
        linear.weight.data[offset:offset + size] += delta


def _run(engine: Engine, prompts, loras) -> list[dict]:
    return engine.generate(input_ids=prompts, sampling_params={"temperature": 0.0, "max_new_tokens": NEW_TOKENS,
                                                                "ignore_eos": True},
                           lora_path=loras, return_logprob=True)


def test_mixed_adapters_under_cuda_graphs_equal_merged_weights(tmp_path):
    common = {"model": MODEL, "load_format": "dummy", "device": "cuda", "dtype": "float32", "max_total_tokens": 8192,
              "max_running_requests": 16, "chunked_prefill_size": 64}
    reference = Engine(disable_cuda_graph=True, **common)
    cfg = reference.model_config
    try:
        _normal_init(reference)
        adapters = _write_adapters(tmp_path, cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size,
                                   cfg.num_layers)
        gen = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 40, 150, 12, 90)]
        loras = [None, "a1", "a2", "a3", "a1"]
        expected = []
        for ids, name in zip(prompts, loras):
            if name is not None:
                _merge(reference, adapters[name], 1.0)
            expected.append(_run(reference, [ids], None)[0])
            if name is not None:
                _merge(reference, adapters[name], -1.0)
    finally:
        reference.shutdown()
    engine = Engine(lora_paths={n: a["path"] for n, a in adapters.items()}, max_loras_per_batch=3, **common)
    try:
        _normal_init(engine)
        assert engine.runner.cuda_graphs is not None and engine.runner.piecewise_graphs is not None
        outs = _run(engine, prompts, loras)
        for out, ref, name in zip(outs, expected, loras):
            assert out["output_ids"] == ref["output_ids"], name
            got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
            want = [lp for lp, _, _ in ref["meta_info"]["output_token_logprobs"]]
            assert max(abs(x - y) for x, y in zip(got, want)) < 1e-3, name
        stats = engine.stats()
        assert stats["graph_steps"] > 0 and stats["piecewise_graph_steps"] > 0, stats
        # a decode batch of one adapter alone replays the graph too, and the base model is unchanged
        alone = _run(engine, [prompts[1]], ["a1"])[0]
        assert alone["output_ids"] == expected[1]["output_ids"]
        base = _run(engine, [prompts[0]], None)[0]
        assert base["output_ids"] == expected[0]["output_ids"]
    finally:
        engine.shutdown()
