"""Batched next-token sampling on logits.

Per step the engine builds one ``SamplingBatch`` from the requests being sampled and calls
``Sampler.sample(logits, batch)``. Everything is vectorized over the batch; the only per-row Python
work is gathering parameters into tensors and drawing noise for rows that carry their own ``seed``.

Order of operations (matching SGLang / HF semantics):
penalties (repetition over prompt+output, frequency/presence over output) -> logit_bias -> min_new_tokens masking
(EOS and stop_token_ids banned) -> optional allowed-token mask (grammar) -> greedy rows take argmax (temperature
below ``GREEDY_TEMPERATURE_EPS`` = 1e-5, or top_k 1: ``SamplingParams.is_greedy``) ->
temperature -> top_k -> top_p -> min_p -> sample by the exponential race ``argmax(p / q)``, q ~ Exp(1).

Reported logprobs are always under the RAW model distribution (log_softmax of unmodified logits).

Seeded rows draw their noise from a counter-based hash of (seed, len(output_ids), token id) only, so
the same seed gives the same tokens for the same logits whatever the batch composition or timing, on
any device. Filtering never reorders the vocabulary, so noise is always indexed by token id. Rows
without a seed draw from the sampler's own ``torch.Generator`` (``Sampler(seed=...)``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from plait.runtime.constrained.bitmask import apply_batch_bitmask
from plait.runtime.executor.forward_batch import values_to_device
from plait.sampling import SamplingParams

__all__ = [
    "SampleOutput",
    "Sampler",
    "SamplingBatch",
    "apply_logit_bias",
    "apply_penalties",
    "log_softmax_logprobs",
    "top_k_logprobs",
]

_MASK64 = (1 << 64) - 1
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class SamplingBatch:
    """Per-row sampling state for one step; row i corresponds to logits[i].

    ``allowed_mask`` (optional, bool [B, V], True = allowed) is applied after penalties, e.g. a
    grammar mask; it does not affect the reported (raw) logprobs. ``token_bitmask`` (int32 [B, ceil(V / 32)],
    bit set = allowed; constrained decoding) applies to ``bitmask_rows`` only; other rows cost nothing.
    """

    params: list[SamplingParams]
    output_ids: list[list[int]]
    prompt_ids: list[list[int]]
    eos_token_ids: list[frozenset[int]]
    top_logprobs_num: list[int]
    allowed_mask: torch.Tensor | None = field(default=None)
    token_bitmask: torch.Tensor | None = field(default=None)
    bitmask_rows: list[int] = field(default_factory=list)
    need_logprobs: bool = True  # False: skip the chosen tokens' logprobs (no row returns them)

    def __len__(self) -> int:
        return len(self.params)


@dataclass
class SampleOutput:
    """Result of one sampling step: chosen tokens [B] int64, their raw logprobs [B] float32 (None when
    the batch did not need them), and per-row top logprobs (sorted descending) or None where not requested."""

    next_token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: list[list[tuple[int, float]] | None]


@functools.cache  # one vocabulary size per engine: the search runs once, not every step
def _argmax_chunk(vocab: int) -> int:
    """The largest divisor of ``vocab`` in [256, 2048] (0 if none): the row length of a two-pass argmax."""
    for size in range(2048, 255, -1):
        if vocab % size == 0:
            return size
    return 0


def greedy_argmax(logits: torch.Tensor, two_pass: bool | None = None) -> torch.Tensor:
    """``logits.argmax(-1)`` [B] int64, in two passes for a few long rows on a GPU.

    One CUDA block reduces each row in ``argmax``, so a 128k-token row takes ~28 us on an H100; split
    into chunks, the first pass spreads over the chip. Ties resolve to the lowest index as in argmax
    (the first maximal chunk, then its first maximal element). ``two_pass`` forces the choice (tests).
    """
    bsz, vocab = logits.shape
    if two_pass is None:
        two_pass = logits.is_cuda and bsz <= 8
    chunk = _argmax_chunk(vocab) if two_pass else 0
    if not chunk:
        return logits.argmax(dim=-1)
    values, local = logits.view(bsz, vocab // chunk, chunk).max(dim=-1)  # [B, C] each
    best_chunk = values.argmax(dim=-1, keepdim=True)  # [B, 1]
    return (best_chunk * chunk + local.gather(1, best_chunk)).squeeze(1)


def log_softmax_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Logprob of ``token_ids`` [N] under the raw distribution of ``logits`` [N, V]; float32 [N]."""
    raw = logits.float()
    chosen = raw.gather(1, token_ids.long().view(-1, 1)).squeeze(1)  # [N]
    return chosen - torch.logsumexp(raw, dim=-1)


