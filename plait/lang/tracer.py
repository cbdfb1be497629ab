"""Tracing: run a program symbolically and return its IR graph.

Arguments that are not given become ``SymbolicValue`` placeholders and ``gen``/``select`` return
placeholders, so the program runs without a backend through the same interpreter that ``run`` uses
(same chat template, same role rendering). The result, a ``ProgramTrace``, lists text pieces (constant
or argument-derived), role blocks, calls, forks and joins, and where tracing stopped when control flow
depended on an unknown value. ``constant_prefix`` is the prompt text before the first argument-derived
or generated piece: what every run with other arguments shares, and what ``run_batch`` prefills once.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plait.lang.backends.base import ChatTemplate
from plait.lang.interpreter import Executor
from plait.lang.ir import (
    Gen,
    Media,
    Node,
    RoleBegin,
    RoleEnd,
    Select,
    Text,
    VarScopeBegin,
    VarScopeEnd,
)
from plait.lang.records import RunContext
from plait.lang.state import ProgramState
from plait.lang.symbolic import (
    MARK_BEGIN,
    MARKER_RE,
    SymbolicValue,
    TraceDependency,
    split_markers,
)
from plait.lang.tool_primitives import CallTools, DeclareTools, ToolResults

if TYPE_CHECKING:
    from plait.lang.program import Program

__all__ = ["ArgRef", "ConstText", "ForkNode", "JoinNode", "ProgramTrace", "StopNode", "ValueRef", "trace_program"]


@dataclass(frozen=True)
class ConstText:
    """Text that does not depend on the symbolic arguments."""

    text: str


@dataclass(frozen=True)
class ArgRef:
    """Text that comes from argument ``name`` (differs between runs)."""

    name: str


@dataclass(frozen=True)
class ValueRef:
    """A generated value (``kind`` gen / select / scope) appended again as text."""

    kind: str
    name: str


@dataclass(frozen=True)
class ForkNode:
    """``s.fork(n)``: each branch's nodes."""

    branches: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class JoinNode:
    mode: str


@dataclass(frozen=True)
class StopNode:
    """Where tracing stopped, and why (control flow on a symbolic value, or an exception)."""

    reason: str


