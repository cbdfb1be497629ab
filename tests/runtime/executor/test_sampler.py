"""Sampler: greedy, filters, penalties, min_new_tokens, seeds, distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from plait.runtime.executor.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    log_softmax_logprobs,
    seeded_exponential_noise,
    top_k_logprobs,
)
from plait.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
# chi-square 99.9% quantiles by degrees of freedom; generators are seeded, so this cannot flake
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27}


def make_batch(
    params: list[SamplingParams],
    output_ids: list[list[int]] | None = None,
    prompt_ids: list[list[int]] | None = None,
    eos: int | None = None,
    top_logprobs_num: list[int] | None = None,
    allowed_mask: torch.Tensor | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=params,
        output_ids=output_ids if output_ids is not None else [[] for _ in range(n)],
        prompt_ids=prompt_ids if prompt_ids is not None else [[] for _ in range(n)],
        eos_token_ids=[frozenset() if eos is None else frozenset({eos}) for _ in range(n)],
        top_logprobs_num=top_logprobs_num if top_logprobs_num is not None else [0] * n,
        allowed_mask=allowed_mask,
    )


def counts_of(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "sampled a token with zero probability"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_greedy_equals_argmax_any_dtype() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50).to(torch.bfloat16)
    out = Sampler(seed=0).sample(logits, make_batch([GREEDY] * 5))
    assert out.next_token_ids.dtype == torch.int64
    assert torch.equal(out.next_token_ids, logits.float().argmax(-1))
    assert out.logprobs.dtype == torch.float32
    assert out.top_logprobs == [None] * 5


def test_mixed_greedy_and_sampled_rows() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 30)
    params = [GREEDY, SamplingParams(temperature=1.0)] * 3
    sampler = Sampler(seed=0)
    seen_sampled: set[int] = set()
    for _ in range(20):
        ids = sampler.sample(logits, make_batch(params)).next_token_ids
        assert torch.equal(ids[0::2], logits[0::2].argmax(-1))
        seen_sampled.update(ids[1::2].tolist())
    assert len(seen_sampled) > 3  # the sampled rows really vary


def test_top_k_one_is_greedy() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 40)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 4
    assert all(p.is_greedy for p in params)
    out = Sampler(seed=0).sample(logits, make_batch(params))
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_top_k_restricts_support() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 2.5]]).repeat(2000, 1)
    out = Sampler(seed=0).sample(logits, make_batch([SamplingParams(top_k=2)] * 2000))
    assert set(out.next_token_ids.tolist()) == {3, 4}


def test_top_p_tiny_keeps_only_max() -> None:
    torch.manual_seed(3)
    logits = torch.randn(200, 20)
    out = Sampler(seed=0).sample(logits, make_batch([SamplingParams(top_p=1e-6)] * 200))
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_top_p_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().repeat(n, 1)
    out = Sampler(seed=1).sample(logits, make_batch([SamplingParams(top_p=0.7)] * n))
    kept = torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8  # smallest prefix with mass >= 0.7
    assert chi_square(counts_of(out.next_token_ids, 4), kept) < CHI2_999[1]


def test_min_p_filters() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().repeat(n, 1)
    out = Sampler(seed=2).sample(logits, make_batch([SamplingParams(min_p=0.25)] * n))
    kept = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95  # 0.05 < 0.25 * 0.5
    assert chi_square(counts_of(out.next_token_ids, 4), kept) < CHI2_999[2]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_frequency_matches_distribution(temperature: float) -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    logits = probs.log().repeat(n, 1)
    out = Sampler(seed=3).sample(logits, make_batch([SamplingParams(temperature=temperature)] * n))
    target = probs ** (1.0 / temperature)
    assert chi_square(counts_of(out.next_token_ids, 4), target / target.sum()) < CHI2_999[3]


def test_seeded_rows_follow_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 5000
    logits = probs.log().repeat(n, 1)
    params = [SamplingParams(seed=s) for s in range(n)]
    out = Sampler(seed=0).sample(logits, make_batch(params))
    assert chi_square(counts_of(out.next_token_ids, 4), probs) < CHI2_999[3]


def test_min_new_tokens_masks_eos_and_stop_ids_then_lifts() -> None:
    eos, stop_id = 4, 2
    logits = torch.tensor([[0.0, 1.0, 9.0, 3.0, 10.0]])
    params = [SamplingParams(temperature=0.0, min_new_tokens=2, stop_token_ids=(stop_id,))]
    sampler = Sampler(seed=0)
    for produced in ([], [1]):
        out = sampler.sample(logits, make_batch(params, output_ids=[produced], eos=eos))
        assert out.next_token_ids.item() == 3
        # logprob is still under the raw distribution
        assert out.logprobs.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 3].item(), abs=1e-6)
    out = sampler.sample(logits, make_batch(params, output_ids=[[1, 3]], eos=eos))
    assert out.next_token_ids.item() == eos


def test_min_new_tokens_mask_applies_to_sampled_rows() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0]]).repeat(3000, 1)
    params = [SamplingParams(min_new_tokens=1, stop_token_ids=(1,))] * 3000
    out = Sampler(seed=0).sample(logits, make_batch(params, eos=0))
    assert set(out.next_token_ids.tolist()) == {2}


def test_penalties_match_reference() -> None:
    torch.manual_seed(4)
    vocab = 8
    logits = torch.randn(3, vocab)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.0),
    ]
    prompts = [[0, 1], [0, 1], [5]]
    outputs = [[2, 2, 3], [2, 2, 3, 7], [5, 6, 6, 6]]
    got = apply_penalties(logits, make_batch(params, output_ids=outputs, prompt_ids=prompts))

    expected = logits.clone()
    for row, p in enumerate(params):
        for tok in set(prompts[row]) | set(outputs[row]):
            x = expected[row, tok]
            expected[row, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for tok in set(outputs[row]):
            count = outputs[row].count(tok)
            expected[row, tok] -= p.frequency_penalty * count + p.presence_penalty
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert torch.equal(logits, logits.clone())  # input untouched
    # the prompt does not count for frequency/presence: row 1 token 0 unchanged
    assert got[1, 0] == logits[1, 0]


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0)]
    out = Sampler().sample(logits, make_batch(params, output_ids=[[0]]))
    assert out.next_token_ids.item() == 1


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    torch.manual_seed(5)
    row_logits = torch.randn(1, 1000)
    target = SamplingParams(seed=1234, top_p=0.95, top_k=500)
    alone = [
        Sampler(seed=0).sample(row_logits, make_batch([target], output_ids=[[0] * step])).next_token_ids.item()
        for step in range(15)
    ]
    assert len(set(alone)) > 1  # a different token stream per step
    for bsz, position in [(3, 0), (5, 2), (8, 7)]:
        others = torch.randn(bsz, 1000)
        logits = others.clone()
        logits[position] = row_logits[0]
        params = [SamplingParams(temperature=0.7)] * bsz
        params[position] = target
        sampler = Sampler(seed=bsz)
        for step in range(15):
            outputs = [[1] * (step + i) for i in range(bsz)]
            outputs[position] = [0] * step
            ids = sampler.sample(logits, make_batch(params, output_ids=outputs)).next_token_ids
            assert ids[position].item() == alone[step]


def _splitmix_noise_reference(key: int, token: int) -> float:
    mask = (1 << 64) - 1
    x = (key + (token + 1) * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return -math.log(((x >> 40) + 0.5) / 2**24)


def test_seeded_noise_matches_python_reference_and_is_exponential() -> None:
    keys = [0, 12345, (1 << 64) - 5]
    noise = seeded_exponential_noise(keys, 40, torch.device("cpu"))
    reference = torch.tensor([[_splitmix_noise_reference(k, t) for t in range(40)] for k in keys])
    assert torch.allclose(noise, reference, rtol=1e-6, atol=1e-6)
    big = seeded_exponential_noise(list(range(50)), 4000, torch.device("cpu"))
    assert big.min() > 0
    assert abs(big.mean().item() - 1.0) < 0.02 and abs(big.var().item() - 1.0) < 0.05


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: two seeds agreeing 20 times by chance is ~1e-60
    streams = []
    for seed in (1, 2):
        params = [SamplingParams(seed=seed)]
        streams.append([
            Sampler().sample(logits, make_batch(params, output_ids=[[0] * s])).next_token_ids.item()
            for s in range(20)
        ])
    assert streams[0] != streams[1]


def test_unseeded_sampler_seed_reproducible() -> None:
    logits = torch.zeros(16, 100)
    params = [SamplingParams()] * 16
    a = Sampler(seed=7).sample(logits, make_batch(params)).next_token_ids
    b = Sampler(seed=7).sample(logits, make_batch(params)).next_token_ids
    assert torch.equal(a, b)


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(6)
    logits = torch.randn(4, 25) * 3
    params = [
        SamplingParams(temperature=0.3, top_k=5),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(top_p=0.5, frequency_penalty=1.0),
        SamplingParams(min_p=0.1, seed=3),
    ]
    out = Sampler(seed=0).sample(logits, make_batch(params, output_ids=[[1], [2], [3], [4]]))
    reference = torch.log_softmax(logits, -1).gather(1, out.next_token_ids.view(-1, 1)).squeeze(1)
    assert torch.allclose(out.logprobs, reference, atol=1e-5)


def test_top_logprobs_sorted_and_optional() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, 30)
    out = Sampler(seed=0).sample(logits, make_batch([GREEDY] * 3, top_logprobs_num=[5, 0, 2]))
    assert out.top_logprobs[1] is None
    first, third = out.top_logprobs[0], out.top_logprobs[2]
    assert first is not None and third is not None and len(first) == 5 and len(third) == 2
    values = [v for _, v in first]
    assert values == sorted(values, reverse=True)
    reference = torch.log_softmax(logits, -1)
    for tok, lp in first:
        assert lp == pytest.approx(reference[0, tok].item(), abs=1e-5)
    assert first[0][0] == out.next_token_ids[0].item()


def test_helpers() -> None:
    torch.manual_seed(8)
    logits = torch.randn(4, 12)
    ids = torch.tensor([0, 3, 11, 5])
    reference = torch.log_softmax(logits, -1)[torch.arange(4), ids]
    assert torch.allclose(log_softmax_logprobs(logits.half(), ids), reference, atol=2e-2)
    assert torch.allclose(log_softmax_logprobs(logits, ids), reference, atol=1e-6)
    top = top_k_logprobs(logits, 3)
    assert [len(r) for r in top] == [3, 3, 3, 3]
    assert all(r[0][0] == int(logits[i].argmax()) for i, r in enumerate(top))
    assert [len(r) for r in top_k_logprobs(logits, [0, 1, 2, 100])] == [0, 1, 2, 12]
    with pytest.raises(ValueError):
        top_k_logprobs(logits, [1, 2])


def test_allowed_mask() -> None:
    logits = torch.tensor([[9.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, False, True]])
    out = Sampler(seed=0).sample(logits, make_batch([GREEDY, SamplingParams()], allowed_mask=mask))
    assert out.next_token_ids.tolist() == [2, 2]
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[2].item(), abs=1e-6)


def test_empty_batch_and_shape_errors() -> None:
    out = Sampler().sample(torch.empty(0, 10), make_batch([]))
    assert out.next_token_ids.shape == (0,) and out.top_logprobs == []
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(2, 10), make_batch([GREEDY]))
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(10), make_batch([GREEDY]))


def test_neg_inf_logits_never_sampled() -> None:
    logits = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]]).repeat(2000, 1)
    out = Sampler(seed=0).sample(logits, make_batch([SamplingParams(min_p=0.5, top_p=0.9)] * 2000))
    assert set(out.next_token_ids.tolist()) <= {0, 2}


@pytest.mark.gpu
def test_cuda_seeded_rows_independent_of_batch_and_greedy_exact() -> None:
    device = torch.device("cuda")
    vocab = 128256  # Llama-3 vocabulary: real shape for sort/softmax kernels
    gen = torch.Generator(device=device).manual_seed(0)
    row = torch.randn(1, vocab, device=device, generator=gen) * 4
    target = SamplingParams(seed=99, top_p=0.9, top_k=1000, min_p=0.01, temperature=0.8)
    alone = [
        Sampler(seed=0).sample(row, make_batch([target], output_ids=[[0] * s])).next_token_ids.item()
        for s in range(8)
    ]
    keys = [3, 99, (1 << 64) - 1]
    on_gpu = seeded_exponential_noise(keys, vocab, device).cpu()
    on_cpu = seeded_exponential_noise(keys, vocab, torch.device("cpu"))
    assert torch.allclose(on_gpu, on_cpu, rtol=1e-6, atol=0)  # same integer hash; log may differ by an ulp
    for bsz, position in [(4, 1), (64, 63)]:
        logits = torch.randn(bsz, vocab, device=device, generator=gen).to(torch.bfloat16).float()
        logits[position] = row[0]
        params: list[SamplingParams] = [GREEDY, SamplingParams(temperature=0.7, top_k=50)] * (bsz // 2)
        params[position] = target
        sampler = Sampler(seed=1)
        for step in range(8):
            outputs = [[1] * (step + i) for i in range(bsz)]
            outputs[position] = [0] * step
            out = sampler.sample(logits, make_batch(params, output_ids=outputs, top_logprobs_num=[2] * bsz))
            ids = out.next_token_ids
            assert ids.device.type == "cuda"
            assert ids[position].item() == alone[step]
            greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
            assert torch.equal(ids[greedy_rows], logits[greedy_rows].argmax(-1))
            reference = torch.log_softmax(logits, -1).gather(1, ids.view(-1, 1)).squeeze(1)
            assert torch.allclose(out.logprobs, reference, atol=1e-4)


@pytest.mark.parametrize("vocab", [49152, 128256, 1000])  # 1000: no divisor in range -> plain argmax
def test_two_pass_greedy_argmax_equals_argmax_including_ties(vocab):
    from plait.runtime.executor.sampler import greedy_argmax

    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=gen)
    logits[1, 7] = logits[1, vocab - 3] = 50.0  # a tie across chunks: the lower index wins
    logits[2, 100] = logits[2, 101] = 50.0  # a tie inside one chunk
    expected = logits.argmax(dim=-1)
    assert expected[1] == 7 and expected[2] == 100
    assert torch.equal(greedy_argmax(logits, two_pass=True), expected)


def test_logprobs_skipped_when_no_row_needs_them():
    logits = torch.randn(2, 50)
    batch = SamplingBatch(
        params=[SamplingParams(temperature=0)] * 2, output_ids=[[], []], prompt_ids=[[1], [2]],
        eos_token_ids=[frozenset()] * 2, top_logprobs_num=[0, 0], need_logprobs=False,
    )
    out = Sampler(seed=0).sample(logits, batch)
    assert out.logprobs is None
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_logit_bias_changes_greedy_and_sampled_rows_per_row() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0]] * 3)
    params = [SamplingParams(temperature=0.0, logit_bias={2: 10.0}), GREEDY,
              SamplingParams(temperature=1.0, logit_bias={0: -100, 1: -100, 3: -100})]
    out = Sampler(seed=0).sample(logits, make_batch(params))
    assert out.next_token_ids.tolist() == [2, 0, 2]
    # reported logprobs stay those of the raw distribution
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())


def test_logit_bias_matches_adding_the_bias_to_the_logits() -> None:
    from plait.runtime.executor.sampler import apply_logit_bias

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(logit_bias={"7": 1.5, "49": -2}), SamplingParams(), SamplingParams(logit_bias={0: 3})]
    work = logits.clone()
    apply_logit_bias(work, params)
    expected = logits.clone()
    expected[0, 7] += 1.5
    expected[0, 49] -= 2
    expected[2, 0] += 3
    assert torch.equal(work, expected)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_tiny_temperature_picks_the_argmax(temperature: float) -> None:
    # logits / 1e-40 overflow float32: softmax gave NaN everywhere and the race picked token 0
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(3)) * 5
    params = [SamplingParams(temperature=temperature)] * 3 + [SamplingParams(temperature=temperature, seed=7)]
    out = Sampler(seed=0).sample(logits, make_batch(params))
    assert out.next_token_ids.tolist() == logits.argmax(-1).tolist()
    mask = torch.ones(4, 500, dtype=torch.bool)
    mask[:, :250] = False
    out = Sampler(seed=0).sample(logits, make_batch(params, allowed_mask=mask))
    assert out.next_token_ids.tolist() == (logits[:, 250:].argmax(-1) + 250).tolist()


def test_huge_temperature_never_samples_a_masked_token() -> None:
    # 1e39 is inf in float32, and a masked logit (-inf) / inf is NaN, which won the race (token 0)
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(8, 300, dtype=torch.bool)
    mask[:, 200:210] = True
    params = [SamplingParams(temperature=1e39)] * 4 + [SamplingParams(temperature=1e300, seed=s) for s in range(4)]
    for step in range(5):
        out = Sampler(seed=step).sample(logits, make_batch(params, allowed_mask=mask))
        assert all(200 <= t < 210 for t in out.next_token_ids.tolist())