def top_k_logprobs(logits: torch.Tensor, k: int | Sequence[int]) -> list[list[tuple[int, float]]]:
    """Top-k (token id, logprob) pairs per row of ``logits`` [N, V], sorted by logprob descending.

    ``k`` is one int for every row or one int per row (0 gives an empty list).
    """
    n, vocab = logits.shape
    ks = [k] * n if isinstance(k, int) else list(k)
    if len(ks) != n:
        raise ValueError(f"top_k_logprobs: got {len(ks)} k values for {n} rows")
    k_max = min(max(ks, default=0), vocab)
    if k_max <= 0:
        return [[] for _ in range(n)]
    raw = logits.float()
    values, indices = raw.topk(k_max, dim=-1)  # [N, k_max], sorted descending
    values = values - torch.logsumexp(raw, dim=-1, keepdim=True)
    ids_rows, val_rows = indices.tolist(), values.tolist()
    return [list(zip(ids_rows[i][: ks[i]], val_rows[i][: ks[i]])) for i in range(n)]


def _flat_index(
    rows_ids: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    rows: Sequence[int],
    vocab: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten token lists of ``rows`` into (row index, token id) tensors; ids outside [0, vocab)
    are dropped. Goes through numpy: converting Python ints is the cost here, not the GPU."""
    lengths = np.fromiter((len(rows_ids[r]) for r in rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(rows_ids[r] for r in rows), dtype=np.int64, count=total)
    row_idx = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    keep = (flat >= 0) & (flat < vocab)
    return (
        torch.from_numpy(row_idx[keep]).to(device, non_blocking=True),
        torch.from_numpy(flat[keep]).to(device, non_blocking=True),
    )


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Penalized float32 copy of ``logits`` [B, V].

    Repetition penalty (HF): for tokens seen in prompt+output, positive logits are divided by the
    penalty and negative ones multiplied. Then frequency and presence penalties (OpenAI/SGLang) over
    the output only: ``logit -= frequency * count + presence * (count > 0)``.
    """
    work = logits.float().clone()
    bsz, vocab = work.shape
    device = work.device
    params = batch.params

    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        seen_ids = {i: list(batch.prompt_ids[i]) + list(batch.output_ids[i]) for i in rep_rows}
        rows, toks = _flat_index(seen_ids, rep_rows, vocab, device)
        seen = torch.zeros(bsz, vocab, dtype=torch.bool, device=device)
        seen[rows, toks] = True
        penalty = values_to_device([p.repetition_penalty for p in params], torch.float32, device)
        penalty = penalty.view(-1, 1)  # [B, 1]
        penalized = torch.where(work > 0, work / penalty, work * penalty)
        work = torch.where(seen, penalized, work)

    fp_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if fp_rows:
        rows, toks = _flat_index(batch.output_ids, fp_rows, vocab, device)
        counts = torch.zeros(bsz, vocab, dtype=torch.float32, device=device)
        counts.index_put_((rows, toks), torch.ones_like(toks, dtype=torch.float32), accumulate=True)
        freq = values_to_device([p.frequency_penalty for p in params], torch.float32, device)
        pres = values_to_device([p.presence_penalty for p in params], torch.float32, device)
        work -= freq.view(-1, 1) * counts + pres.view(-1, 1) * (counts > 0).float()
    return work


def apply_logit_bias(work: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's ``logit_bias`` to ``work`` [B, V] in place, in one scatter for the whole batch.

    Token ids outside [0, V) are dropped (the engine refuses them before a request is queued).
    """
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return
    _, vocab = work.shape
    lengths = np.fromiter((len(params[r].logit_bias) for r in rows), dtype=np.int64, count=len(rows))
    pairs = np.array([pair for r in rows for pair in params[r].logit_bias], dtype=np.float64).reshape(-1, 2)  # [N, 2]
    row_idx = np.repeat(np.asarray(rows, dtype=np.int64), lengths)  # [N]
    tokens = pairs[:, 0].astype(np.int64)  # [N]
    keep = (tokens >= 0) & (tokens < vocab)
    device = work.device
    index = (torch.from_numpy(row_idx[keep]).to(device), torch.from_numpy(tokens[keep]).to(device))
    work.index_put_(index, torch.from_numpy(pairs[keep, 1].astype(np.float32)).to(device), accumulate=True)


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _splitmix(x: int) -> int:
    """SplitMix64 step on a Python int (64-bit wrapping)."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _mix_seed(seed: int, step: int) -> int:
    """A 64-bit stream key derived only from (seed, step)."""
    return _splitmix(_splitmix(seed & _MASK64) ^ (step & _MASK64))


def _as_int64(x: int) -> int:
    """Reinterpret an unsigned 64-bit value as a signed int64 (for torch constants)."""
    return x - (1 << 64) if x >= (1 << 63) else x


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def seeded_exponential_noise(keys: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [len(keys), vocab], float32, a pure function of (key, token id).

    Counter-based: element (r, t) is the SplitMix64 output number t+1 of the stream ``keys[r]``,
    computed with wrapping int64 arithmetic, so it is vectorized over rows and the same on every
    device and in every batch. 24 random bits per element give u in (0, 1); noise = -log(u) > 0.
    """
    key = values_to_device([_as_int64(k & _MASK64) for k in keys], torch.int64, device)
    counter = torch.arange(1, vocab + 1, dtype=torch.int64, device=device)
    x = key.view(-1, 1) + counter.view(1, -1) * _as_int64(_GOLDEN)  # [R, V], wraps mod 2^64
    x = (x ^ _srl(x, 30)) * _as_int64(_MIX1)
    x = (x ^ _srl(x, 27)) * _as_int64(_MIX2)
    x = x ^ _srl(x, 31)
    uniform = (_srl(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)


class Sampler:
    """Samples next tokens for a batch. ``seed`` seeds the generator used by rows without a seed
    (``None`` = nondeterministic)."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------ generators
    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    # ------------------------------------------------------------------ main entry
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
        """Choose one token per row of ``logits`` [B, V] according to ``batch``."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        bsz, vocab = logits.shape
        fields = (batch.params, batch.output_ids, batch.prompt_ids, batch.eos_token_ids, batch.top_logprobs_num)
        if any(len(f) != bsz for f in fields):
            raise ValueError(f"SamplingBatch fields must all have {bsz} rows (one per logits row)")
        device = logits.device
        raw = logits.float()
        if bsz == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return SampleOutput(empty, torch.empty(0, dtype=torch.float32, device=device), [])

        params = batch.params
        greedy = [p.is_greedy for p in params]
        banned = [(r, t) for r, t in self._min_new_tokens_bans(batch) if 0 <= t < vocab]
        needs_penalty = any(
            p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params
        )
        needs_bias = any(p.logit_bias for p in params)

        if (all(greedy) and not needs_penalty and not needs_bias and not banned and batch.allowed_mask is None
                and batch.token_bitmask is None):
            next_ids = greedy_argmax(raw)
        else:
            work = apply_penalties(raw, batch) if needs_penalty else raw.clone()
            if needs_bias:
                apply_logit_bias(work, params)
            if banned:
                rows = values_to_device([r for r, _ in banned], torch.int64, device)
                cols = values_to_device([c for _, c in banned], torch.int64, device)
                work[rows, cols] = float("-inf")
            if batch.allowed_mask is not None:
                work.masked_fill_(~batch.allowed_mask.to(device=device, dtype=torch.bool), float("-inf"))
            if batch.token_bitmask is not None:
                apply_batch_bitmask(work, batch.token_bitmask, batch.bitmask_rows)
            next_ids = self._choose(work, batch, greedy)

        logprobs = log_softmax_logprobs(raw, next_ids) if batch.need_logprobs else None
        top = self._top_logprobs(raw, batch.top_logprobs_num)
        return SampleOutput(next_token_ids=next_ids, logprobs=logprobs, top_logprobs=top)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _min_new_tokens_bans(batch: SamplingBatch) -> list[tuple[int, int]]:
        """(row, token) pairs to mask: EOS and stop_token_ids of rows still below min_new_tokens."""
        bans: list[tuple[int, int]] = []
        for row, p in enumerate(batch.params):
            if p.min_new_tokens > 0 and len(batch.output_ids[row]) < p.min_new_tokens:
                tokens = set(batch.eos_token_ids[row]) | set(p.stop_token_ids)
                bans.extend((row, t) for t in sorted(tokens))
        return bans

    def _choose(self, work: torch.Tensor, batch: SamplingBatch, greedy: list[bool]) -> torch.Tensor:
        """Greedy rows: argmax of ``work``; other rows: filtered random sample. Returns [B] int64."""
        next_ids = work.argmax(dim=-1)
        sampled_rows = [i for i, g in enumerate(greedy) if not g]
        if not sampled_rows:
            return next_ids
        device = work.device
        # the sampled rows' index, copied once (None: every row samples)
        index = None if len(sampled_rows) == len(greedy) else values_to_device(sampled_rows, torch.int64, device)
        sub = work if index is None else work.index_select(0, index)
        sub_params = [batch.params[i] for i in sampled_rows]
        probs = self._filtered_probs(sub, sub_params)
        noise = self._noise(probs.shape, device, sampled_rows, batch)
        chosen = (probs / noise).argmax(dim=-1)  # exponential race: P(argmax = i) = p_i
        if index is None:
            return chosen
        return next_ids.index_copy(0, index, chosen)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """temperature -> top_k -> top_p -> min_p on ``logits`` [b, V]; unnormalized probs [b, V]
        in vocabulary order (never reordered, so noise stays indexed by token id)."""
        device = logits.device
        _, vocab = logits.shape
        # A temperature beyond float32's range would become inf, and a masked logit (-inf) / inf is NaN.
        temps = values_to_device([min(p.temperature, _FLOAT32_MAX) for p in params], torch.float32, device)
        logits = logits / temps.view(-1, 1)

        need_k = any(p.top_k != -1 for p in params)
        need_p = any(p.top_p < 1.0 for p in params)
        if need_k or need_p:
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)  # [b, V]
            if need_k:
                k = values_to_device(
                    [min(p.top_k, vocab) if p.top_k != -1 else vocab for p in params], torch.int64, device)
                kth = sorted_logits.gather(1, (k - 1).view(-1, 1))  # [b, 1]
                # threshold (not rank) cut: tokens tied with the k-th logit are all kept
                sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            if need_p:
                top_p = values_to_device([p.top_p for p in params], torch.float32, device).view(-1, 1)
                sorted_probs = sorted_logits.softmax(dim=-1)
                mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
                drop = (mass_before > top_p) & (top_p < 1.0)
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)

        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = values_to_device([p.min_p for p in params], torch.float32, device).view(-1, 1)
            threshold = min_p * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _noise(
        self, shape: torch.Size, device: torch.device, rows: list[int], batch: SamplingBatch
    ) -> torch.Tensor:
        """Exp(1) noise [b, V] for the sampled ``rows``; seeded rows get noise from (seed, step) only."""
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        seeded = [j for j, r in enumerate(rows) if batch.params[r].seed is not None]
        if len(seeded) < len(rows):
            noise.exponential_(generator=self._generator(device))
            noise.clamp_min_(torch.finfo(torch.float32).tiny)  # never divide by 0
        if seeded:
            keys = []
            for j in seeded:
                seed = batch.params[rows[j]].seed
                assert seed is not None  # selected above
                keys.append(_mix_seed(seed, len(batch.output_ids[rows[j]])))
            seeded_noise = seeded_exponential_noise(keys, shape[-1], device)
            # u rounds to 1.0 in float32 for the top 2^-25 of draws: noise -0.0, and a filtered-out
            # token (p = 0) would win the race with 0 / -0 = NaN. Never divide by (minus) zero.
            seeded_noise.clamp_min_(torch.finfo(torch.float32).tiny)
            if len(seeded) == len(rows):
                return seeded_noise
            noise.index_copy_(0, values_to_device(seeded, torch.int64, device), seeded_noise)
        return noise

    @staticmethod
    def _top_logprobs(raw: torch.Tensor, nums: list[int]) -> list[list[tuple[int, float]] | None]:
        """Per row: top-k raw logprobs where ``nums[row] > 0``, else None."""
        rows = [i for i, k in enumerate(nums) if k > 0]
        out: list[list[tuple[int, float]] | None] = [None] * len(nums)
        if not rows:
            return out
        sub = raw if len(rows) == len(nums) else raw[values_to_device(rows, torch.int64, raw.device)]
        for row, pairs in zip(rows, top_k_logprobs(sub, [nums[i] for i in rows])):
            out[row] = pairs
        return out
