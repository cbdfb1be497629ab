"""How tools appear in prompts: the call syntax (render, parse, grammar on llguidance), the plain
format (the same text plait serve renders), and native rendering derived from Qwen 2.5- and Llama
3.1-style Jinja templates written here (rendered with the bundled tokenizer; no download)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import plait as pl
from plait.lang import MockBackend, template_from_renderer
from plait.lang.backends.base import GenerateCall
from plait.lang.tool_format import (
    HERMES,
    CallSyntax,
    NativeToolRendering,
    PlainToolRendering,
    native_tool_rendering,
    tool_rendering_of,
    tools_system_prompt,
    with_native_tools,
)
from plait.lang.tools import ToolCall

# A Qwen 2.5-style template: tools in the system message, Hermes <tool_call> blocks, results as a user
# turn of <tool_response> blocks (consecutive tool messages merged).
QWEN = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# A Llama 3.1-style template: tools in the system message (tools_in_user_message=False), one JSON call
# per turn with "parameters", results in an ipython turn.
LLAMA31 = r"""{{- bos_token }}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


@pl.tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return f"sunny in {city}"


@pl.tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from plait.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(bundled_model_dir)


def renderers(tokenizer, template: str | None):
    """(render(messages), render(messages, tools)) with ``template`` (None: the bundled model's own)."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, template=template)

    def render_tools(messages, tools):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, template=template, tools=tools,
                                             tools_in_user_message=False)

    return render, render_tools


def chat_template(tokenizer, name: str, template: str | None):
    render, render_tools = renderers(tokenizer, template)
    return with_native_tools(template_from_renderer(name, render), render_tools)


# ------------------------------------------------------------------------------------------ call syntax
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=100, deadline=None)
@given(content=st.text(max_size=20).filter(lambda t: "<tool_call>" not in t),
       calls=st.lists(st.tuples(st.sampled_from(["add", "get_weather", "a.b-c"]),
                                st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)), max_size=3))
def test_render_then_parse_gives_back_the_calls(content, calls):
    for syntax in (HERMES, CallSyntax('{"name": "', '", "parameters": ', "}", content_separator=None, compact=True)):
        text = syntax.render(content, [ToolCall(str(i), n, a) for i, (n, a) in enumerate(calls)])
        parsed_content, parsed = syntax.parse(text)
        assert parsed == calls
        if calls and syntax.content_separator is not None:
            assert parsed_content == content


@pytest.mark.parametrize("text, message", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1', "not complete JSON"),
    ('<tool_call>\n{"name": "add"', "ends before its arguments"),
    ('<tool_call>\n{"name": "add", "arguments": {}}\n</tool', "is not closed"),
    ('<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call> and more', "unexpected text"),
])
def test_parse_refuses_cut_or_malformed_calls(text, message):
    with pytest.raises(ValueError, match=message):
        HERMES.parse(text)


@pytest.fixture(scope="module")
def accepts(tokenizer):
    """Whether the llguidance grammar accepts ``text`` (tokenized by the bundled tokenizer) whole."""
    llguidance = pytest.importorskip("llguidance")
    from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend
    from plait.runtime.constrained.vocab import TokenizerInfo

    lltok = LLGuidanceBackend().tokenizer_for(TokenizerInfo.from_tokenizer(tokenizer))

    def check(grammar: str, text: str) -> bool:
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, lltok)
        assert not is_error, messages
        matcher = llguidance.LLMatcher(lltok, compiled, log_level=0)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    return check


PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def test_grammar_allows_an_answer_or_valid_calls_only(accepts):
    tools = [get_weather, add]
    auto = HERMES.grammar(tools, "auto", True)
    assert accepts(auto, "Just an answer.") and accepts(auto, "Let me check.\n" + PARIS)
    assert accepts(auto, PARIS + "\n" + ADD)
    for bad in [PARIS.replace("city", "town"), ADD.replace("1", '"1"'), ADD.replace("}}", ', "c": 3}}'),
                PARIS.replace("get_weather", "get_time"), 'text <tool_call>\n{"name": "x']:
        assert not accepts(auto, bad), bad
    required = HERMES.grammar(tools, "required", False)
    assert accepts(required, ADD) and not accepts(required, "No.") and not accepts(required, ADD + "\n" + PARIS)
    named = HERMES.grammar(tools, "add", True)
    assert accepts(named, ADD + "\n" + ADD) and not accepts(named, PARIS)
    none = HERMES.grammar(tools, "none", True)
    assert accepts(none, "An answer.") and not accepts(none, PARIS)
    llama = CallSyntax('{"name": "', '", "parameters": ', "}", content_separator=None, parallel=False)
    grammar = llama.grammar(tools, "auto", True)
    assert accepts(grammar, '{"name": "add", "parameters": {"a": 1, "b": 2}}') and accepts(grammar, "Hello.")
    assert not accepts(grammar, 'Hi {"name": "add", "parameters": {"a": 1, "b": 2}}')


def test_schema_text_with_double_colon_stays_lark():
    tool = pl.Tool("f", "a ::= b", {"type": "object", "properties": {"x": {"type": "string", "description": "root ::= x"}}})
    assert "::=" not in HERMES.grammar([tool], "required", True)


# ------------------------------------------------------------------------------------------ plain format
def test_plain_format_is_the_text_plait_serve_renders(tokenizer):
    """The bundled SmolLM2 template has no tool support: the program's prompt equals what the server
    renders for the same conversation (tools in the system message, results as a user turn)."""
    from plait.runtime.server.chat_prompt import ChatRenderOptions, normalize_messages, render_chat
    from plait.runtime.server.tools import parse_chat_tools
    from plait.runtime.server.tools import tools_system_prompt as server_prompt

    assert tools_system_prompt([get_weather, add]) == server_prompt(
        tuple(parse_chat_tools({"tools": [get_weather.chat_dict(), add.chat_dict()]}).tools))
    template = chat_template(tokenizer, "smollm2", None)
    assert isinstance(tool_rendering_of(template), PlainToolRendering)

    @pl.function
    def agent(s):
        s += pl.system("Be brief.", tools=[get_weather, add])
        s += pl.user("Weather in Paris, and 1+2?")
        s += pl.call_tools("answer")

    both = PARIS + "\n" + ADD
    mock = MockBackend(default=lambda call: "Sunny, 3." if "<tool_response>" in call.prompt else both)
    state = agent.run(backend=mock, chat_template=template)
    messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]} if "tool_calls" in m else m for m in state.messages()]
    served = render_chat(tokenizer, normalize_messages(messages),
                         parse_chat_tools({"tools": [get_weather.chat_dict(), add.chat_dict()]}),
                         ChatRenderOptions(add_generation_prompt=False))
    assert state.text() == served


# ------------------------------------------------------------------------------------------ native
def test_derived_native_syntax_of_qwen_and_llama_templates(tokenizer):
    qwen = tool_rendering_of(chat_template(tokenizer, "qwen", QWEN))
    assert isinstance(qwen, NativeToolRendering)
    assert qwen.syntax == CallSyntax(HERMES.open, HERMES.infix, HERMES.close, "\n", "\n", False, True)
    llama = tool_rendering_of(chat_template(tokenizer, "llama", LLAMA31))
    assert isinstance(llama, NativeToolRendering)
    assert llama.syntax == CallSyntax('{"name": "', '", "parameters": ', "}", "\n", None, False, parallel=False)
    render, _ = renderers(tokenizer, QWEN)
    no_tools = lambda messages, tools: render(messages)  # noqa: E731 - a renderer that ignores tools
    assert native_tool_rendering(template_from_renderer("qwen", render), no_tools) is None


def conversation_messages(state) -> list[dict]:
    """The state's messages with call arguments as objects (what HF chat templates take)."""
    out = []
    for m in state.messages():
        if "tool_calls" in m:
            m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


