"""The records of a program run: the shared run context, text segments and backend call records."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plait.lang.backends.base import Backend, ChatTemplate, LogprobEntry

if TYPE_CHECKING:
    from plait.lang.interpreter import Executor

__all__ = ["CallRecord", "RunContext", "Segment"]


@dataclass
class Segment:
    """A piece of the prompt text and where it came from (for messages and the HTML view).

    ``kind``: ``"text"`` (appended by the program), ``"gen"``/``"select"`` (produced by the model),
    ``"role_prefix"``/``"role_suffix"`` (rendered by the chat template), ``"tool"`` (a tool result's
    content, in a block whose role is ``"tool"``). ``role`` is the open role.
    ``call``: for model text, the record of the backend call that produced it (set once the call has
    finished; the HTML view reads its token logprobs and choice scores from it).
    """

    kind: str
    text: str
    role: str | None = None
    name: str | None = None
    call: CallRecord | None = None


@dataclass
class CallRecord:
    """One backend call of a run: what it cost (from ``GenerateResult`` / ``ChoiceScores``).

    A ``gen`` made with logprobs (``gen(..., return_logprob=True)`` or ``run(..., return_logprob=True)``)
    keeps them: ``output_token_logprobs`` has one ``(logprob, token_id, token_text)`` entry per output
    token, ``output_top_logprobs`` the alternatives when ``top_logprobs_num`` was set. A ``select``
    keeps ``choices``, ``choice_scores`` (the normalized logprob its method compared: the mean token
    logprob, or the mean conditional minus unconditional logprob), ``chosen`` (the index picked) and
    ``choices_method``. ``model``: the model that served the call (a LoRA adapter's name...), None for
    the backend's default model.
    """

    kind: str
    name: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: dict[str, Any] | None = None
    branch: int | None = None  # the fork branch that made the call (set when the branch is joined)
    output_token_logprobs: list[LogprobEntry] | None = None
    output_top_logprobs: list[list[LogprobEntry] | None] | None = None
    choices: list[str] | None = None
    choice_scores: list[float] | None = None
    chosen: int | None = None
    choices_method: str | None = None
    model: str | None = None


@dataclass
class RunContext:
    """What every executor of one program run shares.

    ``name_reuse``: ``"error"`` (a second gen/select/var_scope of a name raises) or ``"overwrite"``.
    ``abort_error``: set once when the run is aborted (``plait.lang.lifecycle.abort_run``); ``ended``: the
    run is over (every call returned, ``end_program`` sent); ``deadline``: the timer of ``timeout=``.
    """

    backend: Backend | None
    template: ChatTemplate
    program_id: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    symbolic: bool = False
    threaded: bool = True
    return_logprob: bool = False  # every gen asks for output token logprobs (kept in its CallRecord)
    top_logprobs_num: int = 0  # and this many alternatives per token (a gen's own setting wins)
    executors: list[Executor] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    name_reuse: str = "error"
    abort_error: BaseException | None = None
    ended: bool = False
    # the program function has returned and its error, if any, is on the root executor: until then a
    # root that has finished executing is not the end of the run (an error may still be recorded)
    outcome_known: bool = False
    deadline: threading.Timer | None = None


def segments_from(segments: list[Segment], start: int) -> list[Segment]:
    """The segments at text positions >= ``start`` (segments never straddle a fork point)."""
    pos, out = 0, []
    for seg in segments:
        if pos >= start:
            out.append(seg)
        pos += len(seg.text)
    return out
