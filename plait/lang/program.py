"""``@pl.function`` programs: run, run_batch, trace; the default backend.

A program is a Python function whose first parameter is the state (``def prog(s, question): ...``).
``prog.run(...)`` executes it against a backend and returns the ``ProgramState``; every backend call of
one run carries the run's ``program_id`` between ``backend.begin_program`` and ``backend.end_program``
(program-aware caching). ``prog.run_batch([...])`` runs many concurrently after prefilling the prefix
that tracing shows is the same for every item. ``prog.trace(...)`` runs it symbolically.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from plait.lang.backends.base import Backend, ChatTemplate
from plait.lang.chat_template import resolve_chat_template
from plait.lang.constraints import check_fields
from plait.lang.errors import (
    NoBackendError,
    ProgramArgumentError,
    ProgramBatchError,
    ProgramTimeoutError,
)
from plait.lang.interpreter import Executor
from plait.lang.lifecycle import abort_run, check_timeout, start_deadline, wind_down
from plait.lang.models import model_kwargs, supports_models
from plait.lang.records import RunContext
from plait.lang.state import ProgramState
from plait.lang.tracer import ProgramTrace, trace_program
from plait.sampling import SamplingParams

__all__ = ["Program", "function", "get_default_backend", "set_default_backend"]

_default_backend: Backend | None = None
_default_lock = threading.Lock()


def set_default_backend(backend: Backend | None) -> None:
    """The backend programs use when ``run`` gets no ``backend=`` (None clears it)."""
    global _default_backend
    if backend is not None and not isinstance(backend, Backend):
        raise TypeError(
            f"{type(backend).__name__} is not a plait backend (it lacks methods of "
            "plait.lang.backends.base.Backend); use pl.Runtime(...), pl.Endpoint(url) or pl.OpenAI(model)"
        )
    with _default_lock:
        _default_backend = backend


def get_default_backend() -> Backend | None:
    """The backend set with ``set_default_backend``, or None."""
    with _default_lock:
        return _default_backend


#: ``name_reuse`` values: a second gen/select/var_scope of a name in one run (or one fork branch)
#: raises ``VariableReuseError`` (``"error"``), or replaces the earlier value (``"overwrite"``, SGLang's way).
NAME_REUSE = ("error", "overwrite")


def function(func: Callable[..., Any] | None = None, *, chat_template: ChatTemplate | str | None = None,
             name_reuse: str = "error") -> Any:
    """Decorate ``def prog(s, ...)`` into a ``Program``; ``@pl.function(chat_template="chatml")`` too.

    ``name_reuse="overwrite"`` lets a later gen/select/var_scope reuse a name (the latest value wins, as in
    SGLang); by default that is a ``VariableReuseError``.
    """
    if func is None:
        return lambda f: Program(f, chat_template=chat_template, name_reuse=name_reuse)
    return Program(func, chat_template=chat_template, name_reuse=name_reuse)


class Program:
    """A decorated program function. Call ``run``, ``run_batch`` or ``trace``."""

    def __init__(self, func: Callable[..., Any], chat_template: ChatTemplate | str | None = None,
                 name_reuse: str = "error") -> None:
        if not callable(func):
            raise TypeError(f"@pl.function decorates a function, got {type(func).__name__}")
        if name_reuse not in NAME_REUSE:
            raise ValueError(f"name_reuse must be one of {NAME_REUSE}, got {name_reuse!r}")
        self.name_reuse = name_reuse
        self.func = func
        self.chat_template = resolve_chat_template(chat_template) if chat_template is not None else None
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ProgramArgumentError(
                f"program {func.__name__!r} must take the state as its first parameter: def {func.__name__}(s, ...)"
            )
        self.arg_names = [p.name for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        self._var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
        functools.update_wrapper(self, func)

    @property
    def name(self) -> str:
        return self.func.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inside another program, ``prog(s, ...)`` appends to ``s``; otherwise the same as ``run``."""
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **kwargs)
        return self.run(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<plait program {self.name}{self.signature}>"

    # ------------------------------------------------------------------ argument handling
    def _split_kwargs(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Program arguments and sampling defaults (SamplingParams names the program does not take)."""
        program_kwargs, defaults = {}, {}
        sampling_names = SamplingParams.field_names()
        for key, value in kwargs.items():
            if key in self.arg_names or (self._var_keyword and key not in sampling_names):
                program_kwargs[key] = value
            elif key in sampling_names:
                defaults[key] = value
            else:
                raise ProgramArgumentError(
                    f"program {self.name!r} got an unexpected argument {key!r}; it takes "
                    f"{self.arg_names or 'no arguments'}, and run() also accepts backend=, stream=, "
                    f"chat_template=, return_logprob=, top_logprobs_num= and sampling defaults ({', '.join(sorted(sampling_names))})"
                )
        if "stop" in defaults and isinstance(defaults["stop"], list):
            defaults["stop"] = tuple(defaults["stop"])
        check_fields(defaults)  # a bad regex / JSON schema: InvalidConstraintError, as from gen()
        SamplingParams(**defaults)  # validate now: a ValueError naming the bad field
        return program_kwargs, defaults

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> inspect.BoundArguments:
        try:
            return self.signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise ProgramArgumentError(f"program {self.name}{self.signature}: {exc}") from None

    def _backend(self, backend: Backend | None) -> Backend:
        backend = backend if backend is not None else get_default_backend()
        if backend is None:
            raise NoBackendError(
                f"no backend to run program {self.name!r}: pass backend= to run()/run_batch(), or call "
                "pl.set_default_backend(pl.Runtime()) (or pl.Endpoint(url), pl.OpenAI(model)) first"
            )
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must implement plait.lang.backends.base.Backend, got {type(backend).__name__}")
        return backend

    def _template(self, chat_template: ChatTemplate | str | None, backend: Backend | None) -> ChatTemplate:
        if chat_template is not None:
            return resolve_chat_template(chat_template)
        if self.chat_template is not None:
            return self.chat_template
        if backend is not None:
            return backend.chat_template()
        return resolve_chat_template("default")

    # ------------------------------------------------------------------ run
    def run(
        self,
        *args: Any,
        backend: Backend | None = None,
        stream: bool = False,
        chat_template: ChatTemplate | str | None = None,
        use_thread: bool = True,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program and return its state.

        ``stream=True`` returns at once: the program runs in the background and ``state.text_iter()``
        / ``text_async_iter()`` yield text as it is produced. Keyword arguments that are sampling
        parameters (``temperature=0``, ``max_new_tokens=64``...) and not program parameters become the
        defaults of every ``gen``. ``use_thread=False`` executes nodes in the calling thread (forks
        then run one after another). ``return_logprob=True`` asks for the output token logprobs of
        every ``gen`` (and ``top_logprobs_num`` alternatives per token), as ``gen(return_logprob=True)``
        does for one: they are in ``get_meta_info(name)`` and the call records, and the notebook view
        colours each generated token by its probability. ``timeout``: seconds after which the run is
        aborted (its calls in flight too) and ``ProgramTimeoutError`` raised (with ``stream=True``:
        raised by the state's readers).
        """
        timeout = check_timeout(timeout)
        backend = self._backend(backend)
        program_kwargs, defaults = self._split_kwargs(kwargs)
        bound = self._bind(args, program_kwargs)
        template = self._template(chat_template, backend)
        run = RunContext(backend, template, f"prog-{uuid.uuid4().hex}", defaults, stream, threaded=use_thread or stream,
                         name_reuse=self.name_reuse, **_logprob_options(return_logprob, top_logprobs_num))
        backend.begin_program(run.program_id)
        state = ProgramState(Executor(run))
        if timeout is not None:
            start_deadline(run, timeout, ProgramTimeoutError(
                f"program {self.name!r} did not finish within timeout={timeout:g} s; it was aborted"))
        if stream:
            threading.Thread(target=self._execute, args=(run, state, bound), name=f"plait-{self.name}", daemon=True).start()
            return state
        error = self._execute(run, state, bound)
        if error is not None:
            raise error
        return state

    def _execute(self, run: RunContext, state: ProgramState, bound: inspect.BoundArguments) -> BaseException | None:
        """Call the function, finish every executor of the run, end the program; returns the first error.

        An aborted run (``state.abort()``, ``timeout=``) returns its abort error at once; the calls still in
        flight are waited for, and ``end_program`` sent, in the background (``plait.lang.lifecycle``).
        """
        root = state._executor
        error: BaseException | None = None
        try:
            state.ret_value = self.func(state, *bound.args[1:], **bound.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller (raised or kept in the state)
            error = exc
        error = wind_down(run, error)
        if error is not None and root.error is None:
            root.fail(error)
        with root.changed:  # readers of a streamed run may now take the root's end as the run's end
            run.outcome_known = True
            root.changed.notify_all()
        return error

    # ------------------------------------------------------------------ run_batch
    def run_batch(
        self,
        batch_kwargs: Sequence[Mapping[str, Any]],
        *,
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        chat_template: ChatTemplate | str | None = None,
        raise_on_error: bool = True,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        timeout: float | None = None,
        **sampling_defaults: Any,
    ) -> list[ProgramState]:
        """Run the program once per kwargs mapping, concurrently; the states come back in input order.

        With more than one item, the text every item starts with (found by tracing) is prefilled once
        with ``backend.cache_prefix`` before the runs fan out (``batch_prefix`` returns it). Failed runs
        raise ``ProgramBatchError`` after all finished (``raise_on_error=False``: check ``state.error()``).
        ``progress_bar=True`` shows a tqdm bar (a widget in Jupyter when ipywidgets is installed, text
        otherwise). ``return_logprob`` / ``top_logprobs_num``: as for ``run``. ``timeout``: seconds for
        the whole batch; runs not finished by then are aborted (``state.error()`` is a
        ``ProgramTimeoutError``), and ``ProgramTimeoutError`` is raised (``.states``, ``.errors``).
        """
        logprob_options = _logprob_options(return_logprob, top_logprobs_num)
        timeout = check_timeout(timeout)
        backend = self._backend(backend)
        items = list(batch_kwargs)
        bad = [i for i, item in enumerate(items) if not isinstance(item, Mapping)]
        if bad:
            raise ProgramArgumentError(f"run_batch takes a list of keyword-argument dicts; item {bad[0]} is {items[bad[0]]!r}")
        template = self._template(chat_template, backend)
        _, defaults = self._split_kwargs(sampling_defaults)
        bound = []
        for item in items:
            item_kwargs, item_defaults = self._split_kwargs(item)
            bound.append((self._bind((), item_kwargs), {**defaults, **item_defaults}))
        threads = self._num_threads(num_threads, len(items))
        deadline = None if timeout is None else time.monotonic() + timeout
        batch_id = f"batch-{uuid.uuid4().hex}"
        backend.begin_program(batch_id)
        try:
            if len(items) > 1:
                prefix, model = self._batch_prefix(items, template, None)
                if prefix and (model is None or supports_models(backend)):
                    backend.cache_prefix(prefix, batch_id, **model_kwargs(backend, model, "run_batch"))
            return self._run_all(backend, template, bound, threads, progress_bar, raise_on_error, logprob_options,
                                 deadline)
        finally:
            backend.end_program(batch_id)

    @staticmethod
    def _num_threads(num_threads: int | str, n: int) -> int:
        if num_threads == "auto":
            return max(1, min(n, max(32, 4 * multiprocessing.cpu_count())))
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be 'auto' or an int >= 1, got {num_threads!r}")
        return min(num_threads, max(n, 1))

    def _run_all(
        self,
        backend: Backend,
        template: ChatTemplate,
        bound: list[tuple[inspect.BoundArguments, dict[str, Any]]],
        threads: int,
        progress_bar: bool,
        raise_on_error: bool,
        logprob_options: dict[str, Any],
        deadline: float | None = None,
    ) -> list[ProgramState]:
        runs: list[RunContext] = []  # the runs started so far (aborted when the deadline passes)
        runs_lock = threading.Lock()
        expired = threading.Event()
        timed_out = f"run_batch of {self.name!r} did not finish within its timeout; this run was aborted"

        def one(item: tuple[inspect.BoundArguments, dict[str, Any]]) -> tuple[ProgramState, BaseException | None]:
            b, defaults = item
            run = RunContext(backend, template, f"prog-{uuid.uuid4().hex}", defaults, name_reuse=self.name_reuse,
                             **logprob_options)
            state = ProgramState(Executor(run))
            with runs_lock:
                late = expired.is_set() or (deadline is not None and time.monotonic() >= deadline)
                runs.append(run)
            if late:  # never started: nothing to abort on the backend
                error = ProgramTimeoutError(timed_out)
                run.abort_error, run.ended = error, True
                state._executor.fail(error)
                state._executor.end()
                return state, error
            backend.begin_program(run.program_id)
            return state, self._execute(run, state, b)

        bar = None
        if progress_bar:
            from plait.progress import tqdm

            bar = tqdm(total=len(bound), desc=self.name)
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix=f"plait-batch-{self.name}") as pool:
                futures = [pool.submit(one, b) for b in bound]
                if bar is not None:
                    for f in futures:
                        f.add_done_callback(lambda _: bar.update(1))
                if deadline is not None:
                    _, pending = wait_futures(futures, timeout=max(deadline - time.monotonic(), 0.0))
                    if pending:
                        with runs_lock:
                            expired.set()
                            started = list(runs)
                        for run in started:
                            abort_run(run, ProgramTimeoutError(timed_out))
                results = [f.result() for f in futures]
        finally:
            if bar is not None:
                bar.close()
        states = [s for s, _ in results]
        errors = {i: e for i, (_, e) in enumerate(results) if e is not None}
        if errors and raise_on_error:
            timeouts = sum(isinstance(e, ProgramTimeoutError) for e in errors.values())
            if timeouts:
                raise ProgramTimeoutError(
                    f"run_batch of {self.name!r}: {timeouts} of {len(states)} runs did not finish within the "
                    "timeout and were aborted; inspect .errors / .states", states, errors)
            raise ProgramBatchError(states, errors)
        return states

    def batch_prefix(self, batch_kwargs: Sequence[Mapping[str, Any]], chat_template: ChatTemplate | str | None = None,
                     backend: Backend | None = None) -> str:
        """The prompt text every item of ``batch_kwargs`` starts with, found by tracing.

        Arguments equal in every item are traced with their value; the others are symbolic, so the
        prefix ends where the first of them (or the first generation) enters the prompt.
        """
        return self._batch_prefix(batch_kwargs, chat_template, backend)[0]

    def _batch_prefix(self, batch_kwargs: Sequence[Mapping[str, Any]], chat_template: ChatTemplate | str | None,
                      backend: Backend | None) -> tuple[str, str | None]:
        """``batch_prefix`` and the model of the program's first call (None: the default model), under
        which the prefix is worth prefilling (KV is per model)."""
        items = [self._split_kwargs(item)[0] for item in batch_kwargs]
        if not items:
            return "", None
        constant, symbolic = {}, set()
        for name in set().union(*items):
            values = [item.get(name, _MISSING) for item in items]
            if all(v is not _MISSING for v in values) and all(_same(v, values[0]) for v in values):
                constant[name] = values[0]
            else:
                symbolic.add(name)
        template = self._template(chat_template, backend if backend is not None else get_default_backend())
        trace = trace_program(self, (), constant, template, symbolic=symbolic)
        return trace.constant_prefix, trace.calls[0].model if trace.calls else None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ trace
    def trace(self, *args: Any, backend: Backend | None = None, chat_template: ChatTemplate | str | None = None,
              **kwargs: Any) -> ProgramTrace:
        """Run the program symbolically and return its IR graph (``print`` it).

        Arguments not given are symbolic (so the text that does not depend on them shows as constant);
        ``gen``/``select`` return placeholders. The chat template is the one ``run`` would use (the
        given or default backend's; the "default" template when there is no backend). Nothing is sent
        to a backend.
        """
        program_kwargs, defaults = self._split_kwargs(kwargs)
        template = self._template(chat_template, backend if backend is not None else get_default_backend())
        return trace_program(self, args, program_kwargs, template, defaults=defaults)


_MISSING = object()


def _logprob_options(return_logprob: bool, top_logprobs_num: int) -> dict[str, Any]:
    """The run-wide logprob request of ``run`` / ``run_batch``, validated."""
    if not isinstance(return_logprob, bool):
        raise ValueError(f"return_logprob must be True or False, got {return_logprob!r}")
    if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
        raise ValueError(f"top_logprobs_num must be an int >= 0, got {top_logprobs_num!r}")
    return {"return_logprob": return_logprob or top_logprobs_num > 0, "top_logprobs_num": top_logprobs_num}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # noqa: BLE001 - values without a usable == count as different
        return False
