"""Multi-LoRA serving on the bundled model against transformers + peft (float32, CPU).

One engine for the module (two device slots, chunked prefill of 48 tokens, so the long prompt is
prefilled in chunks and batches mix prefill and decode rows); four random adapters made with peft:
different ranks and alphas, one rsLoRA, one on q/v only, one on o/down only (loaded at run time).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from plait.runtime.engine import Engine
from plait.runtime.lora import (
    LoraCapacityError,
    LoraFormatError,
    LoraMismatchError,
    UnknownLoraError,
    read_adapter,
)
from tests.lora_helpers import save_random_adapters
from tests.runtime.engine_helpers import assert_no_leak, greedy_params

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.model

NEW_TOKENS = 6
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig arguments
    "a1": {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    "a2": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ALL},
    "a3": {"r": 16, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "a4": {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def prompts(varied_prompt_ids) -> list[list[int]]:
    """A chat prompt and 120 tokens of the long raw one (prefilled in three chunks)."""
    return [varied_prompt_ids[0], varied_prompt_ids[-1][:120]]


@pytest.fixture(scope="module")
def peft_setup(hf_model, tmp_path_factory):
    """(the peft model holding every adapter, {name: saved adapter directory})."""
    torch.manual_seed(0)
    model, paths = save_random_adapters(copy.deepcopy(hf_model), ADAPTERS, tmp_path_factory.mktemp("lora"),
                                        scale_b=0.1)
    for name, path in paths.items():
        assert json.loads((Path(path) / "adapter_config.json").read_text())["r"] == ADAPTERS[name]["r"]
    return model, paths


def _reference(model, name: str | None, ids: list[int]) -> tuple[list[int], list[float]]:
    """transformers + peft: greedy tokens and their logprobs under adapter ``name`` (None: base)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if name is None:
            with model.disable_adapter():
                return _greedy(model, x)
        model.set_adapter(name)
        return _greedy(model, x)


def _greedy(model, x: torch.Tensor) -> tuple[list[int], list[float]]:
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, x.shape[1]:].tolist()
    lps = [torch.log_softmax(step[0].float(), dim=-1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, lps


class _References(dict):
    """(adapter or None, prompt index) -> transformers + peft's (tokens, logprobs), computed on first use."""

    def __init__(self, model, prompts):
        super().__init__()
        self.model, self.prompts = model, prompts

    def __missing__(self, key):
        name, i = key
        self[key] = _reference(self.model, name, self.prompts[i])
        return self[key]


@pytest.fixture(scope="module")
def references(peft_setup, prompts) -> dict:
    return _References(peft_setup[0], prompts)


@pytest.fixture(scope="module")
def engine(bundled_model_dir, peft_setup):
    _, paths = peft_setup
    eng = Engine(model=str(bundled_model_dir), device="cpu", chunked_prefill_size=48, max_loras_per_batch=2,
                 lora_paths=[f"{n}={paths[n]}" for n in ("a1", "a2", "a3")], max_lora_rank=16)
    yield eng
    eng.shutdown()


def _check(out: dict, ref: tuple[list[int], list[float]]) -> None:
    tokens, lps = ref
    assert out["output_ids"] == tokens
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got, lps)) < 1e-4


def _gen(engine, ids, lora, **kw):
    return engine.generate(input_ids=ids, sampling_params=greedy_params(NEW_TOKENS), lora_path=lora,
                           return_logprob=True, **kw)


def test_adapters_change_the_output(references):
    """Every adapter moves the first token's logprob far beyond the 1e-4 the comparisons allow, so a
    missing or misplaced LoRA term fails them; some change the greedy tokens too."""
    base = references[(None, 0)]
    for name in ADAPTERS:
        assert abs(references[(name, 0)][1][0] - base[1][0]) > 1e-3, name
    assert len({tuple(references[(name, 0)][0]) for name in [None, *ADAPTERS]}) >= 2


def test_each_adapter_alone(engine, prompts, references):
    for name, i in [(None, 0), ("a1", 1), ("a2", 0), ("a3", 1)]:
        engine.flush_cache()
        _check(_gen(engine, prompts[i], name), references[(name, i)])
    assert_no_leak(engine)


