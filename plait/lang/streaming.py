"""Streaming: a streamed gen showing its text as it comes (``stream_gen``), and reading a state's text as it
is produced (``state.text_iter()`` and ``state.text_async_iter()``).

A reader waits on the executor's condition for the text (or one variable's text) to grow, and yields the
new piece. With ``return_meta_data=True`` it yields ``(piece, meta_info)``: what the backend reported for
the gen so far (``completion_tokens``...), with the output logprobs of this piece's tokens only
(``output_token_logprobs``/``output_top_logprobs``) and ``output_token_logprobs_length`` the number so
far, as SGLang's ``text_async_iter`` does. Tokens that add no text (yet) are reported with the next piece.

A reader that stops before the end (``break``, ``close()``, garbage collection, a cancelled task) aborts
the run as ``state.abort()`` does, so the backend stops generating for a reader that left.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from plait.lang.backends.base import Backend, GenerateCall, GenerateResult
from plait.lang.errors import GenerationError, ProgramAbortedError, UnknownVariableError
from plait.lang.lifecycle import abort_run
from plait.lang.reasoning import ReasoningStream, reasoning_var

if TYPE_CHECKING:
    from plait.lang.interpreter import Executor
    from plait.lang.state import ProgramState

__all__ = ["stream_gen", "text_async_iter", "text_iter"]


def stream_gen(ex: Executor, backend: Backend, call: GenerateCall, name: str | None,
               splitter: ReasoningStream | None) -> GenerateResult:
    """Consume ``backend.stream(call)`` for a gen of ``ex``, showing the text as it comes (and splitting off
    the reasoning with ``splitter``); closes the stream, which aborts the request, when the run is aborted.
    Returns the final result (its text the answer when ``splitter`` is given)."""
    shown = ""
    result: GenerateResult | None = None
    stream = backend.stream(call)
    try:
        for result in stream:
            if ex.run.abort_error is not None:
                break
            if result.text.startswith(shown) and len(result.text) > len(shown):
                delta, shown = result.text[len(shown) :], result.text
                _show(ex, splitter.feed(delta) if splitter is not None else delta, name, splitter, result)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    ex.raise_if_aborted()
    if result is None or not result.finished:
        raise GenerationError(f"backend {backend.name!r} ended the stream of gen {name!r} without a final result")
    if splitter is not None:
        _show(ex, splitter.finish(), name, splitter, result)
        result = replace(result, text=splitter.content)
    return result


def _show(ex: Executor, visible: str, name: str | None, splitter: ReasoningStream | None,
          result: GenerateResult) -> None:
    with ex.changed:  # the text, the variable and its meta change together (for text_iter's readers)
        ex._append(visible, "gen", name)
        if name is None:
            return
        ex.set_var(name, splitter.content if splitter is not None else result.text)
        ex.stream_meta[name] = _snapshot_meta(result)
        if splitter is not None:
            ex.set_var(reasoning_var(name), splitter.reasoning)


def _snapshot_meta(result: GenerateResult) -> dict[str, Any]:
    """What a streaming gen reports so far (cumulative logprobs), for ``text_iter(..., return_meta_data=True)``."""
    return {
        **result.meta,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
        "output_token_logprobs": result.output_token_logprobs,
        "output_top_logprobs": result.output_top_logprobs,
    }

Chunk = tuple[str, dict[str, Any] | None]


def next_chunk(ex: Executor, var: str | None, shown: int, timeout: float | None = None) -> Chunk | None:
    """The text past ``shown`` (of the whole text or of ``var``) once there is some, with ``var``'s meta
    at that point; None at the end; ``("", None)`` when ``timeout`` passed first."""
    with ex.changed:
        while True:
            # a root's executor finishes before its program function's error (a failed fork's, raised by
            # join) is recorded: its end is the run's end only once the outcome is known
            finished = ex.finished and (ex.parent is not None or ex.run.outcome_known or ex.run.symbolic)
            if var is None:
                current = ex.text
                done = finished or ex.error is not None
            else:
                current = ex.variables.get(var, "")
                current = current if isinstance(current, str) else str(current)
                done = (var in ex.variables and ex.var_done(var)) or finished or ex.error is not None
            if len(current) > shown:
                if var is None:
                    return current[shown:], None
                final = ex.var_done(var) and var in ex.meta_info
                return current[shown:], ex.meta_info.get(var) if final else ex.stream_meta.get(var)
            if done:
                if ex.error is not None:
                    raise ex.error
                if var is not None and var not in ex.known_names():
                    raise UnknownVariableError(var, ex.known_names())
                return None
            if not ex.changed.wait(timeout) and timeout is not None:
                return "", None


class _MetaDelta:
    """Turns the cumulative logprob lists of successive meta snapshots into per-piece lists."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(meta or {})
        logprobs = out.get("output_token_logprobs")
        if logprobs is not None:
            out["output_token_logprobs"] = list(logprobs[self.sent:])
            tops = out.get("output_top_logprobs")
            if tops is not None:
                out["output_top_logprobs"] = list(tops[self.sent:])
            out["output_token_logprobs_length"] = len(logprobs)
            self.sent = len(logprobs)
        return out


def _check_meta_request(var: str | None, return_meta_data: bool) -> None:
    if return_meta_data and var is None:
        raise ValueError("return_meta_data=True reports one gen's meta: name its variable, "
                         "e.g. text_iter('answer', return_meta_data=True)")


def _abort_left(state: ProgramState) -> None:
    abort_run(state._executor.run, ProgramAbortedError("the reader of the run's text stopped before the run ended, so the run was "
                                    "aborted (breaking out of text_iter/text_async_iter aborts the run)"))


def text_iter(state: ProgramState, var: str | None = None, return_meta_data: bool = False) -> Iterator[Any]:
    """See ``ProgramState.text_iter``."""
    _check_meta_request(var, return_meta_data)
    return _iterate(state, var, return_meta_data)


def _iterate(state: ProgramState, var: str | None, return_meta_data: bool) -> Iterator[Any]:
    shown, delta, ended = 0, _MetaDelta(), False
    try:
        while (chunk := next_chunk(state._executor, var, shown)) is not None:
            text, meta = chunk
            shown += len(text)
            yield (text, delta(meta)) if return_meta_data else text
        ended = True
    finally:
        if not ended and state._executor.error is None:
            _abort_left(state)


def text_async_iter(state: ProgramState, var: str | None = None, return_meta_data: bool = False) -> AsyncIterator[Any]:
    """See ``ProgramState.text_async_iter``."""
    _check_meta_request(var, return_meta_data)
    return _aiterate(state, var, return_meta_data)


async def _aiterate(state: ProgramState, var: str | None, return_meta_data: bool) -> AsyncIterator[Any]:
    shown, delta, ended = 0, _MetaDelta(), False
    try:
        while True:
            # off the event loop; wakes every 0.5 s so that a cancelled task is not held up
            chunk = await asyncio.to_thread(next_chunk, state._executor, var, shown, 0.5)
            if chunk is None:
                break
            text, meta = chunk
            if text:
                shown += len(text)
                yield (text, delta(meta)) if return_meta_data else text
        ended = True
    finally:
        if not ended and state._executor.error is None:
            _abort_left(state)
