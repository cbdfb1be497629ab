"""Typed errors of the language. Every message says what went wrong and what to do instead.

All errors derive from ``PlaitLangError`` and also from the matching builtin (``KeyError``,
``ValueError``, ``TypeError``, ``RuntimeError``, ``TimeoutError``), so existing ``except`` clauses
keep working. ``BackendCapabilityError`` is also exported by the Backend protocol
(``plait.lang.backends.base``), which backends import it from. This module imports nothing of plait.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BackendCapabilityError",
    "ChatTemplateError",
    "EmptyChoicesError",
    "GenerationError",
    "InvalidConstraintError",
    "InvalidDtypeError",
    "NoBackendError",
    "PlaitLangError",
    "ProgramAbortedError",
    "ProgramArgumentError",
    "ProgramBatchError",
    "ProgramTimeoutError",
    "RoleError",
    "StateClosedError",
    "ToolCallError",
    "ToolDeclarationError",
    "UnknownVariableError",
    "VariableReuseError",
]


class PlaitLangError(Exception):
    """Base class of the language's errors."""


class BackendCapabilityError(PlaitLangError, RuntimeError):
    """The backend cannot do what the program asks (e.g. ``select`` on an API without logprobs, an
    image for a text-only model).

    The message says what was asked, which backend refused, and what to use instead.
    """


class InvalidConstraintError(PlaitLangError, ValueError):
    """A ``regex`` / ``json_schema`` / ``ebnf`` constraint (or a ``stop_regex``) that is malformed or uses a
    feature constrained decoding does not support. Raised by ``gen()`` where it is written, and by every
    backend for a constraint only its compiler refuses."""


class VariableReuseError(PlaitLangError, ValueError):
    """A second ``gen`` / ``select`` / ``var_scope`` with a name that an earlier one of the same run
    (or of the same fork branch) already set. ``@pl.function(name_reuse="overwrite")`` allows it."""


class ProgramAbortedError(PlaitLangError, RuntimeError):
    """The run was aborted (``state.abort()``, or the caller stopped reading its ``text_iter``); its
    in-flight backend calls were aborted and its remaining nodes were not executed."""


class ProgramTimeoutError(ProgramAbortedError, TimeoutError):
    """The run (or ``run_batch``) did not finish within ``timeout=``; it was aborted.

    From ``run_batch``: ``states`` holds every state (in input order) and ``errors`` maps the failed
    positions to their exceptions, as in ``ProgramBatchError``.
    """

    def __init__(self, message: str, states: list | None = None, errors: dict[int, BaseException] | None = None):
        super().__init__(message)
        self.states = states
        self.errors = errors


class UnknownVariableError(PlaitLangError, KeyError):
    """``s["name"]`` / ``s.get_meta_info("name")`` for a variable the program never set."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(str(k) for k in known)
        listed = ", ".join(repr(k) for k in self.known) if self.known else "none yet"
        super().__init__(
            f"unknown variable {name!r}; known variables: {listed}. Set it with "
            f"s += pl.gen({name!r}, ...), pl.select({name!r}, ...), s.var_scope({name!r}) or s[{name!r}] = value"
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class EmptyChoicesError(PlaitLangError, ValueError):
    """``select`` (or ``gen(choices=...)``) with no choices."""


class InvalidDtypeError(PlaitLangError, ValueError):
    """``gen(dtype=...)`` with a type other than int, float, bool or str."""


class StateClosedError(PlaitLangError, RuntimeError):
    """Appending to a state whose run has finished, or to a fork that was already joined."""


class NoBackendError(PlaitLangError, RuntimeError):
    """A program run without ``backend=`` and without ``pl.set_default_backend(...)``."""


class ProgramArgumentError(PlaitLangError, TypeError):
    """Arguments that do not fit the program's signature (run, run_batch, trace)."""


class ChatTemplateError(PlaitLangError, ValueError):
    """An unknown template name, a role the template lacks, or a template that cannot be derived."""


class RoleError(PlaitLangError, ValueError):
    """Nested role blocks, or a role end that does not match the open role."""


class GenerationError(PlaitLangError, RuntimeError):
    """A generation the backend aborted, or output that is not what was asked: it does not parse as the
    requested ``dtype`` or JSON schema, or it was cut by ``max_tokens`` (see ``gen(on_incomplete=...)``)."""


class ToolDeclarationError(PlaitLangError, ValueError):
    """A tool that cannot be declared (bad name, a parameter without a type hint or with a hint that has
    no JSON schema, a schema too large, duplicate names), or ``call_tools`` naming tools the prompt
    never declared."""


class ToolCallError(GenerationError):
    """A model turn of ``call_tools`` whose tool calls cannot be read: cut by ``max_tokens`` mid-call, or
    (from a backend without constrained decoding) not in the tool-call format."""


class ProgramBatchError(PlaitLangError, RuntimeError):
    """Some programs of ``run_batch`` failed. ``states`` holds every state (in input order),
    ``errors`` maps the failed positions to their exceptions."""

    def __init__(self, states: list, errors: dict[int, BaseException]) -> None:
        self.states = states
        self.errors = errors
        first = min(errors)
        super().__init__(
            f"{len(errors)} of {len(states)} programs failed; the first (index {first}) raised "
            f"{type(errors[first]).__name__}: {errors[first]}. Inspect .errors / .states, or pass "
            "raise_on_error=False to get the states back and check state.error() for each"
        )
