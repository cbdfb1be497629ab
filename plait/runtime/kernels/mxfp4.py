"""MXFP4 expert weights: the OCP microscaling FP4 format GPT-OSS checkpoints store their experts in.

A weight ``W [E, N(out), K(in)]`` is held as

- ``blocks`` uint8 ``[E, N, K/32, 16]``: two FP4 (E2M1) codes per byte, the low nibble the even
  element ``k = 2j`` and the high nibble the odd one ``k = 2j + 1``;
- ``scales`` uint8 ``[E, N, K/32]``: one E8M0 exponent per 32 elements along K, value ``2^(s - 127)``.

The element ``W[e, n, k] = FP4_VALUES[code] * 2^(scales[e, n, k // 32] - 127)``. GPT-OSS names them
``gate_up_proj_blocks`` ``[E, 2I, H/32, 16]`` and ``down_proj_blocks`` ``[E, H, I/32, 16]`` (with
``*_scales`` beside them); that is already the ``[E, N, K]`` orientation plait's MoE kernels take
(transformers transposes to ``[E, K, N]`` after dequantizing, for ``x @ W``).

This module is plain torch: the GPU keeps ``Mxfp4Weight`` (about 0.53 bytes per element) and the
fused MoE kernel decodes tiles in registers; ``dequantize_mxfp4`` is the reference and the CPU path.

On the GPU the codes are kept *K-swizzled* (``swizzle_k``): within every 32 bytes of a row (two scale
groups, 64 elements) the byte at position ``8c + i`` holds the logical byte ``4i + c`` (c < 4, i < 8).
A Hopper MMA taking its first operand from registers gives lane ``c`` of each quad the element pairs
``k = 2c, 2c + 1`` and ``2c + 8, 2c + 9`` of every 16: the logical bytes ``c, c + 4, c + 8, ...``. Stored
so, each lane's bytes of a row are 8 contiguous bytes, read with one vector load, where the natural
order needs a load per byte. Scales keep their layout (one per logical 32 elements).

Where N is a multiple of 16 the GPU codes are also *row-paired* (``pair_rows``): in every 16 rows,
rows ``r`` and ``r + 8`` (r < 8) exchange nibbles so that the byte at row ``r + 8h`` holds element
``2c + h`` of row ``r`` (low nibble) and of row ``r + 8`` (high nibble). The kernel's decode turns a
byte's low nibbles of two rows into one bf16 pair; paired so, that pair is two consecutive k of one
row, which is what the MMA's register operand packs, and no byte permute is needed to join them
(13% fewer instructions a K step at GPT-OSS's decode tiles). A 2 x 2 nibble transpose: its own inverse.

Row-paired codes may also be *fragment-packed* (``pack_fragments``), the form the sm_90 decode reads
with the fewest instructions: the MMA's register operand gives a thread, in every 16 rows and 16 k,
the bytes (row r, logical byte c), (r + 8, c), (r, c + 4), (r + 8, c + 4) (r < 8, c < 4), which the
kernel's decode takes as one 32-bit word (bytes in that order) and turns into four bf16 pairs. Packed,
the word's 32 bits are permuted so that each pair is one or two rotations and masks of the word
(``FRAGMENT_MAGNITUDE_ROTATION``, ``FRAGMENT_SIGN_ROTATION``): 11 integer operations for 8 values
against 18 for the row-paired bytes. The values decoded are the same; only the bits move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 32  # elements sharing one scale
SCALE_BIAS = 127  # E8M0: value 2^(s - 127)

# The 16 E2M1 codes: bit 3 sign, bits 2-1 exponent, bit 0 mantissa (the order transformers uses).
FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)

# random_mxfp4's scale exponents, uniform in [-9, -7]: element values around 2^-8 .. 2^-6 (a code's
# magnitude averages ~2), root mean square ~0.015, largest 6 * 2^-7 = 0.047. A unit-variance input
# through a 2880-wide GEMM then comes out at ~0.8 standard deviation (sqrt(2880) * 0.015), so a deep
# dummy model's expert outputs neither vanish nor blow up (bf16 dummy weights, uniform(-1e-3, 1e-3),
# are ~25x smaller: they keep activations finite by shrinking them; this is closer to trained experts).
RANDOM_SCALE_EXPONENTS = (-9, -7)

SWIZZLE_SPAN = 32  # bytes of a row permuted together by swizzle_k (two scale groups)
ROW_PAIR_SPAN = 16  # rows whose nibbles pair_rows exchanges (r with r + 8)
SMALL_SCALE_MAX = 128  # E8M0 exponents up to this (scales <= 2) keep 2^(s - 1) a normal bf16

# Fragment packing (module docstring). The decode's output j (j < 4) is a bf16 pair: lane l (l < 2) at
# bits 16l..16l+15 holds a code's sign at bit 15 and its magnitude bits (e1 e0 m) at bits 8..6, i.e. the
# code's value * 2^-126 (e = 0 lands on the subnormals). Output j is the packed word rotated right by
# FRAGMENT_MAGNITUDE_ROTATION[j] for the magnitudes and by FRAGMENT_SIGN_ROTATION[j] for the signs (one
# rotation and one mask where the two are equal): four rotations of one word whose masked bits cover the
# 32 bits exactly once (a search over all choices: no single rotation per output covers them, and this is
# the fewest operations). Output j, lane l is, in the row-paired word (bytes b0..b3 as above), nibble
# (j // 2) of byte (l + 2 * (j % 2)): outputs 0, 1 the low nibbles of b0 b1 and b2 b3, 2, 3 the high ones.
FRAGMENT_MAGNITUDE_ROTATION = (10, 13, 0, 3)
FRAGMENT_SIGN_ROTATION = (14, 13, 0, 15)


def _fragment_bit_sources() -> tuple[int, ...]:
    """For each bit of a packed word, the bit of the row-paired word it holds."""
    sources = [-1] * 32
    for j in range(4):
        for lane in range(2):
            nibble_at = 8 * (lane + 2 * (j % 2)) + 4 * (j // 2)
            for b in range(3):
                sources[(6 + b + 16 * lane + FRAGMENT_MAGNITUDE_ROTATION[j]) % 32] = nibble_at + b
            sources[(15 + 16 * lane + FRAGMENT_SIGN_ROTATION[j]) % 32] = nibble_at + 3
    assert sorted(sources) == list(range(32)), "the rotations' masks must cover every bit once"
    return tuple(sources)


FRAGMENT_BIT_SOURCES = _fragment_bit_sources()


def has_small_scales(scales: torch.Tensor) -> bool:
    """Whether every E8M0 exponent is at most ``SMALL_SCALE_MAX`` (one reduction and a host read: call
    when weights are prepared, not per step). Trained and random MXFP4 weights have scales far below 2."""
    return scales.numel() == 0 or int(scales.max()) <= SMALL_SCALE_MAX


@dataclass
class Mxfp4Weight:
    """Expert weights ``[E, N, K]`` in MXFP4: ``blocks`` uint8 ``[E, N, K/32, 16]``, ``scales`` uint8
    ``[E, N, K/32]``. What the experts keep on the GPU; there is no dequantized copy.

    ``k_swizzled``: the bytes of each row are in ``swizzle_k``'s order (the GPU layout); ``blocks``
    keeps its shape, but its ``[K/32, 16]`` split no longer matches the scale groups.
    ``small_scales``: every scale exponent is known to be at most ``SMALL_SCALE_MAX`` (a scale of at most
    2; ``has_small_scales``), which lets the kernel's bit decode fold a constant factor into the scale;
    False when unknown. ``row_paired``: the codes' nibbles are exchanged between rows r and r + 8 of
    every 16 (``pair_rows``; N a multiple of 16); the scales are not. ``fragment_packed``: row-paired
    codes whose bits are also permuted within each MMA fragment (``pack_fragments``), for the sm_90
    decode only."""

    blocks: torch.Tensor
    scales: torch.Tensor
    k_swizzled: bool = False
    small_scales: bool = False
    row_paired: bool = False
    fragment_packed: bool = False

    def __post_init__(self) -> None:
        if self.blocks.dtype != torch.uint8 or self.scales.dtype != torch.uint8:
            raise TypeError(f"MXFP4 blocks and scales are uint8, got {self.blocks.dtype} and {self.scales.dtype}")
        if self.blocks.dim() != 4 or self.blocks.shape[-1] != BLOCK_SIZE // 2:
            raise ValueError(f"MXFP4 blocks are [E, N, K/32, 16], got {tuple(self.blocks.shape)}")
        if tuple(self.blocks.shape[:-1]) != tuple(self.scales.shape):
            raise ValueError(f"MXFP4 scales {tuple(self.scales.shape)} do not match blocks {tuple(self.blocks.shape)}")
        if self.k_swizzled and self.blocks.shape[-2] % 2:
            raise ValueError(f"K-swizzled MXFP4 needs K a multiple of 64, got {self.shape[-1]}")
        if self.row_paired and self.blocks.shape[1] % ROW_PAIR_SPAN:
            raise ValueError(f"row-paired MXFP4 needs N a multiple of {ROW_PAIR_SPAN}, got {self.shape[1]}")
        if self.fragment_packed and not self.row_paired:
            raise ValueError("fragment-packed MXFP4 codes are row-paired ones packed: row_paired must be set")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical weight shape (E, N, K)."""
        E, N, G, _ = self.blocks.shape
        return (E, N, G * BLOCK_SIZE)

    @property
    def nbytes(self) -> int:
        """Bytes held (blocks and scales)."""
        return self.blocks.numel() + self.scales.numel()

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def to(self, device: torch.device | str) -> Mxfp4Weight:
        return Mxfp4Weight(self.blocks.to(device), self.scales.to(device), self.k_swizzled, self.small_scales,
                           self.row_paired, self.fragment_packed)

    def expert(self, e: int) -> Mxfp4Weight:
        """Expert ``e`` alone, as a one-expert weight ``[1, N, K]`` (a view)."""
        return Mxfp4Weight(self.blocks[e:e + 1], self.scales[e:e + 1], self.k_swizzled, self.small_scales,
                           self.row_paired, self.fragment_packed)

    def swizzled(self, pair: bool = True, pack: bool = False) -> Mxfp4Weight:
        """The same weight in the K-swizzled layout and, with ``pair`` where N is a multiple of 16,
        row-paired (and with ``pack`` fragment-packed too), its scales checked (``has_small_scales``):
        the form the kernels read fastest (a copy; ``self`` if it already is swizzled)."""
        if self.k_swizzled:
            return self
        paired = pair and self.blocks.shape[1] % ROW_PAIR_SPAN == 0
        packed = paired and pack
        blocks = pair_rows(self.blocks) if paired else self.blocks
        if packed:  # on the logical order (the fragments' bytes), before the swizzle moves them
            blocks = pack_fragments(blocks)
        return Mxfp4Weight(swizzle_k(blocks), self.scales, True, has_small_scales(self.scales), paired, packed)

    def natural_blocks(self) -> torch.Tensor:
        """The codes in the natural layout (neither swizzled, paired nor packed; a copy where they were)."""
        blocks = unswizzle_k(self.blocks) if self.k_swizzled else self.blocks
        if self.fragment_packed:
            blocks = unpack_fragments(blocks)
        return pair_rows(blocks) if self.row_paired else blocks

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_mxfp4(self.natural_blocks(), self.scales, dtype)


