"""OpenAI: a backend for any OpenAI-compatible API, through the official ``openai`` package.

Two endpoints, picked per call (``api="auto"``) or fixed (``api="chat"`` / ``api="completions"``):

- chat completions when the program uses roles. The language renders roles through this backend's
  chat template, a reversible ChatML markup (``openai_chat.CHAT_MARKUP``); the backend parses the
  prompt back into messages (``GenerateCall`` carries one prompt string, not messages). As with
  SGLang's OpenAI backend, a ``gen`` must come first in an assistant block.
- completions for a plain prompt, and for ``select``: each ``prefix + choice`` is scored with
  ``echo=True, logprobs=1, max_tokens=0`` (prompt logprobs). Chat-only APIs have no prompt
  logprobs: ``select`` then raises ``BackendCapabilityError``.

Sampling options outside the OpenAI API (``top_k``, ``min_p``, ``repetition_penalty``,
``min_new_tokens``, ``stop_token_ids``, ``ignore_eos``, ``stop_regex``) and the ``regex`` / ``ebnf`` constraints are
sent in ``extra_body`` when ``extra_sampling=True`` (servers that take SGLang's request fields:
SGLang, ``plait serve``); otherwise they raise ``BackendCapabilityError``, never silently dropped.
``json_schema`` goes through ``response_format`` on chat completions. The KV-cache hooks
(``cache_prefix``, ``begin_program``, ``end_program``) are no-ops: the server manages its cache.

Logprob entries carry token id -1: the OpenAI API reports token text, not ids. A 400 about the request's
constraint (``regex``, ``json_schema``...) is raised as ``InvalidConstraintError``, as on other backends.
The API cannot abort a request: a blocking call of an aborted run ends on its own; a stream is closed.

Per-call models: a call with ``model="name"`` is sent with the request's ``model`` set to that name
(an adapter served under its name, as plait serve and SGLang do, or any other model of the API); calls
that name none use the backend's ``model``.

Tool-calling turns (``call_tools``; ``GenerateCall.tools``) use the chat API's ``tools``,
``tool_choice`` and ``parallel_tool_calls``; the calls come back in ``GenerateResult.tool_calls``
and, in the chat markup, in the turn's text (``openai_chat.render_api_calls``), from which later
requests send them again as assistant ``tool_calls`` with their ``role: "tool"`` results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from plait.lang.backends.base import (
    BackendCapabilityError,
    ChatTemplate,
    ChoiceScores,
    GenerateCall,
    GenerateResult,
    LogprobEntry,
    ToolRequest,
)
from plait.lang.backends.openai_chat import (
    CHAT_MARKUP,
    chat_messages_for_generation,
    has_chat_markup,
    render_api_calls,
)
from plait.lang.constraints import constraint_refusal
from plait.sampling import SamplingParams

__all__ = ["OpenAI"]

UNKNOWN_TOKEN_ID = -1
COMPLETION_ONLY_MODELS = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002")
# sampling fields outside the OpenAI API -> (name in SGLang's/vLLM's extra request fields, default)
_EXTRA_SAMPLING = {
    "top_k": ("top_k", -1),
    "min_p": ("min_p", 0.0),
    "repetition_penalty": ("repetition_penalty", 1.0),
    "min_new_tokens": ("min_tokens", 0),
    "stop_token_ids": ("stop_token_ids", ()),
    "ignore_eos": ("ignore_eos", False),
    "no_stop_trim": ("no_stop_trim", False),
    "skip_special_tokens": ("skip_special_tokens", True),
    "stop_regex": ("stop_regex", ()),
}


def _finish_reason(reason: str | None, completion_tokens: int) -> dict[str, Any] | None:
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    if reason == "content_filter":
        return {"type": "abort", "message": "stopped by the API's content filter"}
    return {"type": "stop", "matched": None}


def _tool_kwargs(tools: ToolRequest) -> dict[str, Any]:
    """The chat API's tool fields for a tool-calling turn."""
    choice: Any = tools.choice
    if choice not in ("auto", "required", "none"):
        choice = {"type": "function", "function": {"name": choice}}
    kwargs: dict[str, Any] = {"tools": [dict(t) for t in tools.tools], "tool_choice": choice}
    if tools.choice != "none":
        kwargs["parallel_tool_calls"] = tools.parallel
    return kwargs


