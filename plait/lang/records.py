"""The records of a program run: the shared run context, text segments and backend call records."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plait.lang.backends.base import Backend, ChatTemplate

if TYPE_CHECKING:
    from plait.lang.interpreter import Executor

__all__ = ["CallRecord", "RunContext", "Segment"]


@dataclass
class Segment:
    """A piece of the prompt text and where it came from (for messages and the HTML view).

    ``kind``: ``"text"`` (appended by the program), ``"gen"``/``"select"`` (produced by the model),
    ``"role_prefix"``/``"role_suffix"`` (rendered by the chat template). ``role`` is the open role.
    """

    kind: str
    text: str
    role: str | None = None
    name: str | None = None


@dataclass
class CallRecord:
    """One backend call of a run: what it cost (from ``GenerateResult`` / ``ChoiceScores``)."""

    kind: str
    name: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: dict[str, Any] | None = None
    branch: int | None = None  # the fork branch that made the call (set when the branch is joined)


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
    executors: list[Executor] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    name_reuse: str = "error"
    abort_error: BaseException | None = None
    ended: bool = False
    deadline: threading.Timer | None = None
