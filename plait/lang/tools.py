"""Tools a program lets the model call: declared as Python functions, run by the program.

``@pl.tool`` turns a function with type hints and a docstring into a ``Tool``: a name, a description
and the JSON schema of its arguments (``tool_schema``), plus the function that runs a call. A plain
function passed where tools are expected is converted the same way. ``Tool(name, description,
parameters)`` declares a tool by its schema alone (its calls are returned to the program, not run).

Running calls (``run_tool_calls``): the arguments are converted to the annotated types (``Enum``
members, pydantic models), the function is called (several calls of one turn on threads), and its
return value becomes the result text (a str as is; anything else as JSON). A tool that raises, an
unknown tool, or arguments that do not bind give an ``"Error: <Type>: <message>"`` result that is fed
back to the model, never raised into the program.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from plait.lang.errors import ToolDeclarationError
from plait.tool_text import function_tool_dict

__all__ = [
    "MAX_SCHEMA_BYTES",
    "MAX_TOOLS",
    "Tool",
    "ToolCall",
    "ToolResult",
    "as_tools",
    "run_tool_calls",
    "tool",
    "tool_schema",
]

#: Tools one declaration / call_tools may name (the server's limit too).
MAX_TOOLS = 128
#: UTF-8 bytes of one tool's argument schema (it becomes part of a grammar and of the prompt).
MAX_SCHEMA_BYTES = 16 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``name``, ``arguments`` (the decoded JSON object) and an ``id``
    (the API's id on the OpenAI backend, else generated)."""

    id: str
    name: str
    arguments: Any

    def openai_dict(self) -> dict[str, Any]:
        """The call as an OpenAI chat message's ``tool_calls`` entry."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}


@dataclass(frozen=True)
class ToolResult:
    """What running a ``call`` gave: ``content`` (the text the model sees), ``value`` (the function's
    return value; None on error) and ``error`` (``"<Type>: <message>"`` when it failed, else None)."""

    call: ToolCall
    content: str
    value: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Tool:
    """A function the model may call.

    ``parameters`` is the JSON schema of the arguments object. ``func`` runs a call (None: the tool
    is only declared, and its calls are returned to the program). A ``Tool`` made from a function is
    still callable as that function.
    """

    name: str
    description: str | None
    parameters: dict[str, Any]
    func: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ToolDeclarationError(
                f"a tool name must be 1-64 letters, digits, '_', '-', '.' or ':', got {self.name!r}")
        if self.description is not None and not isinstance(self.description, str):
            raise ToolDeclarationError(f"tool {self.name!r}: description must be a str or None")
        if not isinstance(self.parameters, dict) or self.parameters.get("type", "object") != "object":
            raise ToolDeclarationError(
                f"tool {self.name!r}: parameters must be a JSON schema of an object, got {self.parameters!r}")
        size = len(json.dumps(self.parameters).encode())
        if size > MAX_SCHEMA_BYTES:
            raise ToolDeclarationError(
                f"tool {self.name!r}: its parameter schema has {size} bytes; the limit is {MAX_SCHEMA_BYTES}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.func is None:
            raise TypeError(f"tool {self.name!r} was declared without a function; its calls are the program's to run")
        return self.func(*args, **kwargs)

    def chat_dict(self) -> dict[str, Any]:
        """The tool as OpenAI's chat API and chat templates take it (``{"type": "function", ...}``)."""
        return function_tool_dict(self.name, self.description, self.parameters)

    @classmethod
    def from_function(cls, func: Callable[..., Any], name: str | None = None,
                      description: str | None = None) -> Tool:
        """A tool from ``func``'s name, docstring and type hints (see ``tool_schema``)."""
        if not callable(func):
            raise ToolDeclarationError(f"a tool is made from a function, got {type(func).__name__}")
        summary, arg_docs = _parse_docstring(inspect.getdoc(func) or "")
        return cls(name or func.__name__, description if description is not None else summary,
                   tool_schema(func, arg_docs), func)

    @classmethod
    def from_openai(cls, spec: Mapping[str, Any]) -> Tool:
        """A declared-only tool from ``{"type": "function", "function": {"name", "description", "parameters"}}``."""
        inner = spec.get("function", spec) if spec.get("type", "function") == "function" else None
        if not isinstance(inner, Mapping) or "name" not in inner:
            raise ToolDeclarationError(f"expected {{'type': 'function', 'function': {{'name', ...}}}}, got {spec!r}")
        return cls(inner["name"], inner.get("description"),
                   dict(inner.get("parameters") or {"type": "object", "properties": {}}))


