"""Tests for plait.runtime.models.gguf_convert against transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from plait.runtime.models.fetch import find_bundled_gguf
from plait.runtime.models.gguf_convert import COMPLETE_MARKER, convert_gguf, hf_tensor_name, reverse_permute_qk
from plait.runtime.models.registry import preset_config, resolve_model

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def write_tiny_gguf(path: Path, *, tie: bool = True) -> dict[str, np.ndarray]:
    """A 2-layer float32 Llama GGUF with a tiny gpt2-style tokenizer; returns its tensors."""
    hidden, heads, kv_heads, ffn, layers = 16, 4, 2, 32, 2
    head_dim = hidden // heads
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["ab"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    if not tie:
        shapes["output.weight"] = (len(tokens), hidden)
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, array in arrays.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (HF -> GGUF) of q/k rows."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


# --- the bundled model against transformers ---------------------------------------------------


@pytest.fixture(scope="module")
def transformers_state() -> dict[str, torch.Tensor]:
    """State dict of transformers' own GGUF loader on the bundled model (the reference, ~25 s)."""
    from transformers import AutoModelForCausalLM

    path = find_bundled_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.model
@pytest.mark.slow
def test_bundled_weights_equal_transformers_gguf_loader(bundled_model_dir: Path, transformers_state) -> None:
    ours = load_file(str(bundled_model_dir / "model.safetensors"))
    assert set(ours) == set(transformers_state) - {"lm_head.weight"}  # tied: transformers shares it
    for layer in (0, 29):
        prefix = f"model.layers.{layer}."
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(ours[f"{prefix}self_attn.{part}.weight"], transformers_state[f"{prefix}self_attn.{part}.weight"])
    for name in ours:  # every tensor, including mlp, norms and the embedding
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], transformers_state[name]), name


@pytest.mark.model
def test_bundled_config(bundled_model_dir: Path) -> None:
    config = json.loads((bundled_model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert config == preset_config("smollm2-135m-instruct")  # the shipped config is the converter's output
    generation = json.loads((bundled_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert (bundled_model_dir / COMPLETE_MARKER).is_file()


@pytest.mark.model
def test_bundled_tokenizer_has_chat_template(bundled_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir))
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    assert json.loads((bundled_model_dir / COMPLETE_MARKER).read_text())["has_chat_template"] is True
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


# --- small synthetic GGUF files ----------------------------------------------------------------


def test_reverse_permute_undoes_llama_cpp_permute() -> None:
    weight = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    for n_head in (1, 2, 8):
        assert np.array_equal(reverse_permute_qk(llama_cpp_permute(weight, n_head), n_head), weight)
    bias = np.arange(4 * 16, dtype=np.float32)
    assert np.array_equal(reverse_permute_qk(llama_cpp_permute(bias, 4), 4), bias)


def test_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight")


def test_tiny_untied_gguf(tmp_path: Path) -> None:
    arrays = write_tiny_gguf(tmp_path / "tiny.gguf", tie=False)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]  # no temporary left behind
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)
    weights = {k: v.numpy() for k, v in load_file(str(out / "model.safetensors")).items()}
    assert np.array_equal(weights["lm_head.weight"], arrays["output.weight"])
    assert np.array_equal(weights["model.layers.1.mlp.down_proj.weight"], arrays["blk.1.ffn_down.weight"])
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    k = weights["model.layers.0.self_attn.k_proj.weight"]
    assert np.array_equal(llama_cpp_permute(q, 4), arrays["blk.0.attn_q.weight"])
    assert np.array_equal(llama_cpp_permute(k, 2), arrays["blk.0.attn_k.weight"])
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHAT_TEMPLATE


def test_tiny_gguf_through_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    source = resolve_model(tmp_path / "tiny.gguf")
    assert source.load_format == "safetensors" and source.name == "tiny"
    assert source.weights_dir.parent == tmp_path / "cache" / "models"
    assert source.weights_dir.name.startswith("gguf-")
    assert source.config["tie_word_embeddings"] is True
    assert source.tokenizer_dir == source.weights_dir
    stamp = (source.weights_dir / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(str(tmp_path / "tiny.gguf"), load_format="gguf")
    assert again.weights_dir == source.weights_dir
    assert (again.weights_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not reconverted
    dummy = resolve_model(tmp_path / "tiny.gguf", load_format="dummy")
    assert dummy.weights_dir is None and dummy.load_format == "dummy"
    with pytest.raises(ValueError, match="safetensors"):
        resolve_model(tmp_path / "tiny.gguf", load_format="safetensors")
