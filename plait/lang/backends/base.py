"""The Backend protocol: everything the language asks of a model provider.

A backend turns text into text. The interpreter (``plait.lang.interpreter``) renders the program's
state into one prompt string (roles already applied through the backend's chat template) and asks
the backend to continue it (``generate`` / ``stream``), to score a set of continuations (``select``),
or to warm its prefix cache (``cache_prefix``). Backends: ``runtime.Runtime`` (the engine in this
process), ``endpoint.Endpoint`` (HTTP, SGLang-native protocol), ``openai.OpenAI`` (any
OpenAI-compatible API), and a mock for tests.

Every call may carry ``program_id``: the id of the program run it belongs to. Between
``begin_program(pid)`` and ``end_program(pid)`` a backend that supports it keeps that run's prefix
resident in its KV cache (program-aware caching); others ignore it.

Optional, outside the protocol class (so backends written before it still are backends):
``abort_program(program_id)`` aborts that run's calls in flight; a blocking ``generate`` then returns
(its finish reason ``{"type": "abort"}``) at once. The language calls it when a run is aborted
(``state.abort()``, a reader leaving ``text_iter``, ``timeout=``); Runtime, Endpoint and MockBackend have it.
A request constraint the backend's compiler refuses raises ``InvalidConstraintError``.
``per_call_models = True`` says the backend serves per-call models (LoRA adapters, or several models
behind one API; see ``plait.lang.models``): ``GenerateCall.model`` names the call's model, and
``score_choices`` / ``cache_prefix`` take ``model=`` (passed only when it is not None, so backends
without it keep working for programs that name no model). An unknown name raises ``ValueError``
naming the known ones. KV of one model is never reused for another.

This module imports neither torch nor anything under ``plait.runtime``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from plait.lang.errors import BackendCapabilityError
from plait.sampling import SamplingParams

__all__ = [
    "Backend",
    "BackendCapabilityError",
    "ChatTemplate",
    "ChoiceScores",
    "GenerateCall",
    "GenerateResult",
    "LogprobEntry",
    "ToolRequest",
]


# (logprob, token_id, token_text) — the entry shape of SGLang's meta_info logprob lists.
LogprobEntry = tuple[float, int, "str | None"]


@dataclass(frozen=True)
class ChatTemplate:
    """How role blocks are rendered into prompt text.

    ``role_prefix_and_suffix[role] == (prefix, suffix)``: a ``system``/``user``/``assistant`` block
    renders as ``prefix + content + suffix``. ``default_system_prompt`` is inserted when a program's
    first message is not a system message and it is not None. ``stop_str`` are strings that end an
    assistant turn (added to ``stop`` of a ``gen`` inside an assistant block). ``tools``: how the
    template shows tool declarations, calls and results (a ``plait.lang.tool_format.ToolRendering``,
    e.g. the model's own template's); None: plait's plain format.
    """

    name: str
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    default_system_prompt: str | None = None
    stop_str: tuple[str, ...] = ()
    tools: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ToolRequest:
    """The tools a generation may call (a ``call_tools`` turn).

    ``tools``: OpenAI-format declarations (``{"type": "function", "function": {...}}``); ``choice``:
    ``"auto"``, ``"required"``, ``"none"`` or a tool's name; ``parallel``: several calls per turn.
    Backends that generate text need nothing from it (the turn's grammar is in ``params.ebnf`` and the
    declaration in the prompt); a backend with a tools API of its own (OpenAI) sends it there and
    reports the calls in ``GenerateResult.tool_calls``.
    """

    tools: tuple[dict[str, Any], ...]
    choice: str = "auto"
    parallel: bool = True


@dataclass(frozen=True)
class GenerateCall:
    """One continuation request: the full prompt text so far and how to sample.

    ``params`` carries the constraint (``regex`` / ``json_schema`` / ``ebnf``) when there is one.
    ``model``: the model that serves the call (a LoRA adapter's name...; sent only to backends with
    ``per_call_models``); None: the backend's default model.
    """

    prompt: str
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    program_id: str | None = None
    tools: ToolRequest | None = None
    model: str | None = None


@dataclass
class GenerateResult:
    """The outcome (or, while streaming, a cumulative snapshot) of one ``GenerateCall``.

    ``finish_reason`` is SGLang's shape: ``{"type": "stop" | "length" | "abort", ...}``, or None while
    the generation is still running. ``meta`` keeps whatever else the backend reported.
    ``tool_calls``: calls reported by a backend with a tools API (``[{"id", "name", "arguments"}]``,
    arguments as JSON text); None when the calls, if any, are in ``text``.
    """

    text: str
    finished: bool = True
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    output_token_logprobs: list[LogprobEntry] | None = None
    output_top_logprobs: list[list[LogprobEntry] | None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class ChoiceScores:
    """Token logprobs of one ``select`` choice, for the scoring methods in ``plait.lang.choices``.

    ``token_logprobs[i]``: logprob of the choice's i-th token given the prefix and the choice's
    earlier tokens. ``top_token_ids[i]``: the model's most likely token at that position (for the
    greedy-token method), or None when the backend did not report it. ``unconditional_token_logprobs``:
    the same tokens scored without the prefix (for the unconditional-likelihood method), or None when
    not asked for.
    """

    choice: str
    token_logprobs: list[float]
    top_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    unconditional_token_logprobs: list[float] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


@runtime_checkable
class Backend(Protocol):
    """What a model provider implements for the language. All methods are thread-safe."""

    #: short name used in messages ("runtime", "endpoint http://...", "openai gpt-4o-mini")
    name: str

    def generate(self, call: GenerateCall) -> GenerateResult:
        """Continue ``call.prompt``; blocks until finished."""
        ...

    def stream(self, call: GenerateCall) -> Iterator[GenerateResult]:
        """Continue ``call.prompt``, yielding cumulative snapshots; the last one has ``finished=True``.

        Closing the iterator early aborts the generation on the backend.
        """
        ...

    def score_choices(
        self,
        prefix: str,
        choices: Sequence[str],
        *,
        unconditional: bool = False,
        program_id: str | None = None,
    ) -> list[ChoiceScores]:
        """Score each ``prefix + choice`` continuation (one ``ChoiceScores`` per choice, same order).

        Raises ``BackendCapabilityError`` when the backend cannot report prompt logprobs.
        """
        ...

    def chat_template(self) -> ChatTemplate:
        """The template used to render role blocks for this backend's model."""
        ...

    def cache_prefix(self, prefix: str, program_id: str | None = None) -> None:
        """Compute and cache the KV of ``prefix`` ahead of calls that extend it (no-op where unsupported)."""
        ...

    def begin_program(self, program_id: str) -> None:
        """A program run starts: keep its prefixes resident until ``end_program`` (where supported)."""
        ...

    def end_program(self, program_id: str) -> None:
        """The program run ended: its prefixes may be evicted again."""
        ...