def tool(func: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Declare a tool: ``@pl.tool`` or ``@pl.tool(name=..., description=...)`` over a function.

    The name defaults to the function's, the description to its docstring's first paragraph; the
    argument schema comes from the type hints and the docstring's ``Args:`` section.
    """
    if func is None:
        return lambda f: Tool.from_function(f, name, description)
    return Tool.from_function(func, name, description)


def as_tools(tools: Sequence[Any], where: str = "tools") -> tuple[Tool, ...]:
    """``Tool`` objects from tools, plain functions and OpenAI tool dicts; names must be unique."""
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ToolDeclarationError(f"{where} must be a list of tools (functions, @pl.tool or Tool), got {tools!r}")
    out: list[Tool] = []
    for item in tools:
        if isinstance(item, Tool):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(Tool.from_openai(item))
        elif callable(item):
            out.append(Tool.from_function(item))
        else:
            raise ToolDeclarationError(f"{where}: {item!r} is not a function, a Tool or an OpenAI tool dict")
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ToolDeclarationError(f"{where}: tool names must be unique, {dupes} appear more than once")
    if len(out) > MAX_TOOLS:
        raise ToolDeclarationError(f"{where}: at most {MAX_TOOLS} tools, got {len(out)}")
    return tuple(out)


# ------------------------------------------------------------------------------------------ schema
def tool_schema(func: Callable[..., Any], arg_docs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON schema of ``func``'s keyword arguments, from its type hints.

    Supported hints: str, int, float, bool, None, ``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``,
    ``T | None`` / ``Optional``, ``Union``, ``Literal[...]``, ``Enum`` subclasses, pydantic models and
    ``Annotated[T, "description"]``. Parameters without a default are required; no other properties
    are allowed. Raises ``ToolDeclarationError`` for a parameter without a hint, ``*args``/``**kwargs``,
    or a hint outside that list.
    """
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:  # noqa: BLE001 - an unresolvable forward reference, named in the message
        raise ToolDeclarationError(f"cannot read the type hints of {_name(func)}: {exc}") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    defs: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDeclarationError(f"{_name(func)}: a tool takes named parameters only, not *{param.name}")
        if param.name not in hints:
            raise ToolDeclarationError(
                f"{_name(func)}: parameter {param.name!r} has no type hint; annotate it (e.g. {param.name}: str)")
        where = f"{_name(func)}, parameter {param.name!r}"
        prop = _schema_of(hints[param.name], defs, where)
        if arg_docs and param.name in arg_docs and "description" not in prop:
            prop = {**prop, "description": arg_docs[param.name]}
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
        elif (default := _json_value(param.default)) is not _NOT_JSON:
            prop = {**prop, "default": default}
        properties[param.name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required,
                              "additionalProperties": False}
    if defs:
        schema["$defs"] = defs
    return schema


_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"}, bool: {"type": "boolean"},
    type(None): {"type": "null"}, None: {"type": "null"},
}


def _schema_of(hint: Any, defs: dict[str, Any], where: str) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    if origin is typing.Annotated:
        inner = _schema_of(args[0], defs, where)
        notes = [a for a in args[1:] if isinstance(a, str)]
        return {**inner, "description": " ".join(notes)} if notes else inner
    if origin is typing.Literal:
        if not all(isinstance(a, (str, int, float, bool)) or a is None for a in args):
            raise ToolDeclarationError(f"{where}: Literal values must be str, int, float, bool or None")
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a, defs, where) for a in args]}
    if origin in (list, Sequence, set, frozenset) or hint in (list, set):
        items = _schema_of(args[0], defs, where) if args else {}
        return {"type": "array", "items": items}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema_of(args[0], defs, where)}
        parts = [_schema_of(a, defs, where) for a in args]
        return {"type": "array", "prefixItems": parts, "minItems": len(parts), "maxItems": len(parts)}
    if origin in (dict, Mapping) or hint is dict:
        if args and args[0] is not str:
            raise ToolDeclarationError(f"{where}: JSON object keys are strings; use dict[str, ...]")
        return {"type": "object", "additionalProperties": _schema_of(args[1], defs, where) if args else {}}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        if not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise ToolDeclarationError(f"{where}: the values of enum {hint.__name__} must be str, int, float or bool")
        return {"enum": values}
    if isinstance(hint, type) and hasattr(hint, "model_json_schema"):  # a pydantic model
        model = hint.model_json_schema()
        defs.update(model.pop("$defs", {}))
        return model
    raise ToolDeclarationError(
        f"{where}: the type hint {hint!r} has no JSON schema here; use str, int, float, bool, list, dict, "
        "Literal, an Enum, a pydantic model, or declare the tool with Tool(name, description, parameters)")


_NOT_JSON = object()


