"""The program IR: frozen nodes that ``s += ...`` appends and the interpreter executes.

A program builds its prompt by appending nodes to a state: ``Text`` (constant text), ``Gen`` (a
continuation), ``Select`` (one of several choices), role markers, variable scopes. Nodes combine with
``+`` into a ``Seq``; plain strings become ``Text``. The interpreter (``plait.lang.interpreter``) is the
one place that walks them. Users build nodes with ``plait.lang.primitives`` (``pl.gen``, ``pl.select``,
``pl.user``...), not directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.lang.choices import ChoicesMethod

__all__ = [
    "ROLES",
    "Gen",
    "Media",
    "Node",
    "RoleBegin",
    "RoleEnd",
    "Select",
    "Seq",
    "Text",
    "VarScopeBegin",
    "VarScopeEnd",
    "flatten",
    "to_node",
]

#: The roles a chat template renders.
ROLES = ("system", "user", "assistant")


class Node:
    """Base of every IR node; ``a + b`` concatenates nodes (and strings) into a ``Seq``."""

    def __add__(self, other: Any) -> Seq:
        return Seq((self, to_node(other)))

    def __radd__(self, other: Any) -> Seq:
        return Seq((to_node(other), self))


@dataclass(frozen=True)
class Text(Node):
    """Constant text appended to the prompt as is."""

    value: str


@dataclass(frozen=True)
class Gen(Node):
    """A continuation stored in variable ``name`` (None: appended but not stored).

    ``overrides`` are the sampling parameters given to ``gen`` (``SamplingParams`` field names, already
    validated), as sorted ``(name, value)`` pairs; the run's defaults fill the rest. ``dtype`` is the
    Python type the text is converted to (its regex is already in ``overrides``). ``schema_model``:
    the pydantic model class given as ``json_schema`` (the output is validated into an instance).
    ``on_incomplete``: ``"raise"`` or ``"keep"`` (see ``plait.lang.primitives.gen``). ``reasoning``: the
    reasoning parser (``plait.reasoning.PARSERS``) that splits the output into the answer (the variable)
    and the reasoning (variable ``name + "_reasoning_content"``), set by ``pl.separate_reasoning``.
    ``model``: the model (a LoRA adapter's name, or another model of the backend) that serves the call;
    None: the backend's default (base) model. Filled from ``s.using(model=...)`` when the gen names none.
    """

    name: str | None
    overrides: tuple[tuple[str, Any], ...] = ()
    dtype: type | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    schema_model: type | None = None
    on_incomplete: str = "raise"
    reasoning: str | None = None
    model: str | None = None

    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)


@dataclass(frozen=True)
class Select(Node):
    """Pick one of ``choices`` by scoring each continuation; stores the choice in ``name``.

    ``model``: the model that scores the choices (as ``Gen.model``; None: the backend's default)."""

    name: str | None
    choices: tuple[str, ...]
    choices_method: ChoicesMethod
    model: str | None = None


@dataclass(frozen=True)
class Media(Node):
    """An image or video input (``pl.image`` / ``pl.video``), ``kind`` "image" or "video". plait's backends
    serve text-only models: executing it raises ``BackendCapabilityError``."""

    kind: str
    source: str


@dataclass(frozen=True)
class RoleBegin(Node):
    """Open a ``system`` / ``user`` / ``assistant`` block (renders the template's role prefix)."""

    role: str


@dataclass(frozen=True)
class RoleEnd(Node):
    """Close the open role block (renders the role suffix, records the message)."""

    role: str


@dataclass(frozen=True)
class VarScopeBegin(Node):
    """Start capturing the text appended from here into variable ``name``."""

    name: str


@dataclass(frozen=True)
class VarScopeEnd(Node):
    """Stop capturing into ``name``; the variable now holds the text appended inside the scope."""

    name: str


@dataclass(frozen=True)
class Seq(Node):
    """Several nodes appended in order."""

    nodes: tuple[Node, ...]

    def __add__(self, other: Any) -> Seq:
        return Seq((*self.nodes, to_node(other)))

    def __radd__(self, other: Any) -> Seq:
        return Seq((to_node(other), *self.nodes))


def to_node(value: Any) -> Node:
    """Turn what a program appends into a node: a str, a node, or a list/tuple of those."""
    if isinstance(value, Node):
        return value
    if isinstance(value, str):
        return Text(value)
    if isinstance(value, (list, tuple)):
        return Seq(tuple(to_node(v) for v in value))
    if value is None:
        raise TypeError("cannot append None to a program state; append a str or pl.gen(...)/pl.select(...)")
    raise TypeError(
        f"cannot append a {type(value).__name__} ({value!r}) to a program state; append a str (use "
        "str(value) or an f-string), pl.gen(...), pl.select(...) or a role such as pl.user(...)"
    )


def flatten(nodes: Iterable[Node]) -> list[Node]:
    """The nodes with every ``Seq`` expanded in place (depth first)."""
    out: list[Node] = []
    for node in nodes:
        if isinstance(node, Seq):
            out.extend(flatten(node.nodes))
        else:
            out.append(node)
    return out


_SGLANG_REGEX_NAMES = ("REGEX_INT", "REGEX_FLOAT", "REGEX_BOOL", "REGEX_STR")


def __getattr__(name: str) -> Any:
    """SGLang's regex constants (``from sglang.lang.ir import REGEX_INT``), defined in ``primitives``."""
    if name in _SGLANG_REGEX_NAMES:
        from plait.lang import primitives

        return getattr(primitives, name)
    raise AttributeError(f"module 'plait.lang.ir' has no attribute {name!r}")
