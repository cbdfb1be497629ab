"""MXFP4 weights: dequantization bit for bit against transformers' own, quantization, dummy weights."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.kernels.mxfp4 import (
    FP4_VALUES,
    RANDOM_SCALE_EXPONENTS,
    SMALL_SCALE_MAX,
    Mxfp4Weight,
    dequantize_mxfp4,
    has_small_scales,
    pair_rows,
    quantize_mxfp4,
    random_mxfp4,
    swizzle_k,
    unswizzle_k,
)

mxfp4_hf = pytest.importorskip("transformers.integrations.mxfp4")


def _every_code_and_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [2, 256, 1, 16] holding every byte, scales [2, 256, 1] holding every exponent 0..255."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # [16, 16]: all byte values
    blocks = blocks.repeat(2, 16, 1).reshape(2, 256, 1, 16)  # [E=2, N=256, G=1, 16]
    scales = torch.stack((torch.arange(256), torch.arange(255, -1, -1))).to(torch.uint8).reshape(2, 256, 1)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_is_bitwise_transformers(dtype):
    """Every code under every exponent (0..255, inf/nan included) and a random [E, N, K] weight."""
    gen = torch.Generator().manual_seed(0)
    random_blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=gen)
    random_scales = torch.randint(110, 135, (3, 40, 4), dtype=torch.uint8, generator=gen)
    for blocks, scales in (_every_code_and_scale(), (random_blocks, random_scales)):
        theirs = mxfp4_hf.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, K, N]
        ours = dequantize_mxfp4(blocks, scales, dtype)  # [E, N, K]
        assert ours.shape == (blocks.shape[0], blocks.shape[1], blocks.shape[2] * 32) and ours.dtype == dtype
        bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
        assert torch.equal(ours.view(bits), theirs.transpose(1, 2).contiguous().view(bits))


def test_dequantize_layout_low_nibble_first():
    """Byte 0x71 at position j holds code 1 (0.5) at k = 2j and code 7 (6.0) at k = 2j + 1."""
    blocks = torch.zeros(1, 1, 2, 16, dtype=torch.uint8)
    blocks[0, 0, 1, 3] = 0x71  # group 1, byte 3 -> k = 32 + 6, 32 + 7
    scales = torch.tensor([[[127, 128]]], dtype=torch.uint8)  # group 0: 2^0, group 1: 2^1
    w = dequantize_mxfp4(blocks, scales, torch.float32)[0, 0]  # [64]
    expected = torch.zeros(64)
    expected[38], expected[39] = 0.5 * 2, 6.0 * 2
    assert torch.equal(w, expected)
    assert FP4_VALUES[1] == 0.5 and FP4_VALUES[7] == 6.0


def test_quantize_rounds_to_nearest_ties_to_even():
    # one block, scale pinned to 2^0 by its largest magnitude 6
    row = torch.zeros(32)
    values = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.1, 0.3, 4.9, 5.1, -2.4]
    expected = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -0.0, 0.5, 4.0, 6.0, -2.0]
    row[: len(values)] = torch.tensor(values)
    q = quantize_mxfp4(row.reshape(1, 1, 32))
    assert q.scales.item() == 127
    got = q.dequantize(torch.float32).reshape(32)
    assert got[: len(values)].tolist() == expected
    assert torch.equal(got[len(values):], torch.zeros(32 - len(values)))


def test_quantize_error_bound_and_round_trip():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 8, 128, generator=gen) * 0.02
    q = quantize_mxfp4(w)
    assert q.shape == (2, 8, 128) and q.blocks.shape == (2, 8, 4, 16) and q.scales.shape == (2, 8, 4)
    deq = q.dequantize(torch.float32)
    scale = torch.pow(2.0, q.scales.float() - 127).repeat_interleave(32, dim=-1)  # [2, 8, 128]
    scaled = (w / scale).abs()
    assert scaled.max() <= 6.0  # the scale never saturates a block
    half_gap = torch.where(scaled < 2, 0.25, torch.where(scaled < 4, 0.5, 1.0)) * scale
    assert ((deq - w).abs() <= half_gap).all()
    # values already on the grid come back unchanged (scales may differ, values may not)
    assert torch.equal(quantize_mxfp4(deq).dequantize(torch.float32), deq)


def test_random_mxfp4_is_seeded_and_small():
    a = random_mxfp4(4, 64, 256, torch.Generator().manual_seed(3))
    b = random_mxfp4(4, 64, 256, torch.Generator().manual_seed(3))
    assert torch.equal(a.blocks, b.blocks) and torch.equal(a.scales, b.scales)
    assert a.shape == (4, 64, 256) and a.nbytes == 4 * 64 * 256 // 2 + 4 * 64 * 8
    lo, hi = RANDOM_SCALE_EXPONENTS
    assert a.scales.min() >= 127 + lo and a.scales.max() <= 127 + hi
    w = a.dequantize(torch.float32)
    rms = w.pow(2).mean().sqrt().item()
    assert 0.008 < rms < 0.03 and w.abs().max() <= 6 * 2.0 ** hi


def test_mxfp4_weight_validates_its_tensors():
    with pytest.raises(TypeError, match="uint8"):
        Mxfp4Weight(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[E, N, K/32, 16\]"):
        Mxfp4Weight(torch.zeros(1, 2, 1, 8, dtype=torch.uint8), torch.zeros(1, 2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not match"):
        Mxfp4Weight(torch.zeros(1, 2, 1, 16, dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(1, 2, 48))


def test_swizzle_k_places_each_lanes_bytes_together():
    """Within each 32-byte span, logical byte 4i + c sits at 8c + i: lane c of a quad (which the Hopper
    MMA gives the element pairs 2c, 2c + 1 and 2c + 8, 2c + 9 of every 16) finds its bytes contiguous."""
    blocks = torch.arange(128, dtype=torch.uint8).reshape(1, 2, 4, 16)  # two rows of 64 bytes (K = 128)
    stored = swizzle_k(blocks).reshape(2, 2, 32)  # [row, span, position]
    for row in range(2):
        for span in range(2):
            for c in range(4):
                for i in range(8):
                    assert int(stored[row, span, 8 * c + i]) == 64 * row + 32 * span + 4 * i + c
    assert torch.equal(unswizzle_k(swizzle_k(blocks)), blocks)
    assert swizzle_k(blocks).shape == blocks.shape


def test_swizzled_weight_dequantizes_to_the_same_values():
    w = random_mxfp4(3, 8, 192, torch.Generator().manual_seed(0))
    sw = w.swizzled()
    assert sw.k_swizzled and not w.k_swizzled and sw.swizzled() is sw
    assert not torch.equal(sw.blocks, w.blocks)
    assert torch.equal(sw.dequantize(torch.float32), w.dequantize(torch.float32))
    assert torch.equal(sw.expert(1).dequantize(torch.float32), w.expert(1).dequantize(torch.float32))
    assert sw.to("cpu").k_swizzled


def test_small_scales_are_checked_once_when_swizzled():
    """``swizzled`` (how weights are prepared for the kernels) records whether every scale exponent is at
    most ``SMALL_SCALE_MAX``, which lets the kernel fold a constant into the scales; views keep the flag."""
    w = random_mxfp4(2, 4, 128, torch.Generator().manual_seed(1))
    assert has_small_scales(w.scales) and not w.small_scales  # unknown until checked
    sw = w.swizzled()
    assert sw.small_scales and sw.expert(1).small_scales and sw.to("cpu").small_scales
    big = Mxfp4Weight(w.blocks, w.scales.clone(), False)
    big.scales[1, 3, 0] = SMALL_SCALE_MAX + 1
    assert not has_small_scales(big.scales) and not big.swizzled().small_scales
    big.scales[1, 3, 0] = SMALL_SCALE_MAX
    assert has_small_scales(big.scales)


def test_pair_rows_exchanges_nibbles_of_rows_r_and_r_plus_8():
    """In every 16 rows, the byte of row r + 8h (r < 8) holds element 2c + h of row r (low nibble) and of
    row r + 8 (high nibble), at every byte position; a 2 x 2 nibble transpose, so its own inverse."""
    gen = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (2, 32, 2, 16), generator=gen, dtype=torch.uint8)
    paired = pair_rows(blocks)
    assert paired.shape == blocks.shape and torch.equal(pair_rows(paired), blocks)
    rows, stored = blocks.flatten(-2).long(), paired.flatten(-2).long()  # [E, N, K/2]
    nibble = (rows & 0x0F, rows >> 4)  # element 2c, element 2c + 1 of each row
    for group in range(2):
        for r in range(8):
            top, bottom = 16 * group + r, 16 * group + r + 8
            for h in range(2):
                assert torch.equal(stored[:, top + 8 * h] & 0x0F, nibble[h][:, top])
                assert torch.equal(stored[:, top + 8 * h] >> 4, nibble[h][:, bottom])
    with pytest.raises(ValueError, match="multiple of 16"):
        pair_rows(blocks[:, :24])


def test_swizzled_weights_are_row_paired_where_rows_come_in_16s():
    """``swizzled`` pairs rows when N is a multiple of 16 (and not when asked not to); paired weights
    dequantize to the same values, and their views keep the flag."""
    w = random_mxfp4(3, 32, 128, torch.Generator().manual_seed(3))
    sw = w.swizzled()
    assert sw.row_paired and sw.expert(2).row_paired and sw.to("cpu").row_paired
    assert torch.equal(sw.natural_blocks(), w.blocks)
    assert torch.equal(sw.dequantize(torch.float32), w.dequantize(torch.float32))
    assert torch.equal(sw.expert(2).dequantize(torch.float32), w.expert(2).dequantize(torch.float32))
    unpaired = w.swizzled(pair=False)
    assert unpaired.k_swizzled and not unpaired.row_paired and torch.equal(unpaired.blocks, swizzle_k(w.blocks))
    odd = random_mxfp4(1, 24, 128, torch.Generator().manual_seed(4))
    assert not odd.swizzled().row_paired
    with pytest.raises(ValueError, match="multiple of 16"):
        Mxfp4Weight(odd.blocks, odd.scales, row_paired=True)


def test_swizzle_needs_k_a_multiple_of_64():
    w = random_mxfp4(1, 4, 96)
    with pytest.raises(ValueError, match="multiple of 64"):
        w.swizzled()
    with pytest.raises(ValueError, match="multiple of 64"):
        Mxfp4Weight(w.blocks, w.scales, k_swizzled=True)
