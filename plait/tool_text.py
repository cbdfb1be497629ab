"""Tool text shared by the language (``plait.lang.tool_format``) and the server (``plait.runtime.server.tools``),
so that a program and ``plait serve`` show a model the same tools in the same words. Standard library only
(the language must import without torch)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def function_tool_dict(name: str, description: str | None, parameters: dict[str, Any]) -> dict[str, Any]:
    """A tool as OpenAI's chat API and chat templates take it (``{"type": "function", "function": ...}``)."""
    function: dict[str, Any] = {"name": name}
    if description:
        function["description"] = description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def tools_system_prompt(tool_dicts: Iterable[dict[str, Any]]) -> str:
    """How tools (``function_tool_dict``s) are described to a model whose chat template has no tool
    support (Hermes style: a ``<tools>`` listing, calls as ``<tool_call>`` JSON)."""
    listing = "\n".join(json.dumps(t) for t in tool_dicts)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
