"""Runtime: the language's in-process backend, a ``plait.Engine`` running in this process.

``Runtime(model=..., **engine_config)`` loads the model and owns the engine; ``Runtime(engine=eng)``
wraps an engine the caller owns (``shutdown`` then leaves it running). Every call may carry the
program run's id, which the engine uses to keep that run's prefixes resident until ``end_program``
(program-aware caching, ``plait/runtime/kvcache/pins.py``).

``score_choices`` follows SGLang's ``RuntimeEndpoint.select``: the prefix is cached first, then every
``prefix + choice`` is scored in one batched request with ``max_new_tokens=0`` and prompt logprobs
from where the choice starts. The prefix and each ``prefix + choice`` are tokenized on their own and
the choice starts after their common token prefix, so a token that merges across the boundary (a
prefix ending in a space, a choice starting with a letter) is scored as part of the choice.

Every generation carries a request id, so ``abort_program(program_id)`` can abort a run's calls in flight
(``state.abort()``, a reader leaving ``text_iter``, ``timeout=``). A constraint the engine's grammar
compiler refuses raises ``InvalidConstraintError``, as ``gen()`` does for what it can check itself.

Per-call models are LoRA adapters: ``Runtime(lora_paths={"judge": path})`` (or SGLang's
``["judge=path", ...]``) loads them into the engine, and a call with ``model="judge"`` is sent with
``lora_path="judge"`` (a select's batched scoring and a cached prefix too, so they are scored and
cached under the adapter; the engine keys its prefix cache per adapter). An unknown name raises the
engine's ``ValueError`` naming the loaded adapters.

This module imports the runtime (torch) only when a ``Runtime`` is created.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from plait.lang.backends.base import (
    BackendCapabilityError,
    ChatTemplate,
    ChoiceScores,
    GenerateCall,
    GenerateResult,
)
from plait.lang.errors import InvalidConstraintError
from plait.token_ids import common_prefix_len

if TYPE_CHECKING:
    from plait.runtime.engine import Engine

__all__ = ["Runtime"]

logger = logging.getLogger(__name__)

# Engine result keys that GenerateResult has fields for; the rest of meta_info goes to ``meta``.
_MAPPED_META = (
    "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason", "e2e_latency",
    "output_token_logprobs", "output_top_logprobs",
)


def _entries(raw: list | None) -> list | None:
    return None if raw is None else [tuple(e) for e in raw]


def _to_result(out: dict[str, Any]) -> GenerateResult:
    """One engine output dict (final or a streamed snapshot) -> GenerateResult."""
    meta = out["meta_info"]
    top = meta.get("output_top_logprobs")
    return GenerateResult(
        text=out["text"],
        finished=meta["finish_reason"] is not None,
        finish_reason=meta["finish_reason"],
        prompt_tokens=meta["prompt_tokens"],
        completion_tokens=meta["completion_tokens"],
        cached_tokens=meta["cached_tokens"],
        latency_s=meta.get("e2e_latency", 0.0),
        output_token_logprobs=_entries(meta.get("output_token_logprobs")),
        output_top_logprobs=None if top is None else [_entries(t) for t in top],
        meta={"output_ids": out["output_ids"], **{k: v for k, v in meta.items() if k not in _MAPPED_META}},
    )


@contextmanager
def _constraint_errors(backend_name: str) -> Iterator[None]:
    """The engine's ``ConstraintError`` (a constraint its compiler refuses) as ``InvalidConstraintError``."""
    from plait.runtime.constrained.spec import ConstraintError

    try:
        yield
    except ConstraintError as exc:
        raise InvalidConstraintError(f"{backend_name}: {exc}") from None


