"""The interpreter: executes IR nodes against a Backend. The one place that walks nodes.

Each program state owns an ``Executor``. ``submit`` puts a node on the executor's queue and returns at
once; a worker thread executes nodes in order (so forks, each with its own executor, run
concurrently), and reading a variable waits for the node that sets it. All executors of one program
run share a ``RunContext``: the backend, the run's ``program_id`` (sent with every call), the chat
template and the sampling defaults. With ``symbolic=True`` (tracing) nothing is sent to the backend:
``gen``/``select`` produce ``SymbolicValue`` placeholders and every executed node is logged.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from plait.lang.backends.base import (
    Backend,
    BackendCapabilityError,
    GenerateCall,
    GenerateResult,
    ToolRequest,
)
from plait.lang.errors import (
    ChatTemplateError,
    GenerationError,
    RoleError,
    StateClosedError,
    UnknownVariableError,
    VariableReuseError,
)
from plait.lang.ir import (
    Gen,
    Media,
    Node,
    RoleBegin,
    RoleEnd,
    Select,
    Seq,
    Text,
    VarScopeBegin,
    VarScopeEnd,
    flatten,
)
from plait.lang.gen_output import convert_gen_output
from plait.lang.models import model_kwargs, supports_models, with_model
from plait.lang.reasoning import ReasoningStream, reasoning_sampling, reasoning_var
from plait.lang.records import CallRecord, RunContext, Segment, segments_from
from plait.lang.streaming import stream_gen
from plait.lang.symbolic import MARK_BEGIN, SymbolicValue
from plait.lang.tool_interpreter import TOOL_NODES, execute_tool_node
from plait.lang.tool_primitives import CallTools
from plait.sampling import SamplingParams

__all__ = ["Executor"]


def branch_seed(seed: int, index: int) -> int:
    """The seed of fork branch ``index`` of a state sampling with ``seed``.

    The first 8 bytes of BLAKE2b over the ASCII text ``"{seed}/{index}"``, read as a little-endian
    int and kept to 31 bits (a non-negative int every backend accepts). Deterministic across
    processes; nested forks derive again from their branch's seed.
    """
    digest = hashlib.blake2b(f"{seed}/{index}".encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def branch_defaults(defaults: dict[str, Any], index: int) -> dict[str, Any]:
    """A fork branch's sampling defaults: the parent's, with a run-level ``seed`` derived per branch."""
    if defaults.get("seed") is None:
        return defaults
    return {**defaults, "seed": branch_seed(defaults["seed"], index)}


@dataclass
class _AppendForks(Node):
    """Internal: append the text each fork produced after the fork point (``join("concate_and_append")``)."""

    forks: list[Executor]


_STOP = object()  # queue sentinel that ends the worker


class Executor:
    """Executes the nodes of one program state, in order, on its own worker thread."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.text = ""
        self.segments: list[Segment] = []
        self.messages: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.calls: list[CallRecord] = []
        self.cur_role: str | None = None
        self.role_begin_pos = 0
        self.scope_starts: dict[str, int] = {}
        self.fork_start = 0
        self.tools: dict[str, Any] = {}  # the tools the prompt declared (pl.system(..., tools=...)), by name
        # the open s.using(model=...) scopes, innermost last: applied to calls when they are submitted
        self.model_scope: list[str | None] = []
        self.defaults: dict[str, Any] = run.defaults  # a branch's own copy carries its derived seed
        self.parent: Executor | None = None  # the executor this one was forked from
        self.branch_index: int | None = None  # this fork's index among its siblings
        self.written: set[str] = set()  # names set on this executor (a branch: since its fork)
        self.produced: set[str] = set()  # names of the gens/selects/var_scopes submitted here (reuse check)
        self.stream_meta: dict[str, dict[str, Any]] = {}  # a streaming gen's latest meta, per variable
        self.calls_merged = False  # this branch's calls were added to its parent's record
        self.fork_groups: list[list[Executor]] = []  # the branches of each fork made from this one
        self.join_mode: str | None = None  # how this branch was joined (None: not joined)
        self.error: BaseException | None = None
        self.closed = False
        self.finished = False  # the worker has stopped
        self.log: list[Any] | None = [] if run.symbolic else None
        self.changed = threading.Condition()  # notified on every text / variable change
        self._events: dict[str, threading.Event] = {}
        with run.lock:
            run.executors.append(self)
        self._queue: queue.Queue[Any] = queue.Queue()
        if run.threaded:
            self._worker = threading.Thread(target=self._work, name="plait-executor", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ submission and waiting
    def submit(self, node: Node) -> None:
        """Queue ``node``; raises the error of an earlier node, or ``StateClosedError`` after the run."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise StateClosedError(
                "this program state is closed (its run has finished or the fork was joined); start a new "
                "run with prog.run(...) or append to the state the fork was made from"
            )
        if self.model_scope:
            node = with_model(node, self.model_scope[-1])
        names = [name for n in flatten([node]) for name in _produced_names(n)]
        self._check_new_names(names)
        for name in names:
            self._events[name] = threading.Event()
        if self.run.threaded:
            self._queue.put(node)
        else:
            self._execute_guarded(node)
            if self.error is not None:
                raise self.error

    def sync(self) -> None:
        """Wait until every submitted node has executed; raise the first node error, if any."""
        if self.run.threaded and not self.finished:
            self._queue.join()
        if self.error is not None:
            raise self.error

    def end(self) -> None:
        """Close the executor: no more nodes; the worker exits once the queue is empty."""
        if not self.closed:
            self.closed = True
            if self.run.threaded:
                self._queue.put(_STOP)
            else:
                self._mark_finished()

    def wait_finished(self, timeout: float | None = None) -> bool:
        """After ``end``: wait until the worker has executed everything queued and stopped (at most
        ``timeout`` seconds); returns whether it has."""
        if self.run.threaded:
            self._worker.join(timeout)
            return not self._worker.is_alive()
        return True

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` as this executor's error (the first one stays) and wake everyone waiting on it."""
        with self.changed:
            if self.error is None:
                self.error = exc
            self.changed.notify_all()
        for event in list(self._events.values()):
            event.set()

    def _check_new_names(self, names: list[str]) -> None:
        """Raise ``VariableReuseError`` if a name is produced twice in this state (unless the run allows it)."""
        if self.run.name_reuse == "overwrite":
            return
        seen: set[str] = set()
        for name in names:
            if name in self.produced or name in seen:
                raise VariableReuseError(
                    f"variable {name!r} is already set by an earlier gen/select/var_scope of this run; a second one "
                    f"would overwrite it. Give each a distinct name (e.g. f'{name}_{{i}}' in a loop), or allow it "
                    "with @pl.function(name_reuse='overwrite') (SGLang's behaviour: the latest value wins)"
                )
            seen.add(name)
        self.produced |= seen

    def current_model(self) -> str | None:
        """The model of the innermost open ``s.using(model=...)`` scope (None: the backend's default)."""
        return self.model_scope[-1] if self.model_scope else None

    def known_names(self) -> set[str]:
        return set(self.variables) | set(self._events)

    def get_var(self, name: str, timeout: float | None = None) -> Any:
        event = self._events.get(name)
        if event is None and name not in self.variables:
            raise UnknownVariableError(name, self.known_names())
        if event is not None and not event.wait(timeout):
            raise TimeoutError(f"variable {name!r} was not produced within {timeout} s")
        if self.error is not None and name not in self.variables:
            raise self.error
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        with self.changed:
            self.variables[name] = value
            self.written.add(name)
            self.changed.notify_all()

    def get_meta_info(self, name: str) -> Any:
        self.get_var(name)
        return self.meta_info.get(name)

    def var_done(self, name: str) -> bool:
        event = self._events.get(name)
        return event is None or event.is_set()

    # ------------------------------------------------------------------ fork
    def fork(self, n: int) -> list[Executor]:
        """``n`` executors that continue from this one's current state (after all queued nodes)."""
        self.sync()
        backend, model = self.run.backend, self.current_model()
        # the branches' calls extend this text under the model in scope now (KV is per model)
        if n >= 2 and self.text and not self.run.symbolic and backend is not None and (
                model is None or supports_models(backend)):
            backend.cache_prefix(self.text, self.run.program_id, **model_kwargs(backend, model, "fork"))
        children = []
        for i in range(n):
            child = Executor(self.run)
            child.parent, child.branch_index, child.defaults = self, i, branch_defaults(self.defaults, i)
            child.text, child.segments, child.messages = self.text, list(self.segments), list(self.messages)
            child.variables, child.meta_info = dict(self.variables), dict(self.meta_info)
            child.cur_role, child.role_begin_pos = self.cur_role, self.role_begin_pos
            child.scope_starts, child.fork_start = dict(self.scope_starts), len(self.text)
            child.tools, child.model_scope = dict(self.tools), list(self.model_scope)
            children.append(child)
        with self.changed:
            self.fork_groups.append(children)
        if self.log is not None:
            self.log.append(("fork", [c.log for c in children]))
        return children

    def merge_calls_into_parent(self) -> None:
        """Add this branch's call records to its parent's, tagged with the branch index (once).

        Called when the branch is joined, and at the end of the run for branches never joined. A
        parent whose own calls were merged already passes them on to the nearest ancestor that was
        not (the tag is then the index of that ancestor's branch they came through).
        """
        if self.parent is None or self.calls_merged:
            return
        self.calls_merged = True
        node, dest = self, self.parent
        while dest.calls_merged and dest.parent is not None:
            node, dest = dest, dest.parent
        dest.calls.extend(replace(call, branch=node.branch_index) for call in self.calls)

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            node = self._queue.get()
            if node is _STOP:
                self._queue.task_done()
                break
            if self.error is None:
                self._execute_guarded(node)
            self._queue.task_done()
        self._mark_finished()

    def _mark_finished(self) -> None:
        with self.changed:
            self.finished = True
            self.changed.notify_all()

    def _execute_guarded(self, node: Node) -> None:
        try:
            self._execute(node)
        except BaseException as exc:  # noqa: BLE001 - stored and re-raised in the program's thread
            self.fail(exc)

    def _execute(self, node: Node) -> None:
        if isinstance(node, Seq):
            for child in node.nodes:
                self._execute(child)
            return
        if self.log is not None and not isinstance(node, _AppendForks):
            self.log.append(("node", node, self.cur_role))
        if isinstance(node, Text):
            self._append(node.value, "text")
        elif isinstance(node, Gen):
            self._execute_gen(node)
        elif isinstance(node, Select):
            self._execute_select(node)
        elif isinstance(node, RoleBegin):
            self._role_begin(node.role)
        elif isinstance(node, RoleEnd):
            self._role_end(node.role)
        elif isinstance(node, VarScopeBegin):
            self.scope_starts[node.name] = len(self.text)
        elif isinstance(node, VarScopeEnd):
            self._scope_end(node.name)
        elif isinstance(node, _AppendForks):
            self._append_forks(node.forks)
        elif isinstance(node, TOOL_NODES):
            execute_tool_node(self, node)
        elif isinstance(node, Media):
            self._refuse_media(node)
        else:
            raise TypeError(f"the interpreter cannot execute {type(node).__name__} nodes")

    # ------------------------------------------------------------------ node kinds
    def _append(self, value: str, kind: str, name: str | None = None, call: CallRecord | None = None) -> None:
        value = str(value)
        if len(value) == 0:
            return
        with self.changed:
            self.text += value
            self.segments.append(Segment(kind, value, self.cur_role, name, call))
            self.changed.notify_all()

    def _set_result(self, name: str | None, value: Any, meta: dict[str, Any]) -> None:
        if name is None:
            return
        with self.changed:
            self.variables[name] = value
            self.written.add(name)
            self.meta_info[name] = meta
            self.changed.notify_all()
        self._events.setdefault(name, threading.Event()).set()

    def _role_template(self, role: str) -> tuple[str, str]:
        table = self.run.template.role_prefix_and_suffix
        if role not in table:
            raise ChatTemplateError(
                f"chat template {self.run.template.name!r} has no {role!r} role (it has {sorted(table)}); "
                "pass chat_template= with a template that does"
            )
        return table[role]

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise RoleError(f"cannot open a {role!r} block inside the open {self.cur_role!r} block; roles do not nest")
        default_system = self.run.template.default_system_prompt
        if not self.messages and role != "system" and default_system is not None:
            self._role_begin("system")
            self._append(default_system, "text")
            self._role_end("system")
        prefix, _ = self._role_template(role)
        self.cur_role = role
        self._append(prefix, "role_prefix")
        self.role_begin_pos = len(self.text)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise RoleError(f"cannot end a {role!r} block: the open block is {self.cur_role!r}")
        content = self.text[self.role_begin_pos :]
        self._append(self._role_template(role)[1], "role_suffix")
        self.cur_role = None
        self.messages.append({"role": role, "content": content})

    def _scope_end(self, name: str) -> None:
        if name not in self.scope_starts:
            raise RoleError(f"var_scope {name!r} ended without beginning")
        captured = self.text[self.scope_starts.pop(name) :]
        if self.run.symbolic and MARK_BEGIN in captured:
            captured = SymbolicValue("scope", name)
        self._set_result(name, captured, {})

    def _resolve_params(self, node: Gen) -> SamplingParams:
        merged = reasoning_sampling(node.reasoning, {**self.defaults, **node.overrides_dict()})
        stop_str = self.run.template.stop_str
        if self.cur_role == "assistant" and stop_str:
            stops = tuple(merged.get("stop") or ())
            merged["stop"] = stops + tuple(s for s in stop_str if s not in stops)
        return SamplingParams(**merged)

    def _execute_gen(self, node: Gen, tools: ToolRequest | None = None) -> GenerateResult | None:
        """Run a gen (``tools``: the tool-calling turn's request, see ``tool_interpreter``); returns the
        backend's result (None when tracing)."""
        params = self._resolve_params(node)
        if self.run.symbolic:
            placeholder = SymbolicValue("gen", node.name or "_")
            self._append(placeholder, "gen", node.name)
            if node.reasoning is not None and node.name is not None:
                self._set_result(reasoning_var(node.name), SymbolicValue("gen", reasoning_var(node.name)), {})
            self._set_result(node.name, placeholder, {"sampling_params": params.to_dict()})
            return None
        backend = self._backend()
        model_kwargs(backend, node.model, f"{'call_tools' if tools else 'gen'} {node.name!r}")  # refuse early
        top_logprobs_num = node.top_logprobs_num or self.run.top_logprobs_num
        return_logprob = node.return_logprob or self.run.return_logprob or top_logprobs_num > 0
        call = GenerateCall(self.text, params, return_logprob, top_logprobs_num, self.run.program_id, tools,
                            model=node.model)
        first_segment = len(self.segments)
        splitter = ReasoningStream(node.reasoning, self.text) if node.reasoning is not None else None
        start = time.monotonic()
        if self.run.stream:
            result = stream_gen(self, backend, call, node.name, splitter)
        else:
            result = backend.generate(call)
            self.raise_if_aborted()
            if splitter is not None:
                splitter.feed(result.text)
                splitter.finish()
                result = replace(result, text=splitter.content)
            self._append(result.text, "gen", node.name)
        latency = result.latency_s or (time.monotonic() - start)
        finish = result.finish_reason or {}
        if finish.get("type") == "abort":
            raise GenerationError(
                f"backend {backend.name!r} aborted gen {node.name!r}: {finish.get('message', 'no message')}"
            )
        value, output_meta = convert_gen_output(node, params, result, backend.name)  # dtype / JSON checks
        meta = {
            **result.meta,
            **output_meta,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cached_tokens": result.cached_tokens,
            "latency_s": latency,
            "output_token_logprobs": result.output_token_logprobs,
            "output_top_logprobs": result.output_top_logprobs,
            "sampling_params": params.to_dict(),
            "model": node.model,
        }
        record = CallRecord(
            "gen", node.name, result.prompt_tokens, result.completion_tokens, result.cached_tokens, latency,
            result.finish_reason, output_token_logprobs=result.output_token_logprobs,
            output_top_logprobs=result.output_top_logprobs, model=node.model,
        )
        self._record_call(record, first_segment)
        if splitter is not None and node.name is not None:
            self._set_result(reasoning_var(node.name), splitter.reasoning, {})
        self._set_result(node.name, value, meta)
        return result

    def _record_call(self, record: CallRecord, first_segment: int) -> None:
        """Add ``record`` to this state's calls and link the model text it produced to it."""
        with self.changed:
            self.calls.append(record)
            for seg in self.segments[first_segment:]:
                if seg.kind == record.kind:
                    seg.call = record

    def raise_if_aborted(self) -> None:
        """Raise the run's abort error if it was aborted (after a backend call returned)."""
        if self.run.abort_error is not None:
            raise self.run.abort_error

    def _refuse_media(self, node: Media) -> None:
        backend = self.run.backend
        model = getattr(backend, "model", None)
        where = "plait's backends serve" if backend is None else f"backend {backend.name!r}{f' ({model})' if model else ''} serves"
        raise BackendCapabilityError(
            f"{node.kind} input ({node.source}) is not supported by this model: {where} text-only models "
            f"through text prompts; remove the pl.{node.kind}(...) or describe its content in text"
        )

    def _execute_select(self, node: Select) -> None:
        method = node.choices_method
        if self.run.symbolic:
            placeholder = SymbolicValue("select", node.name or "_")
            self._append(placeholder, "select", node.name)
            self._set_result(node.name, placeholder, {"choices": list(node.choices), "method": method.name})
            return
        backend = self._backend()
        per_model = model_kwargs(backend, node.model, f"select {node.name!r}")
        start = time.monotonic()
        unconditional = method.requires_unconditional_logprobs
        scores = backend.score_choices(self.text, list(node.choices), unconditional=unconditional,
                                       program_id=self.run.program_id, **per_model)
        latency = time.monotonic() - start
        if len(scores) != len(node.choices):
            raise GenerationError(f"backend {backend.name!r} scored {len(scores)} of {len(node.choices)} choices")
        if unconditional and any(s.unconditional_token_logprobs is None for s in scores):
            raise BackendCapabilityError(
                f"backend {backend.name!r} did not return unconditional logprobs for select {node.name!r}; "
                "use choices_method='token_length_normalized' or a backend that scores without a prefix"
            )
        decision = method(scores)
        first_segment = len(self.segments)
        self._append(decision.decision, "select", node.name)
        meta = {**decision.meta_info, "latency_s": latency, "model": node.model}
        prompt_tokens = sum(s.prompt_tokens for s in scores)
        # the score the method compared: conditional minus unconditional, else the mean token logprob
        compared = meta.get("normalized_unconditional_prompt_logprobs", meta.get("normalized_prompt_logprobs"))
        record = CallRecord(
            "select", node.name, prompt_tokens, 0, sum(s.cached_tokens for s in scores), latency,
            choices=list(node.choices), choice_scores=None if compared is None else [float(x) for x in compared],
            chosen=decision.index, choices_method=method.name, model=node.model,
        )
        self._record_call(record, first_segment)
        self._set_result(node.name, decision.decision, meta)

    def _append_forks(self, forks: list[Executor]) -> None:
        for fork in forks:
            fork.sync()
            with fork.changed:
                new_segments = [s for s in segments_from(fork.segments, fork.fork_start)]
            for seg in new_segments:
                model_text = seg.kind in ("gen", "select")
                self._append(seg.text, seg.kind if model_text else "text", seg.name, seg.call if model_text else None)

    def _backend(self) -> Backend:
        assert self.run.backend is not None, "a non-symbolic run always has a backend"
        return self.run.backend


def _produced_names(node: Node) -> list[str]:
    """The variables executing ``node`` sets (a gen's reasoning variable too)."""
    if isinstance(node, (Gen, Select, VarScopeBegin, CallTools)) and node.name is not None:
        if isinstance(node, Gen) and node.reasoning is not None:
            return [node.name, reasoning_var(node.name)]
        return [node.name]
    return []