def _swizzle_span_view(blocks: torch.Tensor) -> torch.Tensor:
    """``[..., N, K/32, 16]`` -> ``[..., N, K/64, 32]`` (a view), checking K is a multiple of 64."""
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[-2] % 2:
        raise ValueError(f"K-swizzling needs blocks [..., K/32, 16] with K a multiple of 64, got {tuple(blocks.shape)}")
    return blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] // 2, SWIZZLE_SPAN)


def swizzle_k(blocks: torch.Tensor) -> torch.Tensor:
    """Codes in the natural order -> the K-swizzled order (module docstring), as a new tensor of the
    same shape: within each 32-byte span, logical byte ``4i + c`` moves to position ``8c + i``."""
    spans = _swizzle_span_view(blocks)
    out = spans.unflatten(-1, (8, 4)).transpose(-1, -2).reshape(spans.shape)  # [.., i, c] -> [.., c, i]
    return out.reshape(blocks.shape)


def unswizzle_k(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of ``swizzle_k``."""
    spans = _swizzle_span_view(blocks)
    out = spans.unflatten(-1, (4, 8)).transpose(-1, -2).reshape(spans.shape)  # [.., c, i] -> [.., i, c]
    return out.reshape(blocks.shape)


def pair_rows(blocks: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., N, K/32, 16]`` (N a multiple of 16; any K order) -> row-paired (module docstring), as
    a new tensor: in every 16 rows, the byte of row ``r + 8h`` (r < 8) at each position gets the
    nibble ``h`` of rows ``r`` (low) and ``r + 8`` (high). Its own inverse."""
    if blocks.dim() < 3 or blocks.shape[-3] % ROW_PAIR_SPAN:
        raise ValueError(f"row pairing needs blocks [..., N, K/32, 16] with N a multiple of {ROW_PAIR_SPAN}, "
                         f"got {tuple(blocks.shape)}")
    groups = blocks.unflatten(-3, (blocks.shape[-3] // ROW_PAIR_SPAN, 2, ROW_PAIR_SPAN // 2))
    top, bottom = groups.select(-4, 0), groups.select(-4, 1)  # rows r, r + 8: [..., G, 8, K/32, 16]
    paired = torch.stack(((top & 0x0F) | ((bottom & 0x0F) << 4), (top >> 4) | (bottom & 0xF0)), dim=-4)
    return paired.flatten(-5, -3)


def _fragment_words(blocks: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Logical-order codes ``[..., N, K/32, 16]`` -> the bytes of each fragment's word, int32
    ``[..., N/16, 8, K/16, 4, 4]`` (the last dim the bytes (r, c), (r + 8, c), (r, c + 4), (r + 8, c + 4)),
    and the shape to undo it with."""
    if blocks.dim() < 3 or blocks.shape[-3] % ROW_PAIR_SPAN or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"fragment packing needs blocks [..., N, K/32, 16] with N a multiple of {ROW_PAIR_SPAN}, "
                         f"got {tuple(blocks.shape)}")
    *lead, N, G, _ = blocks.shape
    # rows 16R + 8h + g, logical bytes 8C + 4u + t -> [..., R, g, C, t, u, h]
    x = blocks.reshape(*lead, N // 16, 2, 8, G * 2, 2, 4)
    d = len(lead)
    x = x.permute(*range(d), d, d + 2, d + 3, d + 5, d + 4, d + 1)
    grouped = x.shape
    x = x.reshape(*x.shape[:-2], 4).to(torch.int32)  # byte index h + 2u
    return x, grouped


def _fragment_blocks(words: torch.Tensor, grouped: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_fragment_words``' regrouping: the bytes back to uint8 codes shaped like ``like``."""
    d = like.dim() - 3
    x = words.to(torch.uint8).reshape(grouped)
    inverse = [0] * (d + 6)
    for i, p in enumerate((*range(d), d, d + 2, d + 3, d + 5, d + 4, d + 1)):
        inverse[p] = i
    return x.permute(*inverse).reshape(like.shape).contiguous()


def _permute_word_bits(words: torch.Tensor, pack: bool) -> torch.Tensor:
    """``words [..., 4]`` (bytes of 32-bit words as int32 0..255) with their bits moved by
    ``FRAGMENT_BIT_SOURCES`` (``pack``) or back."""
    word = words[..., 0] | (words[..., 1] << 8) | (words[..., 2] << 16) | (words[..., 3] << 24)
    out = torch.zeros_like(word)
    for dst, src in enumerate(FRAGMENT_BIT_SOURCES):
        if not pack:
            dst, src = src, dst
        out |= ((word >> src) & 1) << dst
    return torch.stack([(out >> (8 * i)) & 0xFF for i in range(4)], dim=-1)


def pack_fragments(blocks: torch.Tensor) -> torch.Tensor:
    """Row-paired codes in logical K order ``[..., N, K/32, 16]`` -> fragment-packed (module docstring),
    as a new tensor."""
    words, grouped = _fragment_words(blocks)
    return _fragment_blocks(_permute_word_bits(words, pack=True), grouped, blocks)


def unpack_fragments(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_fragments``."""
    words, grouped = _fragment_words(blocks)
    return _fragment_blocks(_permute_word_bits(words, pack=False), grouped, blocks)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[..., N, K/32, 16]`` codes and ``[..., N, K/32]`` exponents -> ``[..., N, K]`` in ``dtype``.

    Bit for bit what transformers' ``convert_moe_packed_tensors`` gives (before its transpose): the
    code's value in ``dtype``, then ``torch.ldexp`` by ``s - 127`` (exact in float32 except past its
    range: s = 255 gives inf/nan as there), rounded to ``dtype``.
    """
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    codes = blocks.to(torch.uint8)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    values = values.flatten(-2)  # [..., G, 32]: low nibble at even k, high nibble at odd k
    exponents = scales.to(torch.int32).unsqueeze(-1) - SCALE_BIAS  # [..., G, 1]
    values = torch.ldexp(values, exponents).to(dtype)
    return values.flatten(-2)  # [..., N, K]


def quantize_mxfp4(w: torch.Tensor) -> Mxfp4Weight:
    """``w [E, N, K]`` (K a multiple of 32) -> MXFP4, rounding each element to the nearest code.

    The scale of each 32-block is the smallest power of two that brings the block's largest magnitude
    to at most 6 (the largest E2M1 value), so nothing saturates; ties round to the even code. For
    tests and dummy weights; checkpoints come quantized.
    """
    if w.dim() != 3 or w.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(f"quantize_mxfp4 takes [E, N, K] with K a multiple of 32, got {tuple(w.shape)}")
    E, N, K = w.shape
    g = w.float().reshape(E, N, K // BLOCK_SIZE, BLOCK_SIZE)  # [E, N, G, 32]
    amax = g.abs().amax(dim=-1)  # [E, N, G]
    # smallest exponent x with amax / 2^x <= 6; all-zero blocks get the smallest scale
    exp = torch.ceil(torch.log2(amax.clamp_min(torch.finfo(torch.float32).tiny) / 6.0))
    exp = exp.clamp(-SCALE_BIAS, 127)
    scaled = g / torch.pow(2.0, exp).unsqueeze(-1)  # [E, N, G, 32], |scaled| <= 6
    magnitudes = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)  # 0 .. 6
    # nearest magnitude; ties to the even code (round half to even on the code index)
    dist = (scaled.abs().unsqueeze(-1) - magnitudes).abs()  # [E, N, G, 32, 8]
    best = dist.min(dim=-1, keepdim=True).values
    tie_even = torch.where(dist == best, torch.arange(8, device=w.device) % 2, 2)  # even codes 0, odd 1
    code = (tie_even * 8 + torch.arange(8, device=w.device)).argmin(dim=-1)  # [E, N, G, 32]
    code = code + 8 * (scaled < 0).long()  # sign bit (a negative value rounding to 0 keeps -0)
    code = code.to(torch.uint8).reshape(E, N, K // BLOCK_SIZE, BLOCK_SIZE // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)  # [E, N, G, 16]
    scales = (exp + SCALE_BIAS).to(torch.uint8)  # [E, N, G]
    return Mxfp4Weight(blocks.contiguous(), scales.contiguous())


def random_mxfp4(
    E: int, N: int, K: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Mxfp4Weight:
    """Random MXFP4 weights ``[E, N, K]`` for dummy models and benchmarks: uniform random codes,
    scale exponents uniform in ``RANDOM_SCALE_EXPONENTS`` (see there for why that size).

    The tensors are drawn on ``generator``'s device (``device`` without one), then moved to ``device``.
    """
    if K % BLOCK_SIZE != 0:
        raise ValueError(f"MXFP4 needs K a multiple of {BLOCK_SIZE}, got {K}")
    draw_on = generator.device if generator is not None else torch.device(device)
    blocks = torch.randint(0, 256, (E, N, K // BLOCK_SIZE, BLOCK_SIZE // 2), dtype=torch.uint8,
                           generator=generator, device=draw_on)
    lo, hi = RANDOM_SCALE_EXPONENTS
    scales = torch.randint(lo + SCALE_BIAS, hi + SCALE_BIAS + 1, (E, N, K // BLOCK_SIZE), dtype=torch.uint8,
                           generator=generator, device=draw_on)
    return Mxfp4Weight(blocks.to(device), scales.to(device))
