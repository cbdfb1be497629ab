"""Reasoning parsers (``plait/runtime/server/reasoning.py``) without a model: whole text and every split."""

from __future__ import annotations

import pytest

from plait.runtime.server.reasoning import ReasoningSplit, make_reasoning_parser

CASES = [
    # (parser, prompt, output, reasoning, content)
    ("qwen3", "", "<think>\nadd 2 and 2\n</think>\n\nIt is 4.", "\nadd 2 and 2\n", "It is 4."),
    ("qwen3", "", "It is 4.", "", "It is 4."),
    ("qwen3", "", "  <think>x</think>y", "x", "y"),
    ("qwen3", "", "a <think> is text here", "", "a <think> is text here"),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "hmm</think>\n\nok", "hmm", "ok"),
    ("qwen3", "", "<think>cut off by length", "cut off by length", ""),
    ("qwen3", "", "<thinking about it", "", "<thinking about it"),
    ("deepseek-r1", "", "plan</think>answer", "plan", "answer"),
    ("deepseek-r1", "", "<think>plan</think>answer", "plan", "answer"),
    ("deepseek-r1", "", "only reasoning", "only reasoning", ""),
    ("gpt-oss", "", "<|channel|>analysis<|message|>think hard<|end|><|start|>assistant<|channel|>final<|message|>"
                    "The answer<|return|>", "think hard", "The answer"),
    ("gpt-oss", "", "plain text a<|b", "", "plain text a<|b"),
    ("gpt-oss", "", "<|channel|>analysis<|message|>r1<|end|><|start|>assistant<|channel|>commentary to=functions.f "
                    "<|constrain|>json<|message|>{}<|call|>", "r1", "{}"),
]


def run(name: str, prompt: str, pieces: list[str]) -> ReasoningSplit:
    parser = make_reasoning_parser(name, prompt)
    total = ReasoningSplit()
    for piece in pieces:
        total.add(parser.feed(piece))
    total.add(parser.finish())
    return total


@pytest.mark.parametrize("name, prompt, output, reasoning, content", CASES)
def test_whole_and_every_two_way_split(name, prompt, output, reasoning, content):
    whole = run(name, prompt, [output])
    assert (whole.reasoning, whole.content) == (reasoning, content)
    for cut in range(1, len(output)):
        split = run(name, prompt, [output[:cut], output[cut:]])
        assert (split.reasoning, split.content) == (reasoning, content), cut


@pytest.mark.parametrize("name, prompt, output, reasoning, content", CASES)
def test_character_by_character(name, prompt, output, reasoning, content):
    split = run(name, prompt, list(output))
    assert (split.reasoning, split.content) == (reasoning, content)


def test_markers_are_never_shown_as_text_while_streaming():
    parser = make_reasoning_parser("qwen3")
    shown = [parser.feed(c) for c in "<think>ab</think>cd"]
    assert all("<" not in s.reasoning + s.content for s in shown)
    assert "".join(s.reasoning for s in shown) == "ab"


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="qwen3"):
        make_reasoning_parser("nope")
