"""plait: a structured-generation language for LLMs and the runtime that serves it.

The runtime (``plait.Engine``) needs torch; it is imported lazily so that ``import plait`` and
``plait.lang`` work without torch installed.
"""

from plait.lang import (
    ProgramState,
    Tool,
    ToolCall,
    ToolResult,
    assistant,
    assistant_begin,
    assistant_end,
    call_tools,
    function,
    gen,
    gen_float,
    gen_int,
    gen_string,
    get_default_backend,
    greedy_token_selection,
    image,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    token_length_normalized,
    tool,
    tool_result,
    tool_results,
    unconditional_likelihood_normalized,
    user,
    user_begin,
    user_end,
    video,
)
from plait.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "Endpoint",
    "RuntimeEndpoint",
    "Engine",
    "OpenAI",
    "ProgramState",
    "Runtime",
    "SamplingParams",
    "Tool",
    "ToolCall",
    "ToolResult",
    "__version__",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "call_tools",
    "function",
    "gen",
    "gen_float",
    "gen_int",
    "gen_string",
    "get_default_backend",
    "greedy_token_selection",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
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


def __getattr__(name: str):
    if name == "Engine":
        from plait.runtime.engine import Engine

        return Engine
    if name in ("Runtime", "Endpoint", "RuntimeEndpoint", "OpenAI"):  # backends in their own modules (torch)
        import plait.lang

        return getattr(plait.lang, name)
    raise AttributeError(f"module 'plait' has no attribute {name!r}")
