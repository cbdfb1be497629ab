"""Convert a Llama-architecture GGUF file (llama.cpp format) into a Hugging Face style directory.

The output holds ``config.json``, float32 ``model.safetensors`` with Hugging Face parameter names,
the tokenizer (with its chat template) and ``generation_config.json``. It is written into a temporary
sibling directory and renamed into place, with the marker ``.plait-complete`` written last, so a
directory with the marker is always whole.

Tensors are dequantized with ``gguf.quants.dequantize`` and the rows of the q/k projections are
un-permuted: llama.cpp stores them permuted for its rotary layout, exactly as transformers'
``LlamaTensorProcessor._reverse_permute_weights`` undoes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

COMPLETE_MARKER = ".plait-complete"
CONVERTER_VERSION = 1

# llama.cpp tensor name -> Hugging Face name (per-layer names are relative to model.layers.N.).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (``blk.3.attn_q.weight``) to its Hugging Face name.

    Raises ValueError for a tensor this converter does not know (it never drops weights silently).
    """
    if m := _LAYER_RE.match(gguf_name):
        layer, part, suffix = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} (not part of a plain Llama checkpoint)")


def reverse_permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k projection (weight or bias).

    ``n_head`` is the number of query heads for q and of key/value heads for k.
    """
    dim = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, dim, 2, *weight.shape[1:])  # [heads, half, 2, ...]
    return w.swapaxes(2, 1).reshape(weight.shape)  # [heads, 2, half, ...] -> rows


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _float32_value(value: float) -> float:
    """GGUF stores floats as float32; keep the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def build_hf_config(reader: Any, tensor_names: set[str], vocab_rows: int) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a Llama GGUF, from its ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; only 'llama' can be converted")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}")

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _float32_value(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": int(_field(reader, "llama.vocab_size", vocab_rows)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
    }


def _convert_tensors(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if ".attn_q." in t.name:
            array = reverse_permute_qk(array, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            array = reverse_permute_qk(array, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(array)
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; a leftover incomplete ``out_dir`` is replaced, a complete one kept."""
    for _ in range(3):
        try:
            os.replace(tmp, out_dir)
            return
        except OSError:
            if (out_dir / COMPLETE_MARKER).exists():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(out_dir, ignore_errors=True)
    raise OSError(f"could not move converted model into {out_dir}")


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert ``gguf_path`` into a Hugging Face style directory at ``out_dir``; returns ``out_dir``.

    Always converts (callers check ``out_dir / COMPLETE_MARKER`` to reuse a finished conversion).
    Raises FileNotFoundError for a missing file and ValueError for an unsupported architecture.
    """
    import gguf
    from safetensors.numpy import save_file

    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at {src}")
    started = time.monotonic()
    reader = gguf.GGUFReader(str(src))
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"{src} has no token_embd.weight; not a Llama checkpoint")
    config = build_hf_config(reader, names, vocab_rows=int(embd.shape[-1]))
    chat_template = _field(reader, "tokenizer.chat_template")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = _convert_tensors(reader, config)
        del reader
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        _write_json(tmp / "generation_config.json", generation)
        _save_tokenizer(src, tmp)
        marker = {
            "source": str(src.resolve()),
            "converter_version": CONVERTER_VERSION,
            "has_chat_template": chat_template is not None,
            "seconds": round(time.monotonic() - started, 2),
        }
        _write_json(tmp / COMPLETE_MARKER, marker)  # last: the directory is whole from here on
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
