"""Under tensor parallelism a rank reads only its part of each split checkpoint tensor.

``iter_safetensors_weights(lazy=True)`` (what a rank of ``Engine(tp_size=N)`` loads with) hands the
weight loaders ``LazyTensor``s that they narrow before reading. Checked here: ``LazyTensor`` reads the
region ``narrow``/``transpose``/``to`` describe and only that; and, counting the bytes safetensors
hands out (``get_tensor`` / ``get_slice(...)[...]``; its tensors are views of the memory-mapped file,
so those are the bytes a load touches), rank 1 of 2 of a dense model and of every MoE format reads
exactly its rows or columns of every split tensor and replicated ones (norms, routers) whole, and
holds the same parameters as when it reads every tensor whole. The whole reads (``lazy=False``, the
single-rank path and what every rank did before) are counted too: the same counter sees them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open as real_safe_open  # bound before ``reads`` replaces safetensors.safe_open
from safetensors.torch import save_file

from plait.runtime.distributed import TensorParallelLayout
from plait.runtime.executor.loader import LazyTensor, ModelLoadError, iter_safetensors_weights, materialized
from plait.runtime.models.config import ModelConfig


class _CountingSlice:
    def __init__(self, part, name: str, reads: Counter):
        self._part, self._name, self._reads = part, name, reads

    def get_shape(self):
        return self._part.get_shape()

    def get_dtype(self):
        return self._part.get_dtype()

    def __getitem__(self, index):
        tensor = self._part[index]
        self._reads[self._name] += tensor.numel() * tensor.element_size()
        return tensor


class _CountingHandle:
    """A ``safe_open`` handle that counts the bytes of every tensor it hands out, by name."""

    def __init__(self, handle, reads: Counter):
        self._handle, self._reads = handle, reads

    def keys(self):
        return self._handle.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(name)
        self._reads[name] += tensor.numel() * tensor.element_size()
        return tensor

    def get_slice(self, name: str) -> _CountingSlice:
        return _CountingSlice(self._handle.get_slice(name), name, self._reads)


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """Bytes read per checkpoint tensor name while the test runs."""
    import safetensors

    counts: Counter = Counter()
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _CountingHandle(real(*a, **k), counts))
    return counts


def _file_bytes(directory: Path) -> dict[str, int]:
    """Each checkpoint tensor's size in bytes."""
    sizes = {}
    for file in directory.glob("*.safetensors"):
        with real_safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                tensor = f.get_tensor(name)
                sizes[name] = tensor.numel() * tensor.element_size()
    return sizes


# --- LazyTensor on its own --------------------------------------------------------------------------------


def test_lazy_tensor_reads_the_region_it_describes(tmp_path, reads):
    whole = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5).to(torch.bfloat16)
    save_file({"w": whole, "n": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    lazy = dict(iter_safetensors_weights(tmp_path, lazy=True))
    w = lazy["w"]
    assert isinstance(w, LazyTensor) and w.shape == (4, 6, 5) and w.dtype == torch.bfloat16 and w.dim() == 3
    assert not reads  # the header only
    view = w.transpose(-1, -2).narrow(0, 1, 2).narrow(1, 3, 2).narrow(2, 2, 3).to(torch.float32)
    expected = whole.transpose(-1, -2).narrow(0, 1, 2).narrow(1, 3, 2).narrow(2, 2, 3).float()
    assert view.shape == expected.shape and view.is_floating_point()
    got = materialized(view)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert reads["w"] == 2 * 2 * 3 * 2  # the region's 12 bf16 values, nothing else
    assert torch.equal(materialized(lazy["n"]), torch.ones(3)) and reads["n"] == 3 * 4  # whole: get_tensor
    assert materialized(expected) is expected  # a tensor passes through
    with pytest.raises(ValueError, match="cannot take"):
        w.narrow(1, 4, 3)
    with pytest.raises(IndexError):
        w.narrow(3, 0, 1)


def test_lazy_read_errors_name_the_file_and_tensor(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    w = dict(iter_safetensors_weights(tmp_path, lazy=True))["w"].narrow(0, 0, 2)

    class Failing:
        def __getitem__(self, index):
            raise OSError("disk went away")

    w._part = Failing()
    with pytest.raises(ModelLoadError, match=r"'w'.*model.safetensors.*disk went away"):
        w.materialize()


# --- a rank's load ----------------------------------------------------------------------------------------

DENSE = dict(model_type="llama", hidden_size=64, num_layers=2, num_heads=9, num_kv_heads=3, head_dim=8,
             intermediate_size=96, vocab_size=101, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
             tie_word_embeddings=False)


def _dense_checkpoint(path: Path) -> ModelConfig:
    """A tiny untied Llama in bf16 (a float32 model converts it: before, every rank converted every
    tensor whole)."""
    cfg = ModelConfig(**DENSE)
    H, d, V, inter = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
        })
    gen = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()},
              str(path / "model.safetensors"))
    return cfg


