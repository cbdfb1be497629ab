"""MockBackend: a deterministic Backend for tests, with scripted outputs, logprobs and choice scores.

It implements the whole protocol without a model. Outputs come from rules (a pattern searched in the
prompt -> the text to generate); the rule whose match ends latest in the prompt wins, so the most
recent question decides. Tokens are whitespace-delimited words (a word with its leading spaces), so
``max_new_tokens`` and token counts are predictable. Every call is recorded in ``calls``. With
``token_delay_s`` each token takes that long, and ``abort_program(pid)`` ends that program's calls in flight
with ``finish_reason={"type": "abort"}``, as a real backend's abort does. Constraints are checked like
``gen()`` checks them (``InvalidConstraintError``).

Per-call models (``per_call_models``): ``GenerateCall.model`` and the ``model=`` of ``score_choices`` /
``cache_prefix`` are recorded with the call; an output callable sees ``call.model``. Prefixes are cached
per model (``cached_tokens`` counts only text seen under the same model), as an engine keys its cache
per LoRA adapter.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from plait.lang.backends.base import (
    BackendCapabilityError,
    ChatTemplate,
    ChoiceScores,
    GenerateCall,
    GenerateResult,
)
from plait.lang.constraints import check_params

__all__ = ["MockBackend", "mock_tokens"]

Output = str | Callable[[GenerateCall], str]
ScoreSource = Mapping[str, Sequence[float]] | Callable[[str, str], Sequence[float]] | None


def mock_tokens(text: str) -> list[str]:
    """The mock's tokenization: each word with the whitespace before it; trailing whitespace alone."""
    return re.findall(r"\s*\S+|\s+", text)


def _token_id(token: str) -> int:
    return zlib.crc32(token.encode()) % 32000


def _token_logprob(context: str, token: str) -> float:
    return -0.05 * (zlib.crc32((context[-32:] + "|" + token).encode()) % 40 + 1)