@pytest.mark.parametrize("name, template, parallel", [("qwen", QWEN, True), ("llama", LLAMA31, False)])
def test_a_tool_program_renders_exactly_as_the_model_template_does(tokenizer, name, template, parallel):
    """Declaration, calls and results of a whole agent run equal the model template's own rendering of
    the conversation (with tools=): the model sees the format it was trained on."""
    chat = chat_template(tokenizer, name, template)
    syntax = tool_rendering_of(chat).syntax
    first = syntax.render("", [ToolCall("1", "get_weather", {"city": "Paris"})] +
                          ([ToolCall("2", "add", {"a": 1, "b": 2})] if parallel else []))
    second = syntax.render("", [ToolCall("3", "add", {"a": 20, "b": 22})])

    def output(call: GenerateCall) -> str:
        turn = call.prompt.count(chat.role_prefix_and_suffix["assistant"][0]) - 1
        return [first, second, "Sunny, and 42."][min(turn, 2)]

    @pl.function
    def agent(s):
        s += pl.system("Be brief.", tools=[get_weather, add])
        s += pl.user("Weather in Paris, and 20+22?")
        s += pl.call_tools("answer", parallel=parallel)

    mock = MockBackend(default=output)
    state = agent.run(backend=mock, chat_template=chat)
    assert state["answer"] == "Sunny, and 42."
    assert [r.content for r in state.get_meta_info("answer")["tool_results"]][-1] == "42"
    assert len(mock.calls_of("generate")) == 3 and mock.calls_of("generate")[0].params.ebnf.count("fn_") >= 2
    _, render_tools = renderers(tokenizer, template)
    expected = render_tools(conversation_messages(state), [get_weather.chat_dict(), add.chat_dict()])
    bos = tool_rendering_of(chat).bos
    assert expected.startswith(bos) and state.text() == expected[len(bos):]


def test_grammar_mask_allows_json_dumps_arguments_token_by_token(tokenizer):
    """The mask (not only consume) allows each token of a json.dumps call, also where a token spans the
    end of a forced stretch (``": "`` + a pattern's first characters), in both JSON styles."""
    llguidance = pytest.importorskip("llguidance")
    import torch

    from plait.runtime.constrained.backends.llguidance_backend import LLGuidanceBackend
    from plait.runtime.constrained.vocab import TokenizerInfo

    info = TokenizerInfo.from_tokenizer(tokenizer)
    lltok = LLGuidanceBackend().tokenizer_for(info)

    @pl.tool
    def shebang(line: str) -> str:
        """A script's first line."""
        return line

    shebang.parameters["properties"]["line"]["pattern"] = "^#!"
    for syntax, text in [(HERMES, '<tool_call>\n{"name": "shebang", "arguments": {"line": "#!"}}\n</tool_call>'),
                         (CallSyntax('{"name": "', '", "parameters": ', "}", content_separator=None, compact=True),
                          '{"name": "shebang", "parameters": {"line":"#!"}}')]:
        matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(
            syntax.grammar([shebang], "required", False)), log_level=0)
        row = torch.zeros(info.bitmask_words, dtype=torch.int32)
        for token in info.encode(text):
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
            assert (int(row[token >> 5]) >> (token & 31)) & 1, (text, info.token_bytes[token])
            assert matcher.consume_token(token)
        assert matcher.is_accepting()