def _dense_part_bytes(name: str, cfg: ModelConfig, layout: TensorParallelLayout) -> int:
    """The bytes (bf16) of this rank's part of a checkpoint tensor."""
    H, d = cfg.hidden_size, cfg.head_dim
    parts = {"q_proj": layout.head_count * d * H, "k_proj": layout.kv_head_count * d * H,
             "v_proj": layout.kv_head_count * d * H, "o_proj": H * layout.head_count * d,
             "gate_proj": layout.intermediate_count * H, "up_proj": layout.intermediate_count * H,
             "down_proj": H * layout.intermediate_count, "embed_tokens": layout.vocab_count * H,
             "lm_head": layout.vocab_count * H}
    module = name.split(".")[-2]
    return 2 * parts.get(module, H)  # norms: whole


def _load(cfg: ModelConfig, layout: TensorParallelLayout, directory: Path, lazy: bool) -> dict[str, torch.Tensor]:
    from plait.runtime.executor.model_runner import materialize
    from plait.runtime.layers.attention import TorchAttentionBackend
    from plait.runtime.models.architectures import model_class

    with torch.device("meta"):
        model = model_class(cfg.model_type)(cfg, TorchAttentionBackend(), 64, layout=layout)
    materialize(model, torch.device("cpu"), torch.float32)
    loaded = model.load_weights(iter_safetensors_weights(directory, lazy=lazy))
    params = dict(model.named_parameters())
    assert loaded == params.keys()
    return {n: p.detach().clone() for n, p in params.items()}


def test_a_dense_rank_reads_only_its_rows_and_columns(tmp_path, reads):
    """Rank 1 of 2 (2 of the 3 KV heads on rank 0: an uneven split) reads exactly its part of each split
    tensor, norms whole; reading every tensor whole (the old way) gives it the same parameters."""
    cfg = _dense_checkpoint(tmp_path)
    full = _file_bytes(tmp_path)
    layout = TensorParallelLayout.for_model(cfg, 1, 2)
    lazy = _load(cfg, layout, tmp_path, lazy=True)
    assert reads.keys() == full.keys()
    for name, size in full.items():
        assert reads[name] == _dense_part_bytes(name, cfg, layout), name
        if "norm" not in name:
            assert reads[name] < size, name
    assert sum(reads.values()) < 0.6 * sum(full.values())
    reads.clear()
    whole = _load(cfg, layout, tmp_path, lazy=False)
    assert dict(reads) == full  # what every rank read before: each tensor whole
    assert lazy.keys() == whole.keys()
    for name in lazy:
        assert torch.equal(lazy[name], whole[name]), name


MOE = ["mixtral", "qwen3_moe", "gpt_oss", "gpt_oss_mxfp4"]


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    """Tiny random MoE checkpoints (the Hub's per-expert layout for Mixtral and Qwen3-MoE, transformers'
    fused bf16 experts [E, H, 2I] for GPT-OSS, GPT-OSS's MXFP4 blocks and scales): name -> directory."""
    pytest.importorskip("transformers")
    from tests.runtime.models.moe_helpers import build_hf
    from tests.runtime.models.test_gpt_oss_mxfp4 import write_mxfp4_checkpoint

    dirs = {}
    for name in MOE:
        dirs[name] = tmp_path_factory.mktemp(name)
        if name == "gpt_oss_mxfp4":
            write_mxfp4_checkpoint(build_hf("gpt_oss"), dirs[name])
        else:
            build_hf(name).save_pretrained(dirs[name], safe_serialization=True)
    return dirs


@pytest.mark.parametrize("name", MOE)
def test_a_moe_rank_reads_only_its_slice_of_every_expert(name, moe_checkpoints, reads):
    """Rank 1 of 2 reads half of every expert tensor (its slice of the intermediate dimension: gate/up rows,
    interleaved or per half, and down columns, MXFP4 in whole blocks), the routers and the down
    projection's bias whole, and holds what it holds when it reads every tensor whole."""
    from plait.runtime.executor.loader import load_config

    directory = moe_checkpoints[name]
    cfg = ModelConfig.from_hf(load_config(directory))
    layout = TensorParallelLayout.for_model(cfg, 1, 2)
    full = _file_bytes(directory)
    lazy = _load(cfg, layout, directory, lazy=True)
    experts = [n for n in full if ".experts." in n and not n.endswith("down_proj_bias")]
    assert experts
    for n in experts:
        assert reads[n] == full[n] // 2, n
    for n in full:
        assert reads[n] <= full[n], n
        if ".gate." in n or ".router." in n or "norm" in n or n.endswith("down_proj_bias"):
            assert reads[n] == full[n], n  # replicated: whole
    reads.clear()
    whole = _load(cfg, layout, directory, lazy=False)
    assert dict(reads) == full
    for n in lazy:
        assert torch.equal(lazy[n], whole[n]), n
