"""Symbolic values for tracing: placeholders that stand for arguments and generated text.

A ``SymbolicValue`` is a ``str`` whose characters are an in-band marker (two private-use code points
around ``kind:name``), so string building (``+``, f-strings, ``join``, ``format``) carries it into the
prompt text, where the tracer finds it again. Anything that would need its actual value (comparison,
truth, length, iteration, parsing, ``str`` methods) raises ``TraceDependency``: the program's control
flow depends on a value that tracing does not know, and the tracer stops there and says so.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MARKER_RE", "SymbolicValue", "TraceDependency", "split_markers"]

MARK_BEGIN = "\ue000"
MARK_END = "\ue001"
#: matches one marker; groups: kind, name
MARKER_RE = re.compile(f"{MARK_BEGIN}([a-z]+):([^{MARK_END}]*){MARK_END}")


class TraceDependency(BaseException):
    """Raised inside a traced program when control flow needs a symbolic value.

    A ``BaseException`` so that a program's own ``except Exception`` does not swallow it.
    """

    def __init__(self, value: SymbolicValue, operation: str) -> None:
        self.kind = value.kind
        self.symbol_name = value.symbol_name
        self.operation = operation
        what = "argument" if value.kind == "arg" else f"{value.kind} result"
        super().__init__(
            f"control flow depends on the {what} {value.symbol_name!r} (used in {operation}); "
            "tracing stops here"
        )


class SymbolicValue(str):
    """A placeholder for an argument (``kind="arg"``) or a generated value (``"gen"``, ``"select"``, ``"scope"``)."""

    kind: str
    symbol_name: str

    def __new__(cls, kind: str, name: str) -> Self:
        obj = super().__new__(cls, f"{MARK_BEGIN}{kind}:{name}{MARK_END}")
        obj.kind = kind
        obj.symbol_name = name
        return obj

    def __getnewargs__(self) -> tuple[str, str]:
        return (self.kind, self.symbol_name)

    def __repr__(self) -> str:
        return f"<symbolic {self.kind} {self.symbol_name!r}>"

    __hash__ = str.__hash__


def _blocked(operation: str) -> Any:
    def method(self: SymbolicValue, *args: Any, **kwargs: Any) -> NoReturn:
        raise TraceDependency(self, operation)

    method.__name__ = operation
    return method


_BLOCKED = (
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__iter__",
    "__contains__", "__getitem__", "__int__", "__float__", "__index__", "__mul__", "__rmul__", "split",
    "rsplit", "splitlines", "strip", "lstrip", "rstrip", "lower", "upper", "casefold", "title", "capitalize",
    "startswith", "endswith", "find", "rfind", "index", "rindex", "count", "replace", "partition",
    "rpartition", "isdigit", "isnumeric", "isdecimal", "isalpha", "isalnum", "isspace", "islower", "isupper",
    "encode", "zfill", "center", "ljust", "rjust", "removeprefix", "removesuffix",
)
for _name in _BLOCKED:
    setattr(SymbolicValue, _name, _blocked(_name))


def split_markers(text: str) -> list[tuple[str, str, str]]:
    """Split ``text`` into pieces ``("text", value, "")`` and ``("symbol", kind, name)``, in order."""
    text = str(text)  # a SymbolicValue's own str methods are blocked
    pieces: list[tuple[str, str, str]] = []
    pos = 0
    for m in MARKER_RE.finditer(text):
        if m.start() > pos:
            pieces.append(("text", text[pos : m.start()], ""))
        pieces.append(("symbol", m.group(1), m.group(2)))
        pos = m.end()
    if pos < len(text):
        pieces.append(("text", text[pos:], ""))
    return pieces
