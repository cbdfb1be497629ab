"""Tool calling without a server: request checks, the grammar (llguidance on the bundled tokenizer), parsing."""

from __future__ import annotations

import json

import pytest

from plait.runtime.server.protocol import RequestError
from plait.runtime.server.tools import ToolCallParser, parse_chat_tools, tool_grammar

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


@pytest.fixture(scope="module")
def matcher_factory(bundled_model_dir):
    llguidance = pytest.importorskip("llguidance")
    from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend
    from plait.runtime.constrained.vocab import TokenizerInfo
    from plait.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(bundled_model_dir)
    lltok = LLGuidanceBackend().tokenizer_for(TokenizerInfo.from_tokenizer(tokenizer))

    def accepts(grammar: str, text: str) -> bool:
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, lltok)
        assert not is_error, messages
        matcher = llguidance.LLMatcher(lltok, compiled, log_level=0)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    return accepts


def grammar(**body):
    return tool_grammar(parse_chat_tools(body))


def test_required_grammar_accepts_only_valid_calls(matcher_factory):
    g = grammar(tools=[WEATHER, TIME], tool_choice="required")
    assert matcher_factory(g, CALL_PARIS)
    assert matcher_factory(g, CALL_PARIS + "\n" + CALL_TIME)  # parallel by default
    assert not matcher_factory(g, "Hello")
    assert not matcher_factory(g, CALL_PARIS.replace('"city"', '"town"'))
    assert not matcher_factory(g, CALL_TIME.replace("UTC", "PST"))  # enum enforced
    single = grammar(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert matcher_factory(single, CALL_PARIS) and not matcher_factory(single, CALL_PARIS + "\n" + CALL_TIME)


def test_named_and_auto_grammars(matcher_factory):
    named = grammar(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert matcher_factory(named, CALL_TIME) and not matcher_factory(named, CALL_PARIS)
    auto = grammar(tools=[WEATHER, TIME])
    assert matcher_factory(auto, "Just text, no call.")
    assert matcher_factory(auto, "Let me check. " + CALL_PARIS)
    assert not matcher_factory(auto, "text " + CALL_PARIS.replace("Paris", "Paris\"x"))
    assert not matcher_factory(auto, "a <tool_call> that is not a call")  # text cannot contain the tag
    assert grammar(tools=[WEATHER], tool_choice="none") is None


def test_schema_text_with_double_colon_stays_lark():
    tool = {"type": "function", "function": {"name": "f", "description": "a ::= b", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "description": "root ::= x"}}}}}
    assert "::=" not in grammar(tools=[tool], tool_choice="required")


BAD = [
    ({"tools": [{"type": "web_search"}]}, "only function tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "not both"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "letters"),
]


@pytest.mark.parametrize("body, needle", BAD, ids=[n for _, n in BAD])
def test_bad_tool_settings_are_400s(body, needle):
    with pytest.raises(RequestError, match=needle):
        parse_chat_tools(body)


def test_legacy_functions():
    choice = parse_chat_tools({"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}})
    assert choice.legacy and choice.mode == "function" and not choice.parallel


def feed_all(parser, pieces):
    content, calls = "", {}
    for piece in pieces:
        text, got = parser.feed(piece)
        content += text
        for p in got:
            entry = calls.setdefault(p.index, {"id": None, "name": None, "arguments": ""})
            if p.name is not None:
                assert entry["name"] is None and p.arguments == ""  # the header comes alone, first
                entry["id"], entry["name"] = p.id, p.name
            entry["arguments"] += p.arguments
    content += parser.finish()[0]
    return content, [calls[i] for i in sorted(calls)]


OUTPUT = "Checking both. " + CALL_PARIS + "\n" + CALL_TIME.replace('"UTC"', '"U\\"T{C"')


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(OUTPUT)])
def test_parser_streams_content_then_calls(step):
    content, calls = feed_all(ToolCallParser(), [OUTPUT[i:i + step] for i in range(0, len(OUTPUT), step)])
    assert content == "Checking both. "
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"zone": 'U"T{C'}]
    assert all(c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_streamed_and_whole_arguments_are_the_same_text(step):
    """The grammar allows a space before the arguments' value: however the text is cut into deltas (the
    header can be read before the space arrives), the arguments start at the value, as when parsed whole."""
    output = '<tool_call>\n{ "name": "get_weather", "arguments":  { "city": "Paris" } }\n</tool_call>'
    _, calls = feed_all(ToolCallParser(), [output[i:i + step] for i in range(0, len(output), step)])
    assert [c["arguments"] for c in calls] == ['{ "city": "Paris" }']


def test_parser_holds_back_a_tag_prefix_and_releases_it_at_the_end():
    parser = ToolCallParser()
    assert parser.feed("a <tool_ca") == ("a ", [])
    assert parser.finish()[0] == "<tool_ca"


def test_thinking_before_calls(matcher_factory):
    choice = parse_chat_tools({"tools": [WEATHER], "tool_choice": "required"})
    optional = tool_grammar(choice, "optional")
    assert matcher_factory(optional, CALL_PARIS)
    assert matcher_factory(optional, "<think>\nParis, so get_weather.\n</think>\n\n" + CALL_PARIS)
    assert not matcher_factory(optional, "Paris.</think>" + CALL_PARIS)
    opened = tool_grammar(choice, "open")  # the prompt opened <think>: it must be closed first
    assert matcher_factory(opened, "Paris, so get_weather.\n</think>\n\n" + CALL_PARIS)
    assert not matcher_factory(opened, CALL_PARIS)
    auto = tool_grammar(parse_chat_tools({"tools": [WEATHER]}), "open")
    assert matcher_factory(auto, "hm</think>\n\nNo call needed.") and not matcher_factory(auto, "No call.")


def test_call_arguments_are_allowed_token_by_token_by_the_mask(bundled_model_dir):
    """The mask (not only consume) allows a json.dumps call whose tokens span the end of a forced
    stretch: ``": "`` + a pattern's first characters (the arguments use response_format's JSON style)."""
    llguidance = pytest.importorskip("llguidance")
    import torch

    from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend
    from plait.runtime.constrained.vocab import TokenizerInfo
    from plait.runtime.tokenizer import Tokenizer

    info = TokenizerInfo.from_tokenizer(Tokenizer.from_dir(bundled_model_dir))
    tool = {"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"p": {"type": "string", "pattern": "^#!"}}, "required": ["p"]}}}
    g = grammar(tools=[tool], tool_choice="required", parallel_tool_calls=False)
    matcher = llguidance.LLMatcher(LLGuidanceBackend().tokenizer_for(info), llguidance.LLMatcher.grammar_from_lark(g),
                                   log_level=0)
    row = torch.zeros(info.bitmask_words, dtype=torch.int32)
    for token in info.encode('<tool_call>\n{"name": "run", "arguments": {"p": "#!"}}\n</tool_call>'):
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        assert (int(row[token >> 5]) >> (token & 31)) & 1, info.token_bytes[token]
        assert matcher.consume_token(token)
    assert matcher.is_accepting()