class Runtime:
    """The in-process backend: a ``plait.Engine`` serving the language's calls. Thread-safe.

    ``model`` and ``engine_config`` are ``plait.Engine``'s arguments (``EngineConfig`` settings).
    ``chat_template`` names a template of ``plait.lang.chat_template`` to use instead of the one derived
    from the model's tokenizer. ``lora_paths``: LoRA adapters to load (``{"name": path}`` or
    ``["name=path", ...]``), served to calls that name them (``pl.gen(..., model="name")``).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        *,
        engine: Engine | None = None,
        chat_template: str | None = None,
        lora_paths: dict[str, str] | Sequence[str] | None = None,
        **engine_config: Any,
    ) -> None:
        if lora_paths is not None:
            engine_config["lora_paths"] = lora_paths
        if engine is not None and engine_config:
            raise TypeError(
                f"Runtime(engine=...) wraps an existing engine; engine settings {sorted(engine_config)} "
                "cannot be applied to it (pass them to plait.Engine instead)"
            )
        if engine is None:
            from plait.runtime.engine import Engine

            engine = Engine(model=model, **engine_config)
            self._owns_engine = True
        else:
            self._owns_engine = False
        self.engine = engine
        self.model = engine.config.model
        self.name = f"runtime {self.model}"
        self._chat_template_name = chat_template
        self._chat_template: ChatTemplate | None = None
        self._lock = threading.Lock()
        self._in_flight: dict[str, set[str]] = {}  # program id -> request ids of its generations in flight
        self._aborted: set[str] = set()  # programs aborted and not ended yet: new calls end at once

    # ------------------------------------------------------------------ per-call models (LoRA adapters)
    @property
    def per_call_models(self) -> bool:
        """Whether calls can name a LoRA adapter (the engine takes ``lora_path``)."""
        try:
            return "lora_path" in inspect.signature(self.engine.generate).parameters
        except (TypeError, ValueError):  # a callable without a signature
            return False

    @staticmethod
    def _lora(model: str | None, batch: int | None = None) -> dict[str, Any]:
        """The engine's ``lora_path`` argument for ``model`` (nothing for the base model); a list for a batch."""
        if model is None:
            return {}
        return {"lora_path": model if batch is None else [model] * batch}

    # ------------------------------------------------------------------ generation
    def generate(self, call: GenerateCall) -> GenerateResult:
        """Continue ``call.prompt``; blocks until finished."""
        kwargs = self._engine_kwargs(call)
        with self._request(call) as rid, _constraint_errors(self.name):
            if rid is None:
                return GenerateResult("", finish_reason={"type": "abort", "message": "the program was aborted"})
            return _to_result(self.engine.generate(call.prompt, call.params, rid=rid, **kwargs))

    def stream(self, call: GenerateCall) -> Iterator[GenerateResult]:
        """Cumulative snapshots of ``call``; closing the iterator early aborts the request."""
        return self._stream(call, self._engine_kwargs(call))  # bad arguments raise here, not at next()

    def _stream(self, call: GenerateCall, kwargs: dict[str, Any]) -> Iterator[GenerateResult]:
        with self._request(call) as rid, _constraint_errors(self.name):
            if rid is None:
                yield GenerateResult("", finish_reason={"type": "abort", "message": "the program was aborted"})
                return
            chunks = self.engine.generate(call.prompt, call.params, stream=True, rid=rid, **kwargs)
            try:
                for out in chunks:
                    yield _to_result(out)
            finally:  # closing the engine's stream aborts the request if it is still running
                chunks.close()

    @contextmanager
    def _request(self, call: GenerateCall) -> Iterator[str | None]:
        """A request id for ``call``, known to ``abort_program`` while the call runs; None if its program
        was aborted already."""
        rid, pid = self.engine.new_rid(), call.program_id
        with self._lock:
            if pid is not None and pid in self._aborted:
                rid = None
            elif pid is not None:
                self._in_flight.setdefault(pid, set()).add(rid)
        try:
            yield rid
        finally:
            if pid is not None and rid is not None:
                with self._lock:
                    rids = self._in_flight.get(pid)
                    if rids is not None:
                        rids.discard(rid)
                        if not rids:
                            del self._in_flight[pid]

    def abort_program(self, program_id: str) -> None:
        """Abort the generations of ``program_id`` in flight (they finish with ``{"type": "abort"}``) and end
        any it starts until ``end_program``."""
        with self._lock:
            self._aborted.add(program_id)
            rids = list(self._in_flight.get(program_id, ()))
        for rid in rids:
            self.engine.abort(rid)

    def _engine_kwargs(self, call: GenerateCall) -> dict[str, Any]:
        if call.params.n != 1:
            raise ValueError(
                f"a GenerateCall continues one prompt once; got n={call.params.n} "
                "(use fork(n) in the program for several samples)"
            )
        return {
            "return_logprob": call.return_logprob,
            "top_logprobs_num": call.top_logprobs_num,
            "return_text_in_logprobs": True,
            "program_id": call.program_id,
            **self._lora(call.model),
        }

    # ------------------------------------------------------------------ select
    def score_choices(
        self,
        prefix: str,
        choices: Sequence[str],
        *,
        unconditional: bool = False,
        program_id: str | None = None,
        model: str | None = None,
    ) -> list[ChoiceScores]:
        """Logprobs of each choice's tokens after ``prefix`` (one batched, cached engine request), under
        LoRA adapter ``model`` (None: the base model)."""
        if isinstance(choices, str) or not choices:
            raise ValueError("select needs a non-empty list of choice strings")
        bad = [c for c in choices if not isinstance(c, str) or not c]
        if bad:
            raise ValueError(f"every choice must be a non-empty str, got {bad[0]!r}")
        tok = self.engine.tokenizer
        if tok is None:
            raise BackendCapabilityError(
                f"{self.name}: select needs a tokenizer, and this model has none (set tokenizer_path)"
            )
        prefix_ids = tok.encode(prefix)
        full = [tok.encode(prefix + c) for c in choices]
        # the choice starts where prefix+choice stops agreeing with the prefix alone; at least one token
        starts = [min(common_prefix_len(prefix_ids, ids), len(ids) - 1) for ids in full]
        if min(starts) == 0:  # no token precedes the choice: score it after the start-of-text token
            if tok.bos_token_id is None:
                raise ValueError(
                    "select after an empty prefix needs a start-of-text token, and this tokenizer has none; "
                    "put some text before the select"
                )
            prefix_ids = [tok.bos_token_id, *prefix_ids]
            full = [[tok.bos_token_id, *ids] for ids in full]
            starts = [s + 1 for s in starts]
        if prefix_ids:
            self._cache_ids(prefix_ids, program_id, model)
        first = min(starts)
        outs = self.engine.generate(
            input_ids=full,
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=first,
            top_logprobs_num=1,
            program_id=program_id,
            **self._lora(model, len(full)),
        )
        scores = []
        for choice, ids, start, out in zip(choices, full, starts, outs):
            meta = out["meta_info"]
            offset = start - first  # the entries cover tokens [first, len(ids))
            logprobs = meta["input_token_logprobs"][offset:]
            tops = meta["input_top_logprobs"][offset:]
            scores.append(ChoiceScores(
                choice=choice,
                token_logprobs=[float(lp) for lp, _, _ in logprobs],
                top_token_ids=[top[0][1] for top in tops],
                token_ids=list(ids[start:]),
                prompt_tokens=meta["prompt_tokens"],
                cached_tokens=meta["cached_tokens"],
            ))
        if unconditional:
            self._score_unconditional(scores, program_id, model)
        return scores

    def _score_unconditional(self, scores: list[ChoiceScores], program_id: str | None, model: str | None) -> None:
        """Each choice's tokens scored with no prefix at all, as SGLang does: the first token has no
        context, so its unconditional logprob is reported as 0.0 (SGLang's convention)."""
        outs = self.engine.generate(
            input_ids=[s.token_ids for s in scores],
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=0,
            program_id=program_id,
            **self._lora(model, len(scores)),
        )
        for score, out in zip(scores, outs):
            entries = out["meta_info"]["input_token_logprobs"]
            score.unconditional_token_logprobs = [0.0 if lp is None else float(lp) for lp, _, _ in entries]

    # ------------------------------------------------------------------ cache and program runs
    def cache_prefix(self, prefix: str, program_id: str | None = None, model: str | None = None) -> None:
        """Prefill ``prefix`` into the radix cache (a ``max_new_tokens=0`` request), under LoRA adapter
        ``model`` (None: the base model).

        The prefix's last token is left out: the text that follows it in a real prompt may merge with
        it into another token (a prefix ending in "Q: " is followed by "A..." -> " A"), and a cached
        token that no prompt contains is wasted work and one token fewer of every match."""
        if not prefix:
            return
        if self.engine.tokenizer is None:
            self.engine.generate(prefix, {"max_new_tokens": 0}, program_id=program_id, **self._lora(model))
            return
        ids = self.engine.tokenizer.encode(prefix)
        if len(ids) > 1:
            self._cache_ids(ids[:-1], program_id, model)

    def _cache_ids(self, ids: list[int], program_id: str | None, model: str | None = None) -> None:
        self.engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, program_id=program_id,
                             **self._lora(model))

    def begin_program(self, program_id: str) -> None:
        """Keep what this run caches resident until ``end_program`` (bounded; yields under pressure)."""
        self.engine.begin_program(program_id)

    def end_program(self, program_id: str) -> None:
        """Release the run's pinned prefixes."""
        with self._lock:
            self._aborted.discard(program_id)
        self.engine.end_program(program_id)

    # ------------------------------------------------------------------ chat template
    def chat_template(self) -> ChatTemplate:
        """The model's own chat template (derived from its tokenizer), or the one named at construction."""
        with self._lock:
            if self._chat_template is None:
                self._chat_template = self._load_chat_template()
            return self._chat_template

    def _load_chat_template(self) -> ChatTemplate:
        from plait.lang import chat_template as templates

        if self._chat_template_name is not None:
            return templates.get_chat_template(self._chat_template_name)
        tok = self.engine.tokenizer
        if tok is None or tok.chat_template is None:
            logger.info("%s: the tokenizer has no chat template; using the 'default' template", self.name)
            return templates.get_chat_template("default")

        def render(messages: list[dict[str, str]]) -> str:
            return tok.apply_chat_template(messages, add_generation_prompt=False)

        def render_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
            # Llama 3.1 shows tools in the first user turn unless told otherwise; plait declares them
            # in the system block (other templates ignore the variable)
            return tok.apply_chat_template(messages, add_generation_prompt=False, tools=tools,
                                           tools_in_user_message=False)

        try:
            template = templates.template_from_renderer(self.model, render)
        except ValueError as exc:  # the model's template cannot be split into role prefixes/suffixes
            logger.warning("%s: cannot derive role blocks from the model's chat template (%s); "
                           "using the 'default' template (pass chat_template= to choose one)", self.name, exc)
            return templates.get_chat_template("default")
        from plait.lang.tool_format import with_native_tools

        return with_native_tools(template, render_tools)

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Shut the engine down if this Runtime created it (a wrapped engine is left running)."""
        if self._owns_engine:
            self.engine.shutdown()

    def __enter__(self) -> Runtime:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Runtime(model={self.model!r})"
