"""Endpoint: the language's HTTP backend, speaking SGLang's native protocol (``plait serve`` or SGLang).

``Endpoint(url, api_key=None)`` sends ``generate`` / ``stream`` to ``POST /generate`` (SSE for
streams), scores ``select`` choices like SGLang's ``RuntimeEndpoint.select`` (``max_new_tokens=0``
with prompt logprobs), and caches prefixes with ``max_new_tokens=0`` requests. plait's extensions
are used where the server lists them in ``/get_server_info`` under ``plait_extensions``:
``program_id`` on ``/generate`` plus ``/begin_program`` and ``/end_program`` (program-aware caching),
and ``/apply_chat_template`` (the model's own chat template). Against a plain SGLang server those
calls are skipped and the chat template is chosen by model name.

Every generation carries a request id (``rid``, SGLang's field), so ``abort_program(program_id)`` can abort
a run's generations in flight through ``/abort_request`` (plait serve and SGLang have it); a stream is
also aborted by closing it. A 400 about the request's constraint is raised as ``InvalidConstraintError``.

Per-call models are the server's LoRA adapters (``plait serve --lora-paths name=path``, SGLang's flag):
a call with ``model="name"`` carries ``lora_path`` (SGLang's field; a list, one per prompt, in a batched
request), so its select scoring and cached prefixes are under the adapter too. The server refuses an
unknown adapter with a 400 naming the loaded ones (raised as ``ValueError``).

Only httpx and the standard library: ``plait.lang`` must work without torch.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from plait.lang.backends.base import (
    ChatTemplate,
    ChoiceScores,
    GenerateCall,
    GenerateResult,
)
from plait.lang.constraints import constraint_refusal
from plait.sampling import SamplingParams
from plait.token_ids import common_prefix_len

__all__ = ["Endpoint"]

logger = logging.getLogger(__name__)
_DEFAULTS = SamplingParams().to_dict()
_MAPPED_META = ("prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason", "e2e_latency",
                "output_token_logprobs", "output_top_logprobs")
# Prompt tokens before the prefix's end that are re-scored in select, so that a token merging
# across the prefix/choice boundary is found; retried with the larger margins if that is not enough.
_SELECT_MARGINS = (4, 64, None)


def _entries(raw: list | None) -> list | None:
    return None if raw is None else [tuple(e) for e in raw]


def _guess_template_name(model_path: str) -> str:
    """SGLang-style choice of a named template from the model's path (servers without the extension)."""
    path = model_path.lower()
    if "llama-3" in path or "llama3" in path:
        return "llama-3-instruct"
    if any(key in path for key in ("qwen", "smollm", "chatml", "hermes")):
        return "chatml"
    return "default"


