"""Fixtures for runtime tests on the bundled model: prompts and transformers' greedy reference tokens."""

from __future__ import annotations

import pytest

from tests.runtime.engine_helpers import REFERENCE_NEW_TOKENS

# Varied on purpose: chat-formatted and raw, short and long (~300 tokens), code, numbers, CJK, emoji.
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 100.",
]
RAW_PROMPTS = [
    "def fibonacci(n):\n    ",
    "The quick brown fox",
    "東京は日本の首都です。大阪は",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time, " + " ".join(
        f"in the kingdom number {i} there lived a king who loved {w}." for i, w in
        enumerate(["apples", "rivers", "stars", "books", "horses", "music", "snow", "gold", "rain", "maps",
                   "clocks", "bread", "ships", "wolves", "lamps", "tea", "bells", "glass", "salt", "wind"])
    ),
]


@pytest.fixture(scope="session")
def varied_prompt_ids(bundled_model_dir) -> list[list[int]]:
    from plait.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundled_model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS] + RAW_PROMPTS
    return [tok.encode(p) for p in prompts]


@pytest.fixture(scope="session")
def hf_model(bundled_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_model, varied_prompt_ids) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly REFERENCE_NEW_TOKENS long (EOS suppressed)."""
    import torch

    refs = []
    for ids in varied_prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf_model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=REFERENCE_NEW_TOKENS,
                min_new_tokens=REFERENCE_NEW_TOKENS, pad_token_id=0,
            )
        refs.append(out[0, len(ids):].tolist())
    return refs


@pytest.fixture(scope="module")
def engine(bundled_model_dir):
    """One engine on the bundled model per test module (loading is the slow part)."""
    from plait.runtime.engine import Engine

    eng = Engine(model=str(bundled_model_dir))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def tok(bundled_model_dir):
    from plait.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(bundled_model_dir)


@pytest.fixture(scope="session")
def chat_ids(tok) -> list[int]:
    """Token ids of a short chat prompt (the model answers in a few plain-English tokens, then EOS)."""
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTIONS[0]}]))