def _cached_tokens(usage: Any) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", 0) or 0)


class OpenAI:
    """A backend for an OpenAI-compatible API. Thread-safe (one ``openai.OpenAI`` client).

    ``base_url`` / ``api_key`` / ``client_kwargs`` go to ``openai.OpenAI`` (``http_client=...`` for a
    custom transport); ``client`` passes a ready client instead. ``api``: "auto" (chat completions for
    prompts with roles, completions otherwise), "chat" or "completions" (the default for the
    completion-only OpenAI models). ``chat_template`` names a template of ``plait.lang.chat_template``
    to render roles as plain text for a completions model.
    """

    #: a call may name another model of the API (sent as the request's ``model``)
    per_call_models = True

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api: Literal["auto", "chat", "completions"] | None = None,
        chat_template: str | None = None,
        extra_sampling: bool = False,
        client: Any = None,
        **client_kwargs: Any,
    ) -> None:
        if api is None:
            api = "completions" if model in COMPLETION_ONLY_MODELS else "auto"
        if api not in ("auto", "chat", "completions"):
            raise ValueError(f"api must be 'auto', 'chat' or 'completions', got {api!r}")
        if chat_template is not None and api != "completions":
            raise ValueError("chat_template= renders roles as text for a completions model: pass api='completions'")
        if client is None:
            try:
                import openai
            except ImportError as exc:
                raise ImportError("the OpenAI backend needs the openai package: pip install 'plait[openai]'") from exc
            client = openai.OpenAI(base_url=base_url, api_key=api_key, **client_kwargs)
        self.client = client
        self.model = model
        self.api = api
        self.extra_sampling = extra_sampling
        self.name = f"openai {model}"
        self._chat_template_name = chat_template

    # ------------------------------------------------------------------ request building
    def _use_chat(self, prompt: str) -> bool:
        if self.api == "chat":
            if not has_chat_markup(prompt):
                raise BackendCapabilityError(
                    f"{self.name} uses the chat completions API, which needs role blocks: wrap the prompt in "
                    "system/user/assistant, or pass api='completions' for a completions model"
                )
            return True
        return self.api == "auto" and has_chat_markup(prompt)

    def _sampling_kwargs(self, params: SamplingParams, chat: bool) -> dict[str, Any]:
        if params.n != 1:
            raise ValueError(f"a GenerateCall continues one prompt once; got n={params.n} (use fork(n))")
        stop = [s for s in params.stop if not (chat and s in CHAT_MARKUP.stop_str)]  # the API ends the turn
        kwargs: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                                  "top_p": params.top_p}
        if stop:
            kwargs["stop"] = stop
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.frequency_penalty:
            kwargs["frequency_penalty"] = params.frequency_penalty
        if params.presence_penalty:
            kwargs["presence_penalty"] = params.presence_penalty
        if params.logit_bias:  # the OpenAI API's own field (token-id strings -> bias)
            kwargs["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        extra: dict[str, Any] = {}
        for field_name, (wire_name, default) in _EXTRA_SAMPLING.items():
            value = getattr(params, field_name)
            if value != default:
                extra[wire_name] = list(value) if isinstance(value, tuple) else value
        constraint = params.constraint
        if constraint is not None:
            kind, spec = constraint
            if kind == "json_schema" and chat:
                kwargs["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": json.loads(spec)},
                }
            else:
                extra[kind] = spec
        if extra and not self.extra_sampling:
            raise BackendCapabilityError(
                f"{self.name}: the OpenAI API has no {sorted(extra)} "
                f"({'chat completions only take json_schema' if constraint else 'sampling options'}); "
                "if the server takes SGLang's extra request fields (SGLang, plait serve), pass "
                "OpenAI(..., extra_sampling=True); otherwise use a Runtime or Endpoint backend"
            )
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _request(self, call: GenerateCall, stream: bool) -> tuple[bool, dict[str, Any]]:
        chat = self._use_chat(call.prompt)
        kwargs = self._sampling_kwargs(call.params, chat)
        kwargs["model"] = call.model or self.model
        if call.tools is not None and not chat:
            raise BackendCapabilityError(
                f"{self.name}: tool calls need the chat completions API; put call_tools after role blocks "
                "and do not pass api='completions'")
        if chat:
            kwargs["messages"] = chat_messages_for_generation(call.prompt)
            if call.tools is not None:
                kwargs.update(_tool_kwargs(call.tools))
            if call.return_logprob:
                kwargs["logprobs"] = True
                if call.top_logprobs_num:
                    kwargs["top_logprobs"] = call.top_logprobs_num
        else:
            kwargs["prompt"] = call.prompt
            if call.return_logprob:
                kwargs["logprobs"] = call.top_logprobs_num
        if stream:
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
        return chat, kwargs

    # ------------------------------------------------------------------ generation
    def generate(self, call: GenerateCall) -> GenerateResult:
        """One chat completion or completion; blocks until finished."""
        chat, kwargs = self._request(call, stream=False)
        start = time.perf_counter()
        tool_calls = None
        if chat:
            with self._constraint_errors(call):
                resp = self.client.chat.completions.create(**kwargs)
            choice = resp.choices[0]
            text = choice.message.content or ""
            lps, tops = self._chat_logprobs(getattr(choice.logprobs, "content", None), call)
            if call.tools is not None:
                tool_calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments or ""}
                              for c in (choice.message.tool_calls or [])]
        else:
            with self._constraint_errors(call):
                resp = self.client.completions.create(**kwargs)
            choice = resp.choices[0]
            text = choice.text
            lps, tops = self._completion_logprobs(choice.logprobs, call)
        usage = resp.usage
        completion_tokens = usage.completion_tokens if usage else 0
        meta: dict[str, Any] = {"id": resp.id, "endpoint": "chat" if chat else "completions"}
        if tool_calls is not None:
            meta["content"], text = text, render_api_calls(text, tool_calls)
        return GenerateResult(
            text=text,
            finished=True,
            finish_reason=_finish_reason(choice.finish_reason, completion_tokens),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=completion_tokens,
            cached_tokens=_cached_tokens(usage),
            latency_s=time.perf_counter() - start,
            output_token_logprobs=lps,
            output_top_logprobs=tops,
            meta=meta,
            tool_calls=tool_calls,
        )

    def stream(self, call: GenerateCall) -> Iterator[GenerateResult]:
        """Cumulative snapshots; closing the iterator early closes the HTTP stream (the server aborts)."""
        chat, kwargs = self._request(call, stream=True)
        create = self.client.chat.completions.create if chat else self.client.completions.create
        with self._constraint_errors(call):
            chunks = create(**kwargs)
        return self._stream(chunks, chat, call)

    @contextmanager
    def _constraint_errors(self, call: GenerateCall) -> Iterator[None]:
        """The API's refusal (400/422) of the request's constraint as ``InvalidConstraintError``."""
        try:
            yield
        except Exception as exc:
            if getattr(exc, "status_code", None) in (400, 422):
                mapped = constraint_refusal(str(getattr(exc, "message", exc)), call.params, self.name)
                if mapped is not None:
                    raise mapped from exc
            raise

    def _stream(self, chunks: Any, chat: bool, call: GenerateCall) -> Iterator[GenerateResult]:
        start = time.perf_counter()
        text, reason, usage = "", None, None
        calls: dict[int, dict[str, Any]] = {}  # streamed tool calls by index
        lps: list[LogprobEntry] | None = [] if call.return_logprob else None
        tops: list[list[LogprobEntry] | None] | None = [] if call.return_logprob else None
        try:
            for chunk in chunks:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if chat:
                    piece = choice.delta.content or ""
                    more = self._chat_logprobs(getattr(choice.logprobs, "content", None), call)
                    for delta in getattr(choice.delta, "tool_calls", None) or []:
                        entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                        entry["id"] = delta.id or entry["id"]
                        if delta.function is not None:
                            entry["name"] += delta.function.name or ""
                            entry["arguments"] += delta.function.arguments or ""
                else:
                    piece = choice.text or ""
                    more = self._completion_logprobs(choice.logprobs, call)
                if lps is not None and more[0]:
                    lps.extend(more[0])
                    tops.extend(more[1] or [])
                text += piece
                reason = choice.finish_reason or reason
                if piece and reason is None:
                    yield self._snapshot(text, None, usage, start, lps, tops, finished=False)
        finally:
            chunks.close()
        final = self._snapshot(text, reason or "stop", usage, start, lps, tops, finished=True)
        if call.tools is not None:
            final.tool_calls = [calls[i] for i in sorted(calls)]
            final.meta["content"], final.text = text, render_api_calls(text, final.tool_calls)
        yield final

    @staticmethod
    def _snapshot(text, reason, usage, start, lps, tops, finished: bool) -> GenerateResult:
        completion_tokens = usage.completion_tokens if usage else len(lps or ())
        return GenerateResult(
            text=text,
            finished=finished,
            finish_reason=_finish_reason(reason, completion_tokens) if finished else None,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=completion_tokens,
            cached_tokens=_cached_tokens(usage),
            latency_s=time.perf_counter() - start,
            output_token_logprobs=list(lps) if lps is not None else None,
            output_top_logprobs=list(tops) if tops is not None else None,
        )

    @staticmethod
    def _chat_logprobs(content: Any, call: GenerateCall):
        if not call.return_logprob or not content:
            return None, None
        lps = [(float(t.logprob), UNKNOWN_TOKEN_ID, t.token) for t in content]
        if not call.top_logprobs_num:
            return lps, [None] * len(lps)
        tops = [[(float(a.logprob), UNKNOWN_TOKEN_ID, a.token) for a in (t.top_logprobs or [])] for t in content]
        return lps, tops

    @staticmethod
    def _completion_logprobs(logprobs: Any, call: GenerateCall):
        if not call.return_logprob or logprobs is None or not logprobs.tokens:
            return None, None
        lps = [(float(lp), UNKNOWN_TOKEN_ID, tok) for tok, lp in zip(logprobs.tokens, logprobs.token_logprobs)]
        if not call.top_logprobs_num or not logprobs.top_logprobs:
            return lps, [None] * len(lps)
        tops = [
            sorted(((float(lp), UNKNOWN_TOKEN_ID, tok) for tok, lp in (alts or {}).items()), reverse=True)
            for alts in logprobs.top_logprobs
        ]
        return lps, tops

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
        """Prompt logprobs of each choice through the completions endpoint (``echo=True``), from ``model``
        (None: the backend's model)."""
        if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("select needs a non-empty list of non-empty choice strings")
        if self.api == "chat" or has_chat_markup(prefix):
            raise BackendCapabilityError(
                f"{self.name}: select needs prompt logprobs, and the chat completions API does not report "
                "them; use gen(..., choices=...) through constrained decoding on a server that supports it, "
                "or a Runtime/Endpoint backend"
            )
        scored = self._echo_logprobs([prefix + c for c in choices], model)
        scores, choice_texts = [], []
        for choice, (tokens, logprobs, offsets, usage) in zip(choices, scored):
            # the choice's tokens: every token that ends after the prefix (one straddling the boundary too)
            first = next(i for i, (tok, off) in enumerate(zip(tokens, offsets)) if off + len(tok) > len(prefix))
            if first == 0:
                raise BackendCapabilityError(
                    f"{self.name}: the API gives no logprob for the first token of a prompt; put text before the select"
                )
            scores.append(ChoiceScores(
                choice=choice, token_logprobs=[float(lp) for lp in logprobs[first:]],
                prompt_tokens=usage[0], cached_tokens=usage[1],
            ))
            choice_texts.append("".join(tokens[first:]))
        if unconditional:
            self._score_unconditional(scores, choice_texts, model)
        return scores

    def _score_unconditional(self, scores: list[ChoiceScores], texts: list[str], model: str | None) -> None:
        """The choice tokens' text scored with no prefix (first token: 0.0, SGLang's convention)."""
        for score, (tokens, logprobs, _, _) in zip(scores, self._echo_logprobs(texts, model)):
            if len(tokens) != len(score.token_logprobs):
                raise BackendCapabilityError(
                    f"{self.name}: {score.choice!r} tokenizes differently without its prefix, and the API "
                    "takes no token ids to score it token by token; use another choices_method or a "
                    "Runtime/Endpoint backend"
                )
            score.unconditional_token_logprobs = [0.0 if lp is None else float(lp) for lp in logprobs]

    def _echo_logprobs(self, prompts: list[str],
                       model: str | None = None) -> list[tuple[list[str], list, list[int], tuple[int, int]]]:
        """(tokens, logprobs, text offsets, (prompt tokens, cached tokens)) of each prompt, in order."""
        try:
            import openai
        except ImportError:  # a client passed in without the package: no typed errors to translate
            openai = None
        try:
            resp = self.client.completions.create(
                model=model or self.model, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0.0,
            )
        except Exception as exc:
            if openai is not None and isinstance(exc, (openai.BadRequestError, openai.NotFoundError)):
                raise BackendCapabilityError(
                    f"{self.name}: select needs prompt logprobs (completions with echo=True, logprobs=1, "
                    f"max_tokens=0), which this API refused ({exc}); use gen(..., choices=...) through "
                    "constrained decoding, or a Runtime/Endpoint backend"
                ) from exc
            raise
        by_index = sorted(resp.choices, key=lambda c: c.index)
        if len(by_index) != len(prompts):
            raise RuntimeError(f"{self.name}: asked to score {len(prompts)} prompts, got {len(by_index)} results")
        usage = resp.usage
        per_prompt = (usage.prompt_tokens // len(prompts) if usage else 0, _cached_tokens(usage) // len(prompts))
        out = []
        for c in by_index:
            lp = c.logprobs
            if lp is None or not lp.tokens or lp.text_offset is None:
                raise BackendCapabilityError(
                    f"{self.name}: the API returned no prompt logprobs for echo=True; select needs them "
                    "(use gen(..., choices=...) or a Runtime/Endpoint backend)"
                )
            out.append((lp.tokens, lp.token_logprobs, lp.text_offset, per_prompt))
        return out

    # ------------------------------------------------------------------ template and no-op hooks
    def chat_template(self) -> ChatTemplate:
        """Reversible ChatML markup for chat models; a named text template for completions models."""
        if self.api != "completions":
            return CHAT_MARKUP
        from plait.lang import chat_template as templates

        return templates.get_chat_template(self._chat_template_name or "default")

    def cache_prefix(self, prefix: str, program_id: str | None = None, model: str | None = None) -> None:
        """No-op: the server manages its own prefix cache."""

    def begin_program(self, program_id: str) -> None:
        """No-op: the OpenAI API has no program runs."""

    def end_program(self, program_id: str) -> None:
        """No-op."""

    def __repr__(self) -> str:
        return f"OpenAI(model={self.model!r}, api={self.api!r})"