def _json_value(value: Any) -> Any:
    """``value`` as the JSON value it would be (a tuple becomes a list), or ``_NOT_JSON``."""
    try:
        return json.loads(json.dumps(_plain(value)))
    except (TypeError, ValueError):
        return _NOT_JSON


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _name(func: Callable[..., Any]) -> str:
    return f"tool function {getattr(func, '__qualname__', repr(func))}"


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params)\s*:\s*$", re.IGNORECASE)
_OTHER_SECTION = re.compile(r"^(Returns?|Raises|Yields|Examples?|Notes?|See Also)\s*:?\s*$", re.IGNORECASE)
_GOOGLE_ARG = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_ARG = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str | None, dict[str, str]]:
    """The summary (first paragraph) and per-argument descriptions (Google ``Args:`` or ``:param x:``)."""
    lines = doc.strip().splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()) or line.strip().startswith(":"):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    current: str | None = None
    in_args, args_indent = False, 0
    for line in lines:
        stripped = line.strip()
        sphinx = _SPHINX_ARG.match(stripped)
        if sphinx:
            current, args[sphinx.group(1)] = sphinx.group(1), sphinx.group(2).strip()
            continue
        if _SECTION.match(stripped):
            in_args, current = True, None
            continue
        if _OTHER_SECTION.match(stripped) or (stripped.startswith(":") and not sphinx):
            in_args, current = False, None
            continue
        if in_args and stripped:
            match = _GOOGLE_ARG.match(stripped)
            indent = len(line) - len(line.lstrip())
            if match and (current is None or indent <= args_indent):
                current, args_indent = match.group(1).lstrip("*"), indent
                args[current] = match.group(3).strip()
            elif current is not None:
                args[current] = (args[current] + " " + stripped).strip()
        elif current is not None and stripped and not in_args:
            args[current] = (args[current] + " " + stripped).strip()  # a :param continued
    return (" ".join(summary) or None), {k: v for k, v in args.items() if v}


# ------------------------------------------------------------------------------------------ running
def _convert(hint: Any, value: Any) -> Any:
    """``value`` (decoded JSON) as the annotated type where JSON differs: Enum members, pydantic models."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _convert(args[0], value)
    if value is None:
        return None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if isinstance(hint, type) and hasattr(hint, "model_validate"):
        return hint.model_validate(value)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except (TypeError, ValueError):
                continue
        return value
    if origin in (list, Sequence) and args and isinstance(value, list):
        return [_convert(args[0], v) for v in value]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _result_text(value: Any) -> str:
    """The text a tool's return value shows the model: a str as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError):  # e.g. a circular structure
        return str(value)


def _json_default(value: Any) -> Any:
    """What ``json.dumps`` writes for values JSON lacks: enum values, pydantic models and dataclasses as
    objects, sets as lists, anything else as its ``str``."""
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _invoke(func: Callable[..., Any], arguments: Any) -> Any:
    if not isinstance(arguments, dict):
        raise TypeError(f"the arguments must be a JSON object, got {json.dumps(arguments)}")
    signature = inspect.signature(func)
    bound = signature.bind(**arguments)  # TypeError: a missing or unexpected argument
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # noqa: BLE001 - a declared schema without usable hints: pass the JSON values
        hints = {}
    for key, value in list(bound.arguments.items()):
        if key in hints:
            bound.arguments[key] = _convert(hints[key], value)
    out = func(*bound.args, **bound.kwargs)
    if inspect.isawaitable(out):  # an async tool: run it to completion on this (worker) thread
        async def wait() -> Any:
            return await out

        out = asyncio.run(wait())
    return out


def run_tool_call(call: ToolCall, tools: Mapping[str, Tool]) -> ToolResult:
    """Run one call; any failure becomes an error result (``"Error: <Type>: <message>"``)."""
    found = tools.get(call.name)
    try:
        if found is None:
            raise LookupError(f"there is no tool named {call.name!r}; the tools are {sorted(tools)}")
        if found.func is None:
            raise TypeError(f"tool {call.name!r} has no function to run")
        value = _invoke(found.func, call.arguments)
    except Exception as exc:  # noqa: BLE001 - a failing tool is reported to the model, not raised
        error = f"{type(exc).__name__}: {exc}"
        return ToolResult(call, f"Error: {error}", None, error)
    return ToolResult(call, _result_text(value), value, None)


def run_tool_calls(calls: Sequence[ToolCall], tools: Mapping[str, Tool], parallel: bool = True,
                   max_workers: int = 8) -> list[ToolResult]:
    """Run ``calls`` (concurrently on threads with ``parallel``); the results in call order."""
    if not parallel or len(calls) <= 1:
        return [run_tool_call(c, tools) for c in calls]
    with ThreadPoolExecutor(min(len(calls), max_workers), thread_name_prefix="plait-tool") as pool:
        return list(pool.map(lambda c: run_tool_call(c, tools), calls))