class MockBackend:
    """A deterministic backend for tests (see the module docstring).

    ``rules``: ``{pattern: output}`` or ``[(pattern, output), ...]``; a pattern is a regex searched in
    the prompt, an output a str or ``f(call) -> str``. ``default``: the output when no rule matches.
    ``choice_logprobs`` / ``unconditional_logprobs``: per-token logprobs of a select choice
    (``{choice: [...]}`` or ``f(prefix, choice) -> [...]``); derived from a hash when not given.
    ``supports_select=False`` makes ``score_choices`` raise ``BackendCapabilityError``.
    ``enforce_constraints``: a finished output that violates the call's regex / JSON schema raises,
    so a test cannot pass on output a real constrained backend would never produce.
    ``models``: the model names a call may ask for (another raises ``ValueError`` naming them); None
    accepts any name. ``per_call_models=False`` makes it a one-model backend (a call naming a model
    raises ``BackendCapabilityError`` in the language).
    """

    def __init__(
        self,
        rules: Mapping[str, Output] | Sequence[tuple[str, Output]] = (),
        *,
        default: Output = "mock output",
        choice_logprobs: ScoreSource = None,
        unconditional_logprobs: ScoreSource = None,
        chat_template: ChatTemplate | str = "chatml",
        name: str = "mock",
        supports_select: bool = True,
        enforce_constraints: bool = True,
        token_delay_s: float = 0.0,
        models: Sequence[str] | None = None,
        per_call_models: bool = True,
    ) -> None:
        items = rules.items() if isinstance(rules, Mapping) else rules
        self.rules = [(re.compile(p), out) for p, out in items]
        self.default = default
        self.choice_logprobs = choice_logprobs
        self.unconditional_logprobs = unconditional_logprobs
        self._template = chat_template
        self.name = name
        self.supports_select = supports_select
        self.enforce_constraints = enforce_constraints
        self.token_delay_s = token_delay_s
        self.models = None if models is None else tuple(models)
        self.per_call_models = per_call_models
        self.calls: list[tuple[str, Any]] = []
        self.open_programs: set[str] = set()
        self.aborted_programs: set[str] = set()
        self._seen: set[tuple[str | None, str]] = set()  # (model, text) whose KV is "cached"
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def _record(self, kind: str, payload: Any) -> None:
        with self._lock:
            self.calls.append((kind, payload))

    def calls_of(self, kind: str) -> list[Any]:
        """The payloads of the recorded calls of one kind (``"generate"``, ``"score_choices"``...)."""
        with self._lock:
            return [p for k, p in self.calls if k == kind]

    def _check_model(self, model: str | None) -> None:
        if model is not None and self.models is not None and model not in self.models:
            raise ValueError(f"{self.name}: unknown model {model!r}; loaded: {list(self.models)}")

    def _cached_tokens(self, prompt: str, model: str | None = None) -> int:
        with self._lock:
            best = max((len(s) for m, s in self._seen if m == model and prompt.startswith(s)), default=0)
        return len(mock_tokens(prompt[:best]))

    def _remember(self, text: str, model: str | None = None) -> None:
        with self._lock:
            self._seen.add((model, text))

    def _output_for(self, call: GenerateCall) -> str:
        best: tuple[int, Output] | None = None
        for pattern, out in self.rules:
            ends = [m.end() for m in pattern.finditer(call.prompt)]
            if ends and (best is None or ends[-1] > best[0]):
                best = (ends[-1], out)
        out = best[1] if best is not None else self.default
        return out(call) if callable(out) else out

    def _complete(self, call: GenerateCall) -> tuple[list[str], dict[str, Any]]:
        """The output tokens after stop strings and max_new_tokens, and the finish reason."""
        check_params(call.params)
        self._check_model(call.model)
        text = self._output_for(call)
        params = call.params
        finish: dict[str, Any] = {"type": "stop", "matched": None}
        hits = [(text.find(s), text.find(s) + len(s), s) for s in params.stop if s in text]
        hits += [(m.start(), m.end(), p) for p in params.stop_regex if (m := re.search(p, text)) is not None]
        if hits:
            pos, end, stop = min(hits)
            text = text[:end] if params.no_stop_trim else text[:pos]
            finish = {"type": "stop", "matched": stop}
        tokens = mock_tokens(text)
        if len(tokens) > params.max_new_tokens:
            tokens = tokens[: params.max_new_tokens]
            finish = {"type": "length", "length": params.max_new_tokens}
        elif self.enforce_constraints:
            self._check_constraint(call, "".join(tokens))
        return tokens, finish

    def _check_constraint(self, call: GenerateCall, text: str) -> None:
        constraint = call.params.constraint
        if constraint is None:
            return
        kind, spec = constraint
        ok = True
        if kind == "regex":
            ok = re.fullmatch(spec, text) is not None
        elif kind == "json_schema":
            try:
                json.loads(text)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"mock output {text!r} violates the call's {kind} {spec!r}; script an output that matches")

    def _result(self, call: GenerateCall, tokens: list[str], finish: dict[str, Any] | None, start: float) -> GenerateResult:
        text = "".join(tokens)
        logprobs = top = None
        if call.return_logprob:
            logprobs, context = [], call.prompt
            for tok in tokens:
                logprobs.append((_token_logprob(context, tok), _token_id(tok), tok))
                context += tok
            if call.top_logprobs_num:
                top = [
                    [entry] + [(entry[0] - 1.0 - k, _token_id(f"{entry[2]}~{k}"), f"{entry[2]}~{k}") for k in range(call.top_logprobs_num - 1)]
                    for entry in logprobs
                ]
        return GenerateResult(
            text=text,
            finished=finish is not None,
            finish_reason=finish,
            prompt_tokens=len(mock_tokens(call.prompt)),
            completion_tokens=len(tokens),
            cached_tokens=self._cached_tokens(call.prompt, call.model),
            latency_s=time.monotonic() - start,
            output_token_logprobs=logprobs,
            output_top_logprobs=top,
            meta={"backend": self.name},
        )

    # ------------------------------------------------------------------ protocol
    def _aborted(self, call: GenerateCall) -> bool:
        with self._lock:
            return call.program_id is not None and call.program_id in self.aborted_programs

    def generate(self, call: GenerateCall) -> GenerateResult:
        start = time.monotonic()
        self._record("generate", call)
        tokens, finish = self._complete(call)
        for i in range(len(tokens) if self.token_delay_s else 0):
            time.sleep(self.token_delay_s)
            if self._aborted(call):
                return self._result(call, tokens[: i + 1], {"type": "abort", "message": "aborted"}, start)
        result = self._result(call, tokens, finish, start)
        self._remember(call.prompt + result.text, call.model)
        return result

    def stream(self, call: GenerateCall) -> Iterator[GenerateResult]:
        start = time.monotonic()
        self._record("stream", call)
        tokens, finish = self._complete(call)
        for i in range(1, len(tokens)):
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            if self._aborted(call):
                yield self._result(call, tokens[:i], {"type": "abort", "message": "aborted"}, start)
                return
            yield self._result(call, tokens[:i], None, start)
        result = self._result(call, tokens, finish, start)
        self._remember(call.prompt + result.text, call.model)
        yield result

    def _scores(self, source: ScoreSource, prefix: str, choice: str) -> list[float]:
        if callable(source):
            return [float(x) for x in source(prefix, choice)]
        if source is not None and choice in source:
            return [float(x) for x in source[choice]]
        context, out = prefix, []
        for tok in mock_tokens(choice):
            out.append(_token_logprob(context, tok))
            context += tok
        return out

    def score_choices(
        self, prefix: str, choices: Sequence[str], *, unconditional: bool = False, program_id: str | None = None,
        model: str | None = None,
    ) -> list[ChoiceScores]:
        self._record("score_choices", {"prefix": prefix, "choices": list(choices), "unconditional": unconditional,
                                       "program_id": program_id, "model": model})
        if not self.supports_select:
            raise BackendCapabilityError(
                f"backend {self.name!r} cannot score choices (configured with supports_select=False); "
                "use gen(regex=...) or a backend that reports prompt logprobs"
            )
        self._check_model(model)
        cached = self._cached_tokens(prefix, model)
        self._remember(prefix, model)
        out = []
        for choice in choices:
            lps = self._scores(self.choice_logprobs, prefix, choice)
            uncond = None
            if unconditional:
                uncond = self._scores(self.unconditional_logprobs, "", choice)
                if self.unconditional_logprobs is None and uncond:
                    uncond[0] = math.nan  # no context for the first token, as real backends report
            out.append(
                ChoiceScores(
                    choice=choice,
                    token_logprobs=lps,
                    token_ids=[_token_id(f"{choice}:{i}") for i in range(len(lps))],
                    unconditional_token_logprobs=uncond,
                    prompt_tokens=len(mock_tokens(prefix + choice)),
                    cached_tokens=cached,
                )
            )
        return out

    def chat_template(self) -> ChatTemplate:
        from plait.lang.chat_template import resolve_chat_template

        return resolve_chat_template(self._template)

    def cache_prefix(self, prefix: str, program_id: str | None = None, model: str | None = None) -> None:
        """Record ``(prefix, program_id, model)`` and count ``prefix`` as cached under ``model``."""
        self._record("cache_prefix", (prefix, program_id, model))
        self._check_model(model)
        self._remember(prefix, model)

    def begin_program(self, program_id: str) -> None:
        self._record("begin_program", program_id)
        with self._lock:
            self.open_programs.add(program_id)

    def end_program(self, program_id: str) -> None:
        self._record("end_program", program_id)
        with self._lock:
            self.open_programs.discard(program_id)

    def abort_program(self, program_id: str) -> None:
        """End the calls of ``program_id`` in flight (at their next token) with an abort finish reason."""
        self._record("abort_program", program_id)
        with self._lock:
            self.aborted_programs.add(program_id)


