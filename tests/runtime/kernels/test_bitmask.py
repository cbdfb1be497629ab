"""apply_token_bitmask_inplace (Triton) vs apply_token_bitmask_ref (torch): results must be identical."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from plait.runtime.kernels.bitmask import (  # noqa: E402
    apply_token_bitmask_inplace,
    apply_token_bitmask_ref,
    pack_bitmask,
    unpack_bitmask,
)


def random_case(B, V, device, dtype=torch.float32, seed=0, density=0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((B, V), generator=gen).to(dtype).to(device)
    allowed = torch.rand((B, V), generator=gen) < density
    if V > 31:
        allowed[:, 31] = True  # bit 31 (the sign bit of word 0) set somewhere
    return logits, pack_bitmask(allowed).to(device), allowed.to(device)


def test_pack_unpack_roundtrip():
    allowed = torch.rand((3, 100)) < 0.5
    packed = pack_bitmask(allowed)
    assert packed.shape == (3, 4) and packed.dtype == torch.int32
    assert torch.equal(unpack_bitmask(packed, 100), allowed)


@pytest.mark.parametrize("V", [1, 32, 100, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitmask_all_rows(kernel_device, V, dtype):
    logits, bitmask, allowed = random_case(4, V, kernel_device, dtype, seed=V)
    ref = logits.clone()
    apply_token_bitmask_inplace(logits, bitmask)
    apply_token_bitmask_ref(ref, bitmask)
    assert torch.equal(logits, ref)
    assert torch.equal(torch.isinf(logits), ~allowed)


def test_bitmask_selected_rows_only(kernel_device):
    logits, bitmask, _ = random_case(5, 300, kernel_device, seed=1)
    before = logits.clone()
    indices = torch.tensor([3, 0], dtype=torch.int32, device=kernel_device)
    ref = logits.clone()
    apply_token_bitmask_inplace(logits, bitmask, indices)
    apply_token_bitmask_ref(ref, bitmask, indices)
    assert torch.equal(logits, ref)
    for row in (1, 2, 4):  # unconstrained rows untouched
        assert torch.equal(logits[row], before[row])


def test_bitmask_vocab_size_leaves_padding(kernel_device):
    logits, bitmask, _ = random_case(2, 70, kernel_device, seed=2, density=0.0)
    tail = logits[:, 60:].clone()
    ref = logits.clone()
    apply_token_bitmask_inplace(logits, bitmask, vocab_size=60)
    apply_token_bitmask_ref(ref, bitmask, vocab_size=60)
    assert torch.equal(logits, ref)
    assert torch.equal(logits[:, 60:], tail)
    with pytest.raises(ValueError, match="vocab_size"):
        apply_token_bitmask_inplace(logits, bitmask, vocab_size=200)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_llama_vocab(dtype):
    logits, bitmask, allowed = random_case(256, 128256, "cuda", dtype, seed=3)
    ref = logits.clone()
    indices = torch.arange(0, 256, 3, device="cuda")
    apply_token_bitmask_inplace(logits, bitmask, indices)
    apply_token_bitmask_ref(ref, bitmask, indices)
    assert torch.equal(logits, ref)