def test_one_mixed_batch_and_prefix_cache_per_adapter(engine, prompts, references):
    """Base and two adapters in one batch (the long prompt prefilled in chunks beside decode rows); then
    the same prompt under another adapter gets no cache hit, under the same one it does."""
    engine.flush_cache()
    batch = [prompts[1], prompts[0], prompts[0], prompts[1]]
    loras = ["a1", None, "a2", "a2"]
    outs = engine.generate(input_ids=batch, sampling_params=greedy_params(NEW_TOKENS), lora_path=loras,
                           return_logprob=True)
    for out, lora, i in zip(outs, loras, [1, 0, 0, 1]):
        _check(out, references[(lora, i)])
    # prompts[1] is cached under a1 and a2, prompts[0] under the base and a2; never under a3
    out = _gen(engine, prompts[1], "a3")
    assert out["meta_info"]["cached_tokens"] == 0
    _check(out, references[("a3", 1)])
    out = _gen(engine, prompts[0], "a1")
    assert out["meta_info"]["cached_tokens"] == 0
    _check(out, references[("a1", 0)])
    out = _gen(engine, prompts[1], "a1")
    assert out["meta_info"]["cached_tokens"] >= len(prompts[1]) - 1
    _check(out, references[("a1", 1)])
    # a namespace of the caller's is combined with the adapter's, never shared across adapters
    out = _gen(engine, prompts[1], "a2", cache_namespace="tenant")
    assert out["meta_info"]["cached_tokens"] == 0
    assert_no_leak(engine)


def test_lru_offload_with_two_slots_and_run_time_loading(engine, peft_setup, prompts, references):
    """Four adapters in use with two device slots (a4 loaded at run time): they take turns, results
    stay exact; an adapter in use cannot be unloaded; unknown names are a ValueError naming the loaded."""
    _, paths = peft_setup
    engine.load_lora_adapter("a4", paths["a4"])
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_lora_adapter("a4", paths["a4"])
    before = engine.stats()
    loras = ["a1", "a2", "a3", "a4", None]
    outs = engine.generate(input_ids=[prompts[0]] * 5, sampling_params=greedy_params(NEW_TOKENS), lora_path=loras,
                           return_logprob=True)
    for out, lora in zip(outs, loras):
        _check(out, references[(lora, 0)])
    stats = engine.stats()
    assert stats["lora_loaded"] == 4 and stats["lora_resident"] <= 2
    assert stats["lora_offloads"] - before["lora_offloads"] >= 2  # at least two had to leave for the others
    # in use: refused
    done = []
    engine.submit(input_ids=prompts[0], sampling_params={"max_new_tokens": 2000, "temperature": 0.0,
                                                          "ignore_eos": True},
                  lora_path="a4", rid="long", on_output=lambda i, e: done.append(e) if e["finished"] else None)
    with pytest.raises(ValueError, match="in use"):
        engine.unload_lora_adapter("a4")
    engine.abort("long")
    from tests.runtime.engine_helpers import wait_until

    wait_until(lambda: done, what="the aborted request")
    engine.unload_lora_adapter("a4")
    with pytest.raises(UnknownLoraError, match=r"a1.*a2.*a3"):
        _gen(engine, prompts[0], "a4")
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        engine.generate(input_ids=[prompts[0]] * 2, lora_path=["a1", "nope"])
    # loaded again under the same name: its old cached KV is not reused
    engine.load_lora_adapter("a4", paths["a4"])
    assert _gen(engine, prompts[0], "a4")["meta_info"]["cached_tokens"] == 0
    out = _gen(engine, prompts[0], "a4")
    assert out["meta_info"]["cached_tokens"] > 0
    _check(out, references[("a4", 0)])
    engine.flush_cache()
    engine.unload_lora_adapter("a4")
    engine.load_lora_adapter("a4", paths["a4"])
    assert engine.lora_adapters().keys() == {"a1", "a2", "a3", "a4"}
    engine.unload_lora_adapter("a4")
    assert_no_leak(engine)


def test_unreadable_adapter_configs_are_format_errors(tmp_path):
    """adapter_config.json missing, too large, not JSON or not an object: a LoraFormatError naming it."""
    from plait.runtime.lora.adapter import MAX_CONFIG_BYTES

    with pytest.raises(LoraFormatError, match="no adapter_config.json"):
        read_adapter(str(tmp_path))
    file = tmp_path / "adapter_config.json"
    for text, message in [(" " * (MAX_CONFIG_BYTES + 1), f"larger than {MAX_CONFIG_BYTES} bytes"),
                          ("{not json", "cannot read .*adapter_config.json"),
                          ("[8]", "adapter_config.json is not a JSON object")]:
        file.write_text(text)
        with pytest.raises(LoraFormatError, match=message):
            read_adapter(str(tmp_path))


