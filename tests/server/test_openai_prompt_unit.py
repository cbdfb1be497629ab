"""Chat rendering with tools (``chat_prompt.py``) and the Responses store's bounds, without a server."""

from __future__ import annotations

import pytest

from plait.runtime.server.chat_prompt import normalize_messages, render_chat, render_options
from plait.runtime.server.protocol import RequestError
from plait.runtime.server.responses import ResponseStore, StoredResponse, input_messages
from plait.runtime.server.tools import parse_chat_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
]
# A Qwen2.5-style template (it renders tools and calls itself), cut down to what the test needs.
QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}'
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from plait.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(bundled_model_dir)


def render(tokenizer, template=None, tools=TOOLS, **body):
    if template is not None:
        tokenizer.hf.chat_template = template
    choice = parse_chat_tools({"tools": tools, **body}) if tools else None
    return render_chat(tokenizer, normalize_messages(TURNS), choice, render_options(body))


def test_template_without_tool_support_gets_them_from_plait(tokenizer):
    text = render(tokenizer)  # SmolLM2's ChatML template
    assert "<tools>" in text and '"name": "get_weather"' in text  # in the system message
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nSunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "<tools>" not in render(tokenizer, tool_choice="none")  # none: the tools are not shown


def test_template_with_tool_support_renders_them_itself(tokenizer):
    original = tokenizer.hf.chat_template
    try:
        text = render(tokenizer, QWEN_STYLE)
    finally:
        tokenizer.hf.chat_template = original
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>") and '"name": "get_weather"' in text
    assert '"arguments": {"city": "Paris"}' in text  # arguments handed over as an object, not a JSON string
    assert "You may call one or more functions" not in text  # plait's own tool prompt is not added


def test_template_kwargs_reach_the_template(tokenizer):
    original = tokenizer.hf.chat_template
    try:
        text = render(tokenizer, "{{ greeting }}|{{ reasoning_effort }}|{{ messages | length }}", tools=None,
                      chat_template_kwargs={"greeting": "hi"}, reasoning_effort="high")
    finally:
        tokenizer.hf.chat_template = original
    assert text == "hi|high|3"


def test_render_options():
    assert render_options({"continue_final_message": True}).add_generation_prompt is False
    assert render_options({"reasoning_effort": "low"}).template_kwargs == {"reasoning_effort": "low"}
    with pytest.raises(RequestError, match="reasoning_effort"):
        render_options({"reasoning_effort": "extreme"})


def test_responses_input_items_become_chat_turns():
    messages = input_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
    ])
    normalized = normalize_messages(messages)
    assert [m["role"] for m in normalized] == ["user", "assistant", "tool"]
    assert [c["id"] for c in normalized[1]["tool_calls"]] == ["c1", "c2"] and normalized[0]["content"] == "Weather?"
    with pytest.raises(RequestError, match="item_reference"):
        input_messages([{"type": "item_reference", "id": "x"}])


def test_response_store_is_bounded_in_count_and_bytes():
    store = ResponseStore(max_count=3, max_bytes=10_000)
    for i in range(5):
        store.put(f"r{i}", StoredResponse({"id": f"r{i}"}, []))
    assert [k for k in store.items] == ["r2", "r3", "r4"]
    assert store.get("r2") is not None  # now the most recently used
    store.put("r5", StoredResponse({"id": "r5"}, []))
    assert "r3" not in store.items and "r2" in store.items
    store.put("big", StoredResponse({"text": "x" * 9_000}, []))
    assert store.bytes <= 10_000 and "big" in store.items
    store.put("big2", StoredResponse({"text": "x" * 9_000}, []))
    assert store.bytes <= 10_000 and "big" not in store.items and "big2" in store.items
    store.put("huge", StoredResponse({"text": "x" * 20_000}, []))  # larger than the bound: not kept
    assert store.bytes == 0 and not store.items
