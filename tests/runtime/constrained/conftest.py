"""Fixtures for the constrained-decoding tests: the bundled tokenizer's grammar view and compilers."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.constrained import GrammarCompiler, GrammarState, TokenizerInfo


@pytest.fixture(scope="session")
def tokenizer_info(bundled_model_dir) -> TokenizerInfo:
    from plait.runtime.tokenizer import Tokenizer

    return TokenizerInfo.from_tokenizer(Tokenizer.from_dir(bundled_model_dir))


@pytest.fixture(scope="session")
def compilers(tokenizer_info):
    """One compiler per backend choice: "auto" (the engine's default) and each backend alone."""
    made = {name: GrammarCompiler(tokenizer_info, backend=name) for name in ("auto", "llguidance", "outlines")}
    yield made
    for compiler in made.values():
        compiler.shutdown()


@pytest.fixture
def llguidance_compile_threads(monkeypatch) -> list:
    """The threads llguidance's backend compiles on, in order (``LLGuidanceBackend.compile`` recorded)."""
    import threading

    from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend

    threads = []
    original = LLGuidanceBackend.compile

    def recorded(self, spec, info):
        threads.append(threading.current_thread())
        return original(self, spec, info)

    monkeypatch.setattr(LLGuidanceBackend, "compile", recorded)
    return threads


def walk(state: GrammarState, info: TokenizerInfo, text: str) -> tuple[bool, bool]:
    """Feed ``text``'s canonical tokens through ``state`` the way generation does (mask, then accept).

    Returns (every token was allowed by the mask and accepted, the match is complete at the end)."""
    row = torch.empty(info.bitmask_words, dtype=torch.int32)
    for token in info.encode(text):
        state.fill_bitmask(row)
        if not (int(row[token >> 5]) >> (token & 31)) & 1:
            return False, False
        reason = state.accept_token(token)
        if reason is not None and reason["type"] == "abort":
            return False, False
    return True, state.complete


def stop_allowed(state: GrammarState, info: TokenizerInfo, stop_id: int) -> bool:
    row = torch.empty(info.bitmask_words, dtype=torch.int32)
    state.fill_bitmask(row)
    return bool((int(row[stop_id >> 5]) >> (stop_id & 31)) & 1)
