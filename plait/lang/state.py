"""ProgramState: what a program function receives as ``s`` and what ``run`` returns.

``s += node`` appends (non-blocking; nodes execute in order on the state's executor), ``s["name"]``
reads a variable (waiting for it), ``s.fork(n)`` makes concurrent branches. After the run, the state
holds the result: ``text()``, ``messages()``, variables, ``get_meta_info``, the backend calls made,
and an HTML view for notebooks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from plait.lang import streaming
from plait.lang.errors import ProgramAbortedError, StateClosedError
from plait.lang.interpreter import Executor, _AppendForks
from plait.lang.ir import RoleBegin, RoleEnd, VarScopeBegin, VarScopeEnd, to_node
from plait.lang.lifecycle import abort_run
from plait.lang.models import check_model_name
from plait.lang.primitives import role as _role
from plait.lang.primitives import system as _system
from plait.lang.records import CallRecord

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ProgramState", "ProgramStateGroup"]


class ProgramState:
    """The state of one program run (or one fork of it)."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self.ret_value: Any = None

    # ------------------------------------------------------------------ appending
    def __iadd__(self, other: Any) -> Self:
        self._executor.submit(to_node(other))
        return self

    def _role(self, name: str, expr: Any) -> Any:
        if expr is not None:
            self._executor.submit(_role(name, expr))
            return None
        return self._role_block(name)

    @contextmanager
    def _role_block(self, name: str) -> Iterator[None]:
        self._executor.submit(RoleBegin(name))
        yield
        self._executor.submit(RoleEnd(name))

    def system(self, expr: Any = None, *, tools: Any = None) -> Any:
        """``s.system("...")`` appends a system block; ``with s.system(): ...`` opens one.
        ``tools=[...]`` declares tools (see ``pl.system``)."""
        if tools is not None:
            self._executor.submit(_system(expr, tools=tools))
            return None
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        """``s.user("...")`` appends a user block; ``with s.user(): ...`` opens one."""
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        """``s.assistant(pl.gen("a"))`` appends an assistant block; ``with s.assistant(): ...`` opens one."""
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Capture the text appended inside the ``with`` block into variable ``name``."""
        self._executor.submit(VarScopeBegin(name))
        yield
        self._executor.submit(VarScopeEnd(name))

    @contextmanager
    def using(self, model: str | None) -> Iterator[None]:
        """Send the calls appended inside the ``with`` block to ``model``: ``with s.using(model="writer"):``.

        Every ``gen`` / ``select`` / ``call_tools`` appended in the block that names no model of its own
        is served by ``model`` (a LoRA adapter's name, or another model of the backend); ``None`` is the
        backend's default model (e.g. to reach the base model inside an outer scope). Scopes nest, and
        the previous one is back when the block ends, also when it ends by an exception. A fork made
        inside the block starts in the same scope (its branches have their own from then on).
        """
        scope = self._executor.model_scope
        scope.append(check_model_name(model, "using"))
        depth = len(scope)
        try:
            yield
        finally:
            del scope[depth - 1:]  # also drops a scope an exception left open inside

    # ------------------------------------------------------------------ fork
    def fork(self, size: int = 1) -> ProgramStateGroup:
        """``size`` branches that continue from here concurrently and share this prefix."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"fork size must be an int >= 1, got {size!r}")
        if self._executor.closed:
            raise StateClosedError("cannot fork a closed state; fork inside the program function")
        return ProgramStateGroup([ProgramState(e) for e in self._executor.fork(size)], self)

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """A single fork that is joined (variables gathered) when the ``with`` block ends."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ------------------------------------------------------------------ reading
    def __getitem__(self, name: str) -> Any:
        return self._executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self._executor.known_names()

    def get_var(self, name: str) -> Any:
        return self._executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self._executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        """What the backend reported for the ``gen``/``select`` named ``name`` (tokens, logprobs, scores)."""
        return self._executor.get_meta_info(name)

    def parsed(self, name: str) -> Any:
        """The parsed output of the ``gen(name, json_schema=...)``: the validated instance when the schema
        is a pydantic model, else the JSON value. Raises ``ValueError`` when there is none (another kind
        of gen, or output kept unparsed with ``on_incomplete="keep"``)."""
        meta = self._executor.get_meta_info(name)
        if not isinstance(meta, dict) or "parsed" not in meta:
            raise ValueError(
                f"variable {name!r} has no parsed value: it was not made by gen(..., json_schema=...), or its "
                "output was incomplete and kept as text (see get_meta_info(name)['incomplete'])"
            )
        return meta["parsed"]

    def tool_calls(self, name: str) -> list[Any]:
        """The ``ToolCall``s made by ``pl.call_tools(name, ...)``: the calls of its one turn with
        ``execute=False`` (empty when the model answered), every call run with ``execute=True``."""
        meta = self._executor.get_meta_info(name)
        if not isinstance(meta, dict) or "tool_calls" not in meta:
            raise ValueError(f"variable {name!r} was not made by pl.call_tools(...)")
        return list(meta["tool_calls"])

    def variables(self) -> dict[str, Any]:
        """All variables (after every queued node has run)."""
        self.sync()
        return dict(self._executor.variables)

    def text(self) -> str:
        """The full prompt text so far (waits for queued nodes)."""
        self.sync()
        return self._executor.text

    def messages(self) -> list[dict[str, str]]:
        """The role blocks so far as ``[{"role", "content"}, ...]`` (OpenAI chat format)."""
        self.sync()
        return [dict(m) for m in self._executor.messages]

    @property
    def calls(self) -> list[CallRecord]:
        """The backend calls this state made (gen and select), in order."""
        self.sync()
        return list(self._executor.calls)

    @property
    def program_id(self) -> str | None:
        """The id every backend call of this run carried."""
        return self._executor.run.program_id

    def sync(self) -> None:
        """Wait until every appended node has run; raises the first error of the run."""
        self._executor.sync()

    def error(self) -> BaseException | None:
        """The exception that stopped this state, or None."""
        return self._executor.error

    @property
    def finished(self) -> bool:
        """True once the run is over and nothing more will be appended."""
        return self._executor.finished

    def abort(self) -> bool:
        """Abort the run this state belongs to (forks included); returns False if it had ended already.

        Calls in flight are aborted on the backend (Runtime, Endpoint, MockBackend; a streamed gen's stream
        is closed on every backend), nodes not yet executed are dropped, and the program's next append or
        read, ``run()``, ``sync()`` and ``text_iter()`` raise ``ProgramAbortedError``. The program's own
        Python code is not interrupted.
        """
        return abort_run(self._executor.run, ProgramAbortedError(
            "the run was aborted with state.abort(); its calls in flight were aborted and the rest of the "
            "program was not executed"))

    # ------------------------------------------------------------------ streaming
    def text_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> Iterator[Any]:
        """Yield the text (or variable ``var_name``'s text) as it is produced, until the run ends.

        Without ``stream=True`` the run is already over and this yields everything at once. With
        ``return_meta_data=True`` (a variable must be named) it yields ``(text, meta_info)`` pairs: the
        gen's meta so far, with the logprobs of this piece's tokens (see ``plait.lang.streaming``).
        Stopping early (``break``) aborts the run; an error of the run is raised.
        """
        return streaming.text_iter(self, var_name, return_meta_data)

    def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> AsyncIterator[Any]:
        """``text_iter`` for asyncio: ``async for chunk in state.text_async_iter("answer")`` (SGLang's
        signature: ``return_meta_data=True`` yields ``(text, meta_info)``)."""
        return streaming.text_async_iter(self, var_name, return_meta_data)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        ex = self._executor
        status = "error" if ex.error is not None else ("finished" if ex.finished else "running")
        return f"ProgramState({status}, text={ex.text!r})"

    def _repr_html_(self) -> str:
        from plait.lang.html import render_state_html

        return render_state_html(self)


class ProgramStateGroup:
    """The branches made by ``s.fork(n)``: index them, append to all, ``join()`` them back."""

    def __init__(self, states: list[ProgramState], source: ProgramState) -> None:
        self.states = states
        self.source = source

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        if value is not self.states[i]:  # ``forks[i] += ...`` assigns the same state back
            raise TypeError("fork states cannot be replaced; append to them with forks[i] += ...")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> Self:
        """Append to every branch: a node/str (the same for all), a list (one per branch) or ``f(i)``."""
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"got {len(other)} items for {len(self.states)} forks; give one per fork")
            items = list(other)
        elif callable(other):
            items = [other(i) for i in range(len(self.states))]
        else:
            items = [other] * len(self.states)
        for state, item in zip(self.states, items):
            state += item
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every branch and merge it back into the source state.

        ``"gather_variable"``: each variable a branch set after the fork (a new name, or one the source
        already had) becomes a list in the source state of the branches' current values (one entry per
        branch that set it, in branch order), replacing the source's earlier value. ``"concate_and_append"``: the text each branch
        added is appended to the source state, branch after branch.
        """
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"unknown join mode {mode!r}; use 'gather_variable' or 'concate_and_append'")
        executors = [s._executor for s in self.states]
        source = self.source._executor
        for ex in executors:
            ex.join_mode = mode
        if source.log is not None:
            source.log.append(("join", mode))
        if mode == "gather_variable":
            for ex in executors:
                ex.sync()
            source.sync()
            gathered: dict[str, list[Any]] = {}
            gathered_meta: dict[str, list[Any]] = {}
            for ex in executors:
                for name in [k for k in ex.variables if k in ex.written]:
                    gathered.setdefault(name, []).append(ex.variables[name])
                    if name in ex.meta_info:
                        gathered_meta.setdefault(name, []).append(ex.meta_info[name])
            for name, values in gathered.items():
                source.set_var(name, values)
                if name in gathered_meta:
                    source.meta_info[name] = gathered_meta[name]
                else:
                    source.meta_info.pop(name, None)
        else:
            source.submit(_AppendForks(executors))
            source.sync()
        # the branches' calls join the source's record (tokens, cache hits, latency of every call)
        for ex in executors:
            ex.merge_calls_into_parent()
            ex.end()