@dataclass
class ProgramTrace:
    """The IR graph of one symbolic run. ``print(trace)`` shows it."""

    program: str
    arguments: dict[str, str]
    template: str
    nodes: list[Any]
    text: str
    constant_prefix: str
    stopped: str | None = None
    calls: list[Node] = field(default_factory=list)

    @property
    def constant_nodes(self) -> list[Any]:
        """The leading nodes that are the same for every argument value (before the first ArgRef/call)."""
        out = []
        for node in self.nodes:
            if isinstance(node, (ArgRef, ValueRef, Gen, Select, CallTools, ToolResults, ForkNode, StopNode)):
                break
            out.append(node)
        return out

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.arguments.items())
        lines = [f"trace of {self.program}({args})  [chat template {self.template!r}]"]
        _render(self.nodes, lines, "  ")
        lines.append(f"constant prefix ({len(self.constant_prefix)} chars): {self.constant_prefix!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        status = f", stopped={self.stopped!r}" if self.stopped else ""
        return f"ProgramTrace({self.program}, {len(self.nodes)} nodes, {len(self.calls)} calls{status})"


def _on_model(node: Any) -> str:
    """`` on model 'judge'`` for a call served by a model other than the backend's default."""
    return "" if node.model is None else f"  on model {node.model!r}"


def _describe(node: Any) -> str:
    if isinstance(node, ConstText):
        return f"text {node.text!r}"
    if isinstance(node, ArgRef):
        return f"arg {node.name}   <- differs between runs"
    if isinstance(node, ValueRef):
        return f"value of {node.kind} {node.name!r}"
    if isinstance(node, Gen):
        params = ", ".join(f"{k}={v!r}" for k, v in node.overrides)
        dtype = f", dtype={node.dtype.__name__}" if node.dtype else ""
        reasoning = f", separate_reasoning={node.reasoning!r}" if node.reasoning else ""
        return f"gen {node.name!r}({params}{dtype}{reasoning}){_on_model(node)}"
    if isinstance(node, Media):
        return f"{node.kind} {node.source!r}"
    if isinstance(node, Select):
        return f"select {node.name!r} choices={list(node.choices)} method={node.choices_method.name}{_on_model(node)}"
    if isinstance(node, DeclareTools):
        return f"<system> declaring tools {[t.name for t in node.tools]} </system>"
    if isinstance(node, CallTools):
        tools = "declared tools" if node.tools is None else f"tools={[t.name for t in node.tools]}"
        params = "".join(f", {k}={v!r}" for k, v in node.overrides)
        run = f"max_steps={node.max_steps}" if node.execute else "execute=False"
        return f"call_tools {node.name!r}({tools}, tool_choice={node.choice!r}, {run}{params}){_on_model(node)}"
    if isinstance(node, ToolResults):
        return f"tool results for {[r.call.name for r in node.results]}"
    if isinstance(node, RoleBegin):
        return f"<{node.role}>"
    if isinstance(node, RoleEnd):
        return f"</{node.role}>"
    if isinstance(node, VarScopeBegin):
        return f"var_scope {node.name!r} begin"
    if isinstance(node, VarScopeEnd):
        return f"var_scope {node.name!r} end"
    if isinstance(node, JoinNode):
        return f"join mode={node.mode}"
    if isinstance(node, StopNode):
        return f"STOPPED: {node.reason}"
    return repr(node)


def _render(nodes: Iterable[Any], lines: list[str], indent: str) -> None:
    for node in nodes:
        if isinstance(node, ForkNode):
            lines.append(f"{indent}fork {len(node.branches)}")
            for i, branch in enumerate(node.branches):
                lines.append(f"{indent}  branch {i}:")
                _render(branch, lines, indent + "    ")
        else:
            lines.append(indent + _describe(node))


def _nodes_from_log(log: list[Any]) -> list[Any]:
    """Trace nodes from an executor's log (``("node", node, role)``, ``("fork", logs)``, ``("join", mode)``)."""
    out: list[Any] = []
    for entry in log:
        if entry[0] == "fork":
            out.append(ForkNode(tuple(tuple(_nodes_from_log(child)) for child in entry[1])))
        elif entry[0] == "join":
            out.append(JoinNode(entry[1]))
        elif isinstance(entry[1], Text):
            for kind, a, b in split_markers(entry[1].value):
                if kind == "text":
                    out.append(ConstText(a))
                else:
                    out.append(ArgRef(b) if a == "arg" else ValueRef(a, b))
        else:
            out.append(entry[1])
    return out


def _calls(nodes: Iterable[Any]) -> list[Node]:
    found: list[Node] = []
    for node in nodes:
        if isinstance(node, (Gen, Select, CallTools)):
            found.append(node)
        elif isinstance(node, ForkNode):
            for branch in node.branches:
                found.extend(_calls(branch))
    return found


def trace_program(
    program: Program,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    template: ChatTemplate,
    *,
    symbolic: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> ProgramTrace:
    """Run ``program`` symbolically with ``args``/``kwargs``; every other parameter (and those named in
    ``symbolic``) is a placeholder."""
    try:
        bound = program.signature.bind_partial(None, *args, **kwargs)
    except TypeError as exc:
        from plait.lang.errors import ProgramArgumentError

        raise ProgramArgumentError(f"program {program.name}{program.signature}: {exc}") from None
    symbolic = set(symbolic)
    shown: dict[str, str] = {}
    for name, param in list(program.signature.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in symbolic or (name not in bound.arguments and param.default is inspect.Parameter.empty):
            bound.arguments[name] = SymbolicValue("arg", name)
            shown[name] = "<symbolic>"
        elif name in bound.arguments:
            shown[name] = repr(bound.arguments[name])
        else:
            shown[name] = f"{param.default!r} (default)"
    run = RunContext(None, template, None, dict(defaults or {}), symbolic=True, threaded=False,
                     name_reuse=program.name_reuse)
    root = Executor(run)
    state = ProgramState(root)
    stopped: str | None = None
    try:
        program.func(state, *bound.args[1:], **bound.kwargs)
    except TraceDependency as exc:
        stopped = str(exc)
    except Exception as exc:  # noqa: BLE001 - the trace reports where and why the program stopped
        stopped = f"the program raised {type(exc).__name__}: {exc}"
    assert root.log is not None
    nodes = _nodes_from_log(root.log)
    if stopped is not None:
        nodes.append(StopNode(stopped))
    text = root.text
    cut = text.find(MARK_BEGIN)
    prefix = text if cut < 0 else text[:cut]
    readable = MARKER_RE.sub(lambda m: "{" + m.group(1) + ":" + m.group(2) + "}", text)
    return ProgramTrace(program.name, shown, template.name, nodes, readable, prefix, stopped, _calls(nodes))
