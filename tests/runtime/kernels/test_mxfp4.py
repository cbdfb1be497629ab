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
    pack_fragments,
    pair_rows,
    quantize_mxfp4,
    random_mxfp4,
    swizzle_k,
    unpack_fragments,
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


# ------------------------------------------------------------------ fragment-packed codes


def _run_ptx_integer_part(ptx: str, word: int) -> list[int]:
    """The integer part of a decode's PTX (everything before its bf16 multiplies), run on one 32-bit word
    given as ``$4``; returns ``$0..$3``. Knows the few instructions the decodes use."""
    regs: dict[str, int] = {"$4": word}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    for stmt in ptx.replace("\n", " ").split(";"):
        stmt = stmt.strip().strip("{}").strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, _, rest = stmt.partition(" ")
        if op.startswith("mul.rn.bf16x2"):
            break
        args = [a.strip() for a in rest.split(",")]
        dst, src = args[0], args[1:]
        if op == "mov.b32":
            out = val(src[0])
        elif op == "and.b32":
            out = val(src[0]) & val(src[1])
        elif op == "shl.b32":
            out = val(src[0]) << val(src[1])
        elif op == "shr.b32":
            out = val(src[0]) >> val(src[1])
        elif op == "lop3.b32":
            assert val(src[3]) == 0xEA, "only (a & b) | c is used"
            out = (val(src[0]) & val(src[1])) | val(src[2])
        elif op == "shf.r.wrap.b32":
            lo, hi, n = val(src[0]), val(src[1]), val(src[2]) % 32
            out = ((hi << 32 | lo) >> n)
        elif op == "prmt.b32":
            pool = val(src[0]) | val(src[1]) << 32
            sel = val(src[2])
            out = 0
            for i in range(4):
                nib = (sel >> (4 * i)) & 0xF
                byte = (pool >> (8 * (nib & 7))) & 0xFF
                if nib & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * i)
        else:
            raise AssertionError(f"unknown instruction {op}")
        regs[dst] = out & 0xFFFFFFFF
    return [regs[f"${j}"] for j in range(4)]


def _fragment_word(blocks: torch.Tensor, row: int, byte: int) -> int:
    """The word the kernel's decode takes for the fragment at (row r, logical byte c) of one expert's
    logical-order codes ``[N, K/2]``: bytes (r, c), (r + 8, c), (r, c + 4), (r + 8, c + 4)."""
    b = blocks.flatten(-2).long()
    parts = (b[row, byte], b[row + 8, byte], b[row, byte + 4], b[row + 8, byte + 4])
    return sum(int(v) << (8 * i) for i, v in enumerate(parts))


def test_pack_fragments_is_a_bit_permutation_within_each_fragment():
    gen = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (2, 48, 4, 16), generator=gen, dtype=torch.uint8)
    packed = pack_fragments(blocks)
    assert packed.shape == blocks.shape and torch.equal(unpack_fragments(packed), blocks)
    assert not torch.equal(packed, blocks)
    # each fragment's word keeps its bit count (a permutation of its bits) and no other bytes move
    for row in (0, 7, 16 + 3):
        for byte in (0, 3, 8 + 1, 56 + 2):
            assert bin(_fragment_word(packed[1], row, byte)).count("1") == bin(_fragment_word(blocks[1], row, byte)).count("1")
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_fragments(blocks[:, :24])


def test_packed_decode_gives_the_row_paired_decodes_values():
    """The sm_90 decode of a fragment-packed word (its PTX, run here instruction by instruction up to the
    scale multiplies) gives the same four bf16 pairs, bit for bit, as the row-paired decode of the
    row-paired word: on random codes, and on each of the 16 codes in all nibbles at once."""
    from plait.runtime.kernels.fused_moe_triton import _fp4_bf16_asm, _fp4_bf16_packed_asm

    gen = torch.Generator().manual_seed(6)
    cases = [torch.randint(0, 256, (1, 32, 2, 16), generator=gen, dtype=torch.uint8)]
    cases += [torch.full((1, 16, 1, 16), code | code << 4, dtype=torch.uint8) for code in range(16)]
    for fold in (True, False):
        rowpaired_ptx, packed_ptx = _fp4_bf16_asm(fold), _fp4_bf16_packed_asm(fold)
        for paired in cases:
            packed = pack_fragments(paired)
            for row in [r for r in range(paired.shape[1]) if r % 16 < 8]:
                for byte in [c for c in range(paired.shape[2] * 16) if c % 8 < 4]:
                    want = _run_ptx_integer_part(rowpaired_ptx, _fragment_word(paired[0], row, byte))
                    got = _run_ptx_integer_part(packed_ptx, _fragment_word(packed[0], row, byte))
                    assert got == want, (fold, row, byte)


def test_swizzled_weights_can_be_fragment_packed():
    w = random_mxfp4(2, 32, 128, torch.Generator().manual_seed(7))
    sw = w.swizzled(pack=True)
    assert sw.k_swizzled and sw.row_paired and sw.fragment_packed
    assert sw.expert(1).fragment_packed and sw.to("cpu").fragment_packed
    assert torch.equal(sw.natural_blocks(), w.blocks)
    assert torch.equal(sw.dequantize(torch.float32), w.dequantize(torch.float32))
    assert torch.equal(unpack_fragments(unswizzle_k(sw.blocks)), pair_rows(w.blocks))
    assert not random_mxfp4(1, 24, 128).swizzled(pack=True).fragment_packed  # rows not in 16s: not paired
    with pytest.raises(ValueError, match="row_paired"):
        Mxfp4Weight(w.blocks, w.scales, fragment_packed=True)
