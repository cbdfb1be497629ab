"""Logprobs from the engine against transformers' log_softmax on the same sequence (bundled model, CPU).

Both run float32 on CPU; the two attention implementations differ only in summation order, so logprobs
agree to 1e-4. One module-scoped engine; every scenario ends with the no-leak check.
"""

from __future__ import annotations

import pytest

from tests.runtime.conftest import CHAT_QUESTIONS
from tests.runtime.engine_helpers import assert_no_leak, greedy_params

pytestmark = pytest.mark.model

TOL = 1e-4
TOP = 3


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTIONS[2]}]))


def hf_logprobs(hf_model, ids: list[int]):
    """[len(ids), V] float32: row p is transformers' log-distribution of the token after ``ids[p]``."""
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_entries_match(entries, ids: list[int], ref, first: int, with_text: bool, tok) -> None:
    """``entries[k]`` = (logprob, id, text) of ``ids[first + k]``, scored by ``ref`` row ``first + k - 1``."""
    assert len(entries) == len(ids) - first
    for k, (lp, tid, text) in enumerate(entries):
        pos = first + k
        assert tid == ids[pos]
        assert lp == pytest.approx(ref[pos - 1, tid].item(), abs=TOL), f"logprob of token {pos}"
        assert text == (tok.decode([tid], skip_special_tokens=False) if with_text else None)


def assert_top_match(tops, rows: list[int], ref, tok, with_text: bool) -> None:
    """Each entry of ``tops`` lists the TOP best (logprob, id, text) of ``ref[row]``, best first."""
    assert len(tops) == len(rows)
    for top, row in zip(tops, rows):
        values, indices = ref[row].topk(TOP)
        assert [tid for _, tid, _ in top] == indices.tolist()
        assert [lp for lp, _, _ in top] == pytest.approx(values.tolist(), abs=TOL)
        assert [lp for lp, _, _ in top] == sorted((lp for lp, _, _ in top), reverse=True)
        assert [t for _, _, t in top] == [tok.decode([i], skip_special_tokens=False) if with_text else None
                                          for i in indices.tolist()]


@pytest.mark.parametrize("with_text", [False, True])
def test_output_and_prompt_logprobs_match_transformers(engine, hf_model, tok, prompt_ids, with_text):
    out = engine.generate(input_ids=prompt_ids, sampling_params=greedy_params(8), return_logprob=True,
                          top_logprobs_num=TOP, logprob_start_len=0, return_text_in_logprobs=with_text)
    meta, gen = out["meta_info"], out["output_ids"]
    seq = prompt_ids + gen
    ref = hf_logprobs(hf_model, seq)
    n_prompt = len(prompt_ids)

    assert_entries_match(meta["output_token_logprobs"], seq, ref, n_prompt, with_text, tok)
    assert_top_match(meta["output_top_logprobs"], list(range(n_prompt - 1, len(seq) - 1)), ref, tok, with_text)
    for (lp, tid, _), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert top[0][1] == tid and top[0][0] == pytest.approx(lp, abs=1e-6)  # greedy picks the top-1

    inputs = meta["input_token_logprobs"]
    first_text = tok.decode([prompt_ids[0]], skip_special_tokens=False) if with_text else None
    assert tuple(inputs[0]) == (None, prompt_ids[0], first_text)  # nothing scores the first token
    assert_entries_match(inputs[1:], prompt_ids, ref, 1, with_text, tok)
    assert meta["input_top_logprobs"][0] is None
    assert_top_match(meta["input_top_logprobs"][1:], list(range(n_prompt - 1)), ref, tok, with_text)
    assert_no_leak(engine)


def test_prompt_logprobs_of_a_cached_prompt(engine, hf_model, tok, prompt_ids):
    """A cached prompt is recomputed where logprobs are asked for, however often it is sent."""
    ref = hf_logprobs(hf_model, prompt_ids)
    engine.generate(input_ids=prompt_ids, sampling_params=greedy_params(2))  # now the prompt is cached
    for _ in range(2):
        out = engine.generate(input_ids=prompt_ids, sampling_params=greedy_params(2), return_logprob=True,
                              logprob_start_len=0)
        inputs = out["meta_info"]["input_token_logprobs"]
        assert tuple(inputs[0]) == (None, prompt_ids[0], None)
        assert_entries_match(inputs[1:], prompt_ids, ref, 1, False, tok)
        assert "input_top_logprobs" not in out["meta_info"]  # top_logprobs_num=0
    # from a later start, only the tokens from there on, and the prefix before it may come from the cache
    start = len(prompt_ids) // 2
    out = engine.generate(input_ids=prompt_ids, sampling_params=greedy_params(2), return_logprob=True,
                          logprob_start_len=start)
    assert_entries_match(out["meta_info"]["input_token_logprobs"], prompt_ids, ref, start, False, tok)
    assert 0 < out["meta_info"]["cached_tokens"] < start
    assert_no_leak(engine)