class Endpoint:
    """A model served over HTTP (``plait serve`` or an SGLang server). Thread-safe."""

    #: calls may name a LoRA adapter the server has loaded (sent as ``lora_path``)
    per_call_models = True

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 600.0,
                 chat_template: str | None = None) -> None:
        """Connect to ``url`` (e.g. ``http://127.0.0.1:30000``); ``chat_template`` names a template of
        ``plait.lang.chat_template`` to use instead of the server model's own."""
        self.url = url.rstrip("/")
        self.name = f"endpoint {self.url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._template_name = chat_template
        self._template: ChatTemplate | None = None
        self._lock = threading.Lock()
        self._in_flight: dict[str, set[str]] = {}  # program id -> request ids of its generations in flight
        self.model_info = self._request("GET", "/get_model_info")
        try:
            server_info = self._request("GET", "/get_server_info")
        except (RuntimeError, ValueError):
            server_info = {}
        self.extensions = frozenset(server_info.get("plait_extensions", ()))

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ConnectionError(f"{self.name}: cannot reach the server ({exc})") from exc
        self._check(response)
        return response.json() if response.content else None

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            return
        try:
            response.read()
            error = response.json().get("error", {})
            message = error.get("message", response.text) if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = response.text
        if response.status_code == 400:
            raise ValueError(f"{self.name} refused the request: {message}")
        if response.status_code == 401:
            raise PermissionError(f"{self.name}: {message} (pass api_key=)")
        raise RuntimeError(f"{self.name} answered {response.status_code}: {message}")

    def _program(self, program_id: str | None) -> dict[str, Any]:
        return {"program_id": program_id} if program_id is not None and "program_id" in self.extensions else {}

    @staticmethod
    def _lora(model: str | None, batch: int | None = None) -> dict[str, Any]:
        """The request's ``lora_path`` for ``model`` (nothing for the base model); a list for a batch."""
        if model is None:
            return {}
        return {"lora_path": model if batch is None else [model] * batch}

    @staticmethod
    def _sampling(params: SamplingParams) -> dict[str, Any]:
        """Only what differs from the defaults, so that servers lacking a field accept the request."""
        return {k: v for k, v in params.to_dict().items() if v != _DEFAULTS.get(k)}

    def _body(self, call: GenerateCall, rid: str) -> dict[str, Any]:
        if call.params.n != 1:
            raise ValueError(f"a GenerateCall continues one prompt once; got n={call.params.n} "
                             "(use fork(n) in the program for several samples)")
        body = {"text": call.prompt, "sampling_params": self._sampling(call.params),
                "return_logprob": call.return_logprob, "top_logprobs_num": call.top_logprobs_num,
                "return_text_in_logprobs": True, "rid": rid, **self._program(call.program_id),
                **self._lora(call.model)}
        return body

    # ------------------------------------------------------------------ generation
    def generate(self, call: GenerateCall) -> GenerateResult:
        """Continue ``call.prompt``; blocks until finished."""
        with self._tracked(call) as rid, self._constraint_errors(call):
            return self._result(self._request("POST", "/generate", self._body(call, rid)))

    def stream(self, call: GenerateCall) -> Iterator[GenerateResult]:
        """Cumulative snapshots over SSE; closing the iterator early closes the connection, which
        aborts the request on the server."""
        rid = self._track(call.program_id)
        try:
            request = self._http.build_request("POST", "/generate", json={**self._body(call, rid), "stream": True})
            try:
                response = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise ConnectionError(f"{self.name}: cannot reach the server ({exc})") from exc
            try:
                with self._constraint_errors(call):
                    self._check(response)
            except BaseException:
                response.close()
                raise
        except BaseException:
            self._untrack(call.program_id, rid)
            raise
        return self._events(response, lambda: self._untrack(call.program_id, rid))

    @contextmanager
    def _tracked(self, call: GenerateCall) -> Iterator[str]:
        """A request id for ``call``, known to ``abort_program`` while the call runs."""
        rid = self._track(call.program_id)
        try:
            yield rid
        finally:
            self._untrack(call.program_id, rid)

    def _track(self, program_id: str | None) -> str:
        rid = uuid.uuid4().hex
        if program_id is not None:
            with self._lock:
                self._in_flight.setdefault(program_id, set()).add(rid)
        return rid

    def _untrack(self, program_id: str | None, rid: str) -> None:
        if program_id is not None:
            with self._lock:
                rids = self._in_flight.get(program_id, set())
                rids.discard(rid)
                if not rids:
                    self._in_flight.pop(program_id, None)

    @contextmanager
    def _constraint_errors(self, call: GenerateCall) -> Iterator[None]:
        """A refusal of the request's constraint as ``InvalidConstraintError`` (other refusals unchanged)."""
        try:
            yield
        except ValueError as exc:
            mapped = constraint_refusal(str(exc), call.params, self.name)
            if mapped is None:
                raise
            raise mapped from None

    def abort_program(self, program_id: str) -> None:
        """Abort the generations of ``program_id`` in flight (``/abort_request``); a stream also ends when
        it is closed."""
        with self._lock:
            rids = list(self._in_flight.get(program_id, ()))
        for rid in rids:
            self._request("POST", "/abort_request", {"rid": rid})

    def _events(self, response: httpx.Response, done: Callable[[], None] | None = None) -> Iterator[GenerateResult]:
        """The stream's snapshots; ``done()`` is called when it ends (the request is no longer in flight)."""
        out_lps: list = []
        out_tops: list = []
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"{self.name}: the stream failed: {event['error']}")
                meta = event["meta_info"]
                new = meta.get("output_token_logprobs")
                if new is not None:
                    # plait streams logprob deltas; SGLang servers up to 0.5.2 repeat the whole list
                    total = meta.get("completion_tokens")
                    cumulative = len(out_lps) + len(new) != total and len(new) == total
                    out_lps = list(new) if cumulative else out_lps + list(new)
                    tops = meta.get("output_top_logprobs")
                    if tops is not None:
                        out_tops = list(tops) if cumulative else out_tops + list(tops)
                    meta = {**meta, "output_token_logprobs": out_lps}
                    if tops is not None:
                        meta["output_top_logprobs"] = out_tops
                yield self._result({**event, "meta_info": meta})
        finally:
            response.close()
            if done is not None:
                done()

    @staticmethod
    def _result(out: dict[str, Any]) -> GenerateResult:
        meta = out["meta_info"]
        top = meta.get("output_top_logprobs")
        return GenerateResult(
            text=out["text"],
            finished=meta.get("finish_reason") is not None,
            finish_reason=meta.get("finish_reason"),
            prompt_tokens=meta.get("prompt_tokens", 0),
            completion_tokens=meta.get("completion_tokens", 0),
            cached_tokens=meta.get("cached_tokens", 0),
            latency_s=meta.get("e2e_latency", 0.0),
            output_token_logprobs=_entries(meta.get("output_token_logprobs")),
            output_top_logprobs=None if top is None else [_entries(t) for t in top],
            meta={"output_ids": out.get("output_ids"), **{k: v for k, v in meta.items() if k not in _MAPPED_META}},
        )

    # ------------------------------------------------------------------ select
    def score_choices(self, prefix: str, choices: Sequence[str], *, unconditional: bool = False,
                      program_id: str | None = None, model: str | None = None) -> list[ChoiceScores]:
        """Logprobs of each choice's tokens after ``prefix``, scored by the server in one batched request
        (under LoRA adapter ``model``; None: the base model).

        The bare prefix is scored alongside the choices (from a few tokens before its end), so the
        choice starts where ``prefix + choice`` stops agreeing with the prefix's own tokens: a token
        that merges across the boundary counts as the choice's.
        """
        if isinstance(choices, str) or not choices:
            raise ValueError("select needs a non-empty list of choice strings")
        if any(not isinstance(c, str) or not c for c in choices):
            raise ValueError("every choice must be a non-empty str")
        if not prefix:
            raise ValueError(f"{self.name}: select needs some text before it (the first token has no logprob)")
        extra = self._program(program_id)
        cached = self._request("POST", "/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0}, **extra,
                                                     **self._lora(model)})
        prompt_len = cached["meta_info"]["prompt_tokens"]
        for margin in _SELECT_MARGINS:
            start = 0 if margin is None else max(prompt_len - margin, 0)
            scores = self._score_from(prefix, choices, start, {**extra, **self._lora(model, len(choices) + 1)})
            if scores is not None:
                break
        if unconditional:
            self._score_unconditional(scores, {**extra, **self._lora(model, len(scores))})
        return scores

    def _score_from(self, prefix: str, choices: Sequence[str], start: int,
                    extra: dict[str, Any]) -> list[ChoiceScores] | None:
        """Scores with prompt logprobs from token ``start``; None if a choice changed the prefix's
        tokens at or before ``start`` (a larger margin is needed)."""
        outs = self._request("POST", "/generate", {
            "text": [prefix, *(prefix + c for c in choices)], "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": 1,
            "return_text_in_logprobs": True, **extra,
        })
        prefix_ids = [e[1] for e in outs[0]["meta_info"]["input_token_logprobs"]]
        scores = []
        for choice, out in zip(choices, outs[1:]):
            meta = out["meta_info"]
            entries, tops = meta["input_token_logprobs"], meta.get("input_top_logprobs") or []
            ids = [e[1] for e in entries]
            first = min(common_prefix_len(prefix_ids, ids), len(ids) - 1)
            if first == 0 and start > 0:
                return None
            if entries[first][0] is None:
                raise ValueError(f"{self.name}: the choice {choice!r} merges with the first token of the prompt; "
                                 "put more text before the select")
            scores.append(ChoiceScores(
                choice=choice,
                token_logprobs=[float(e[0]) for e in entries[first:]],
                top_token_ids=[top[0][1] if top else None for top in tops[first:]] if tops else None,
                token_ids=ids[first:],
                prompt_tokens=meta.get("prompt_tokens", 0),
                cached_tokens=meta.get("cached_tokens", 0),
            ))
        return scores

    def _score_unconditional(self, scores: list[ChoiceScores], extra: dict[str, Any]) -> None:
        """Each choice's tokens scored with no prefix (SGLang's method): the first token has no
        context, so its unconditional logprob is 0.0 (SGLang's convention)."""
        outs = self._request("POST", "/generate", {
            "input_ids": [s.token_ids for s in scores], "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True, "logprob_start_len": 0, **extra,
        })
        outs = outs if isinstance(outs, list) else [outs]
        for score, out in zip(scores, outs):
            entries = out["meta_info"]["input_token_logprobs"]
            score.unconditional_token_logprobs = [0.0 if e[0] is None else float(e[0]) for e in entries]

    # ------------------------------------------------------------------ cache, programs, template
    def cache_prefix(self, prefix: str, program_id: str | None = None, model: str | None = None) -> None:
        """Prefill ``prefix`` into the server's prefix cache (a ``max_new_tokens=0`` request), under LoRA
        adapter ``model`` (None: the base model)."""
        if prefix:
            self._request("POST", "/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0},
                                                **self._program(program_id), **self._lora(model)})

    def begin_program(self, program_id: str) -> None:
        """Open a program run on servers with program-aware caching (a no-op elsewhere)."""
        if "begin_program" in self.extensions:
            self._request("POST", "/begin_program", {"program_id": program_id})

    def end_program(self, program_id: str) -> None:
        """Release the run's pinned prefixes on servers with program-aware caching (a no-op elsewhere)."""
        if "end_program" in self.extensions:
            self._request("POST", "/end_program", {"program_id": program_id})

    def chat_template(self) -> ChatTemplate:
        """The server model's own template (derived through ``/apply_chat_template``), the one named
        at construction, or one chosen from the model's name on servers without the extension."""
        with self._lock:
            if self._template is None:
                self._template = self._load_template()
            return self._template

    def _load_template(self) -> ChatTemplate:
        from plait.lang import chat_template as templates

        if self._template_name is not None:
            return templates.get_chat_template(self._template_name)
        model = str(self.model_info.get("model_path", ""))
        if "apply_chat_template" not in self.extensions or not self.model_info.get("has_chat_template"):
            return templates.get_chat_template(_guess_template_name(model))

        def render(messages: list[dict[str, str]]) -> str:
            return self._request("POST", "/apply_chat_template", {"messages": messages})["text"]

        def render_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
            body = {"messages": messages, "chat_template_kwargs": {"tools_in_user_message": False}}
            return self._request("POST", "/apply_chat_template", {**body, **({"tools": tools} if tools else {})})["text"]

        try:
            template = templates.template_from_renderer(model, render)
        except ValueError as exc:
            logger.warning("%s: cannot derive role blocks from the model's chat template (%s); using %r",
                           self.name, exc, _guess_template_name(model))
            return templates.get_chat_template(_guess_template_name(model))
        if "apply_chat_template_tools" not in self.extensions:
            return template
        from plait.lang.tool_format import with_native_tools

        return with_native_tools(template, render_tools)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> Endpoint:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"
