"""The fused MoE routing kernel against its torch definition (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.kernels.moe_routing import route_topk, route_topk_ref


def _logits(T: int, E: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("routing,norm", [("topk_then_softmax", False), ("softmax_then_topk", True),
                                          ("softmax_then_topk", False)])
@pytest.mark.parametrize("T,E,k", [(1, 128, 4), (7, 6, 2), (5, 60, 8), (3, 32, 1)])
def test_kernel_matches_the_torch_definition(kernel_device, routing, norm, T, E, k):
    logits = _logits(T, E, seed=T * E + k)
    weights, ids = route_topk(logits.to(kernel_device), k, routing, norm)
    ref_weights, ref_ids = route_topk_ref(logits, k, routing, norm)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu().long(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("round_to", [torch.bfloat16, torch.float16])
def test_weights_rounded_to_the_activation_dtype(kernel_device, round_to):
    """GPT-OSS and Qwen3-MoE use the weights in the activation dtype: the same rounding as the reference."""
    logits = _logits(9, 32, seed=3, dtype=round_to)
    for routing in ("topk_then_softmax", "softmax_then_topk"):
        weights, ids = route_topk(logits.to(kernel_device), 4, routing, True, round_to)
        ref_weights, ref_ids = route_topk_ref(logits, 4, routing, True, round_to)
        assert torch.equal(ids.cpu().long(), ref_ids)
        assert torch.equal(weights.cpu(), ref_weights)  # one rounding of equal-to-1e-6 values: equal


def test_ties_go_to_the_lower_expert(kernel_device):
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]])
    weights, ids = route_topk(logits.to(kernel_device), 2, "topk_then_softmax")
    assert ids.cpu().tolist() == [[1, 3]]
    torch.testing.assert_close(weights.cpu(), torch.tensor([[0.5, 0.5]]))


def test_fallbacks_and_errors():
    """k not a power of two, and no tokens, take the reference (int32 ids all the same); bad input raises."""
    logits = _logits(4, 16, seed=5)
    weights, ids = route_topk(logits, 3, "topk_then_softmax")
    ref_weights, ref_ids = route_topk_ref(logits, 3, "topk_then_softmax")
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids) and torch.equal(weights, ref_weights)
    weights, ids = route_topk(logits[:0], 2, "topk_then_softmax")
    assert weights.shape == (0, 2) and ids.shape == (0, 2)
    with pytest.raises(ValueError, match="routing"):
        route_topk(logits, 2, "sigmoid")
    with pytest.raises(ValueError, match="k must be"):
        route_topk(logits, 17, "topk_then_softmax")
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route_topk(logits[0], 2, "topk_then_softmax")