def test_bad_adapters_are_typed_errors(engine, peft_setup, tmp_path):
    _, paths = peft_setup
    with pytest.raises(LoraFormatError, match="not a directory"):
        read_adapter(str(tmp_path / "missing"))
    src = Path(paths["a1"])
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    (binary / "adapter_model.bin").write_bytes(b"\0")
    with pytest.raises(LoraFormatError, match="adapter_model.bin"):
        read_adapter(str(binary))
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(LoraFormatError, match="use_dora"):
        read_adapter(str(dora))
    # another base model: a layer beyond this one's, and a wrong shape
    from safetensors.torch import save_file

    for name, tensors in {
        "deep": {"base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight": torch.zeros(8, 576),
                 "base_model.model.model.layers.99.self_attn.q_proj.lora_B.weight": torch.zeros(576, 8)},
        "wide": {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 1024),
                 "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(1024, 8)},
    }.items():
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
        save_file(tensors, str(d / "adapter_model.safetensors"))
        with pytest.raises(LoraMismatchError):
            engine.load_lora_adapter(name, str(d))
    # rank above max_lora_rank (16)
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(32, 576),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(576, 32)},
              str(big / "adapter_model.safetensors"))
    with pytest.raises(LoraCapacityError, match="max_lora_rank"):
        engine.load_lora_adapter("big", str(big))
    assert set(engine.lora_adapters()) == {"a1", "a2", "a3"}


def test_lora_settings_are_checked():
    from plait.runtime.config import EngineConfig

    assert EngineConfig(lora_paths={"x": "/p"}).lora_paths == (("x", "/p"),)
    assert EngineConfig(lora_paths=["x=/p", "/q"]).lora_paths == (("x", "/p"), ("/q", "/q"))
    assert not EngineConfig().lora_enabled and EngineConfig(enable_lora=True).lora_enabled

    with pytest.raises(ValueError, match="max_loaded_loras"):
        EngineConfig(max_loras_per_batch=8, max_loaded_loras=4)
    with pytest.raises(ValueError, match="twice"):
        EngineConfig(lora_paths=["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="lora_target_modules"):
        EngineConfig(lora_target_modules=("lm_head",))


def test_retraction_with_adapters(bundled_model_dir, peft_setup, prompts, references):
    """A KV pool too small for the batch: requests with adapters are retracted (their slots released)
    and resumed (acquired again), with exact results and nothing leaked."""
    _, paths = peft_setup
    cases = [("a1", 1), ("a2", 0), ("a1", 0), ("a3", 1)]
    with Engine(model=str(bundled_model_dir), device="cpu", max_total_tokens=len(prompts[1]) + 30,
                chunked_prefill_size=64, schedule_conservativeness=0, max_loras_per_batch=2,
                lora_paths={n: paths[n] for n in ("a1", "a2", "a3")}, max_lora_rank=16) as eng:
        outs = eng.generate(input_ids=[prompts[i] for _, i in cases], sampling_params=greedy_params(NEW_TOKENS),
                            lora_path=[name for name, _ in cases], return_logprob=True)
        for out, key in zip(outs, cases):
            _check(out, references[key])
        assert eng.stats()["retractions"] > 0
        assert all(eng.runner.lora.in_use(name) == 0 for name in ("a1", "a2", "a3"))
        assert_no_leak(eng)


def test_adapters_under_tensor_parallelism(bundled_model_dir, peft_setup, prompts, references):
    """Engine(tp_size=2) over gloo: each rank holds its part of every adapter (q/k/v and gate/up by
    output rows, o/down by input columns, the 3 KV heads split 2 + 1), and rank 1 follows rank 0's
    adapter changes: start-up adapters, one loaded at run time, slots taken in turn by three adapters
    with two slots, an unload. Mixed with the base model in one batch, chunked prefill included, the
    tokens and logprobs are transformers + peft's."""
    _, paths = peft_setup
    with Engine(model=str(bundled_model_dir), device="cpu", tp_size=2, chunked_prefill_size=48,
                max_loras_per_batch=2, lora_paths={n: paths[n] for n in ("a1", "a2")}, max_lora_rank=16) as eng:
        eng.load_lora_adapter("a4", paths["a4"])
        cases = [("a1", 1), (None, 0), ("a2", 0)]
        outs = eng.generate(input_ids=[prompts[i] for _, i in cases], sampling_params=greedy_params(NEW_TOKENS),
                            lora_path=[name for name, _ in cases], return_logprob=True)
        for out, key in zip(outs, cases):
            _check(out, references[key])
        _check(_gen(eng, prompts[0], "a4"), references[("a4", 0)])  # a slot handed over: rank 1 copies it too
        eng.unload_lora_adapter("a2")
        _check(_gen(eng, prompts[0], "a1"), references[("a1", 0)])
        assert eng.stats()["lora_offloads"] >= 1
        assert_no_leak(eng)