def test_zero_new_tokens_scores_the_prompt_only(engine, hf_model, tok, prompt_ids):
    """How ``select`` scores choices: prompt logprobs, nothing generated, finish_reason length."""
    ref = hf_logprobs(hf_model, prompt_ids)
    choices = [prompt_ids, prompt_ids[:-4] + [28, 29], prompt_ids[:-1]]
    outs = engine.generate(input_ids=choices, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=len(prompt_ids) - 8, top_logprobs_num=2)
    for ids, out in zip(choices, outs):
        meta = out["meta_info"]
        assert out["output_ids"] == [] and out["text"] == ""
        assert meta["finish_reason"] == {"type": "length", "length": 0}
        assert meta["output_token_logprobs"] == [] and meta["output_top_logprobs"] == []
        assert len(meta["input_token_logprobs"]) == len(ids) - (len(prompt_ids) - 8)
        assert all(len(top) == 2 for top in meta["input_top_logprobs"])
    assert_entries_match(outs[0]["meta_info"]["input_token_logprobs"], prompt_ids, ref, len(prompt_ids) - 8,
                         False, tok)
    assert engine.stats()["running"] == 0
    assert_no_leak(engine)


def test_no_logprobs_unless_asked(engine, prompt_ids):
    meta = engine.generate(input_ids=prompt_ids, sampling_params=greedy_params(2), top_logprobs_num=3,
                           logprob_start_len=0)["meta_info"]
    assert not any(key.endswith("logprobs") for key in meta)
    only_output = engine.generate(input_ids=prompt_ids, sampling_params=greedy_params(2),
                                  return_logprob=True)["meta_info"]
    assert only_output["input_token_logprobs"] == []  # logprob_start_len=-1: no prompt logprobs
    assert len(only_output["output_token_logprobs"]) == 2
    assert "output_top_logprobs" not in only_output
    assert_no_leak(engine)


def test_streamed_snapshots_carry_logprobs_with_text(engine, tok, prompt_ids):
    snapshots = list(engine.generate(input_ids=prompt_ids, sampling_params=greedy_params(4), return_logprob=True,
                                     top_logprobs_num=2, return_text_in_logprobs=True, stream=True))
    assert len(snapshots) >= 4
    for snap in snapshots:
        entries = snap["meta_info"]["output_token_logprobs"]
        assert [tid for _, tid, _ in entries] == snap["output_ids"]
        assert [text for _, _, text in entries] == [tok.decode([t], skip_special_tokens=False)
                                                   for t in snap["output_ids"]]
        assert all(text is not None for top in snap["meta_info"]["output_top_logprobs"] for _, _, text in top)
    assert_no_leak(engine)


def test_prompt_logprobs_across_prefill_chunks(bundled_model_dir, hf_model, tok, prompt_ids):
    """A prompt prefilled in 8-token chunks gets the same prompt logprobs as in one piece."""
    from plait.runtime.engine import Engine

    ref = hf_logprobs(hf_model, prompt_ids)
    with Engine(model=str(bundled_model_dir), chunked_prefill_size=8, max_total_tokens=1024) as eng:
        out = eng.generate(input_ids=prompt_ids, sampling_params=greedy_params(2), return_logprob=True,
                           logprob_start_len=3, top_logprobs_num=2)
        assert_entries_match(out["meta_info"]["input_token_logprobs"], prompt_ids, ref, 3, False, tok)
        assert len(out["meta_info"]["input_top_logprobs"]) == len(prompt_ids) - 3
        assert_no_leak(eng)


def test_one_token_prompt_logprobs(engine, prompt_ids):
    out = engine.generate(input_ids=prompt_ids[:1], sampling_params=greedy_params(1), return_logprob=True,
                          logprob_start_len=0)
    assert [tuple(e) for e in out["meta_info"]["input_token_logprobs"]] == [(None, prompt_ids[0], None)]
