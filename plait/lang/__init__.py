"""plait.lang: the structured-generation language (SGLang-frontend compatible), without torch.

    import plait as pl

    @pl.function
    def qa(s, question):
        s += pl.user(question)
        s += pl.assistant(pl.gen("answer", max_tokens=64))

    state = qa.run(question="What is 2+2?", backend=pl.Runtime())
    print(state["answer"])

Backends: ``Runtime`` (in-process engine), ``Endpoint`` (HTTP), ``OpenAI`` are imported lazily;
``MockBackend`` is for tests. See docs/language.md.
"""

from typing import Any

from plait.lang.backends.base import (
    Backend,
    ChatTemplate,
    ChoiceScores,
    GenerateCall,
    GenerateResult,
)
from plait.lang.backends.mock import MockBackend
from plait.lang.chat_template import (
    get_chat_template,
    register_chat_template,
    template_from_renderer,
)
from plait.lang.choices import (
    ChoicesMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from plait.lang.errors import (
    BackendCapabilityError,
    ChatTemplateError,
    EmptyChoicesError,
    GenerationError,
    InvalidConstraintError,
    InvalidDtypeError,
    NoBackendError,
    PlaitLangError,
    ProgramAbortedError,
    ProgramArgumentError,
    ProgramBatchError,
    ProgramTimeoutError,
    RoleError,
    StateClosedError,
    ToolCallError,
    ToolDeclarationError,
    UnknownVariableError,
    VariableReuseError,
)
from plait.lang.primitives import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    gen_float,
    gen_int,
    gen_string,
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from plait.lang.program import (
    Program,
    function,
    get_default_backend,
    set_default_backend,
)
from plait.lang.reasoning import separate_reasoning
from plait.lang.state import ProgramState, ProgramStateGroup
from plait.lang.tool_primitives import call_tools, tool_result, tool_results
from plait.lang.tools import Tool, ToolCall, ToolResult, tool
from plait.lang.tracer import ProgramTrace

__all__ = [
    "Backend",
    "BackendCapabilityError",
    "ChatTemplate",
    "ChatTemplateError",
    "ChoiceScores",
    "ChoicesMethod",
    "EmptyChoicesError",
    "Endpoint",
    "RuntimeEndpoint",
    "GenerateCall",
    "GenerateResult",
    "GenerationError",
    "InvalidConstraintError",
    "InvalidDtypeError",
    "MockBackend",
    "NoBackendError",
    "OpenAI",
    "PlaitLangError",
    "Program",
    "ProgramAbortedError",
    "ProgramArgumentError",
    "ProgramBatchError",
    "ProgramState",
    "ProgramStateGroup",
    "ProgramTimeoutError",
    "ProgramTrace",
    "RoleError",
    "Runtime",
    "StateClosedError",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolDeclarationError",
    "ToolResult",
    "UnknownVariableError",
    "VariableReuseError",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "call_tools",
    "function",
    "gen",
    "gen_float",
    "gen_int",
    "gen_string",
    "get_chat_template",
    "get_default_backend",
    "greedy_token_selection",
    "image",
    "register_chat_template",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "template_from_renderer",
    "token_length_normalized",
    "tool",
    "tool_result",
    "tool_results",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]

# Backends written against the protocol in their own modules; imported on first use (Runtime needs torch).
_LAZY_BACKENDS = {
    "Runtime": "plait.lang.backends.runtime",
    "Endpoint": "plait.lang.backends.endpoint",
    "OpenAI": "plait.lang.backends.openai",
}


_ALIASES = {"RuntimeEndpoint": "Endpoint"}  # SGLang's name for a served model's backend


def __getattr__(name: str) -> Any:
    name = _ALIASES.get(name, name)
    module = _LAZY_BACKENDS.get(name)
    if module is None:
        raise AttributeError(f"module 'plait.lang' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
