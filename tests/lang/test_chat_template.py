"""Named chat templates and templates derived from a model's Jinja template."""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang import ChatTemplateError, MockBackend
from plait.lang.chat_template import (
    get_chat_template,
    list_chat_templates,
    register_chat_template,
    template_from_renderer,
)

jinja2 = pytest.importorskip("jinja2")

CHATML_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA31_JINJA = (  # inserts a dated system block into every conversation
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
NO_SYSTEM_JINJA = (  # Gemma-like: refuses system messages
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _raise(message):
    raise ValueError(message)


def renderer(source: str, bos: str = "", add_generation_prompt: bool = False):
    env = jinja2.Environment()
    env.globals["raise_exception"] = _raise
    template = env.from_string(source)
    return lambda messages: template.render(messages=messages, bos_token=bos, add_generation_prompt=add_generation_prompt)


def test_named_templates():
    assert {"default", "chatml", "smollm2", "llama-3-instruct"} <= set(list_chat_templates())
    chatml = get_chat_template("chatml")
    assert chatml.role_prefix_and_suffix["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert chatml.stop_str == ("<|im_end|>",) and chatml.default_system_prompt is None
    assert get_chat_template("default").role_prefix_and_suffix["assistant"] == ("ASSISTANT: ", "\n")
    assert get_chat_template("llama-3-instruct").stop_str == ("<|eot_id|>",)
    with pytest.raises(ChatTemplateError, match="exists"):
        register_chat_template(chatml)


def test_chatml_derived_with_its_default_system_prompt():
    t = template_from_renderer("chatml-like", renderer(CHATML_JINJA))
    assert t.role_prefix_and_suffix == get_chat_template("chatml").role_prefix_and_suffix
    assert t.default_system_prompt == "You are a helpful assistant."
    assert t.stop_str == ("<|im_end|>",) and t.name == "chatml-like"


def test_llama3_derived_drops_bos():
    t = template_from_renderer("llama3-like", renderer(LLAMA3_JINJA, bos="<|begin_of_text|>"))
    assert t.role_prefix_and_suffix == get_chat_template("llama-3-instruct").role_prefix_and_suffix
    assert t.default_system_prompt is None and t.stop_str == ("<|eot_id|>",)


def test_llama31_derived_with_inserted_system_block():
    t = template_from_renderer("llama31-like", renderer(LLAMA31_JINJA, bos="<|begin_of_text|>"))
    assert t.role_prefix_and_suffix["system"] == (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n",
        "<|eot_id|>",
    )
    assert t.default_system_prompt == ""  # an empty system block is always inserted


@pytest.mark.parametrize(
    ("source", "bos"),
    [(CHATML_JINJA, ""), (LLAMA3_JINJA, "<|begin_of_text|>"), (LLAMA31_JINJA, "<|begin_of_text|>"), (NO_SYSTEM_JINJA, "<bos>")],
)
@pytest.mark.parametrize("with_system", [True, False])
def test_programs_render_exactly_like_the_jinja_template(source, bos, with_system):
    """The derived template, used by a program, gives the model's own rendering (without BOS)."""
    template = template_from_renderer("derived", renderer(source, bos))
    backend = MockBackend({"Hello": "Hi there.", "weather": "Sunny."}, chat_template=template)  # no edge spaces: llama trims

    @pl.function
    def chat(s):
        if with_system and source != NO_SYSTEM_JINJA:
            s += pl.system("Be nice.")
        s += pl.user("Hello")
        s += pl.assistant(pl.gen("a"))
        s += pl.user("And the weather?")
        s += pl.assistant(pl.gen("b"))

    state = chat.run(backend=backend)
    assert state["b"] == "Sunny."
    expected = renderer(source, bos)(state.messages())
    assert bos + state.text() == expected


def test_system_refusing_template_uses_user_blocks_for_system():
    t = template_from_renderer("gemma-like", renderer(NO_SYSTEM_JINJA, "<bos>"))
    assert t.role_prefix_and_suffix["assistant"] == ("<start_of_turn>model\n", "<end_of_turn>\n")
    assert t.role_prefix_and_suffix["system"] == t.role_prefix_and_suffix["user"]
    assert t.stop_str == ("<end_of_turn>",)


def test_generation_prompt_in_renderer_is_refused():
    with pytest.raises(ChatTemplateError, match="add_generation_prompt=False"):
        template_from_renderer("x", renderer(CHATML_JINJA, add_generation_prompt=True))


def test_renderer_must_return_text():
    with pytest.raises(ChatTemplateError, match="must return the prompt text"):
        template_from_renderer("x", lambda messages: [1, 2])


def test_explicit_stop_str():
    assert template_from_renderer("x", renderer(CHATML_JINJA), stop_str=("<|im_end|>", "<|endoftext|>")).stop_str == (
        "<|im_end|>",
        "<|endoftext|>",
    )
