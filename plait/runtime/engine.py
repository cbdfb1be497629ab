"""Engine: the runtime's front door.

``Engine(model=..., **settings)`` loads a model and runs a background loop thread that batches every
request submitted from any thread (continuous batching). ``generate`` / ``async_generate`` / streaming
return the same shape SGLang's Engine returns: ``{"text", "output_ids", "meta_info"}``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from plait.runtime.config import EngineConfig
from plait.runtime.constrained.healing import TokenHealer, new_detokenizer
from plait.runtime.constrained.limits import GrammarLimits
from plait.runtime.constrained.service import ConstrainedDecoding
from plait.runtime.engine_inputs import GenerateInput, normalize_inputs
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.executor.sampler import Sampler
from plait.runtime.executor.tensor_parallel import TensorParallelError, TensorParallelRanks
from plait.runtime.kvcache.pins import ProgramPins
from plait.runtime.kvcache.radix import RadixCache
from plait.runtime.models.registry import resolve_model
from plait.runtime.outputs import build_output
from plait.runtime.overlap import InFlightStep, keep_sampling, launch_sampling, overlappable, settle_first
from plait.runtime.relaxed import RelaxedValidation
from plait.runtime.request import Request, RequestStatus
from plait.runtime.scheduler import ScheduledItem, Scheduler
from plait.runtime.step import (
    build_forward_batch,
    finish_prompt_logprobs,
    record_prompt_logprobs,
    sample_next_tokens,
)
from plait.runtime.tokenizer import Tokenizer
from plait.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Engines not shut down yet. At interpreter exit they are shut down before Python finalizes: a loop thread
# still computing then (a program exiting with a stream open) would be killed inside torch's C++ code,
# which aborts the process ("terminate called without an active exception").
_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shutdown_live_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.shutdown()


# BudgetSteering's per-request counts -> the engine's totals (``Engine.stats``, /metrics): what keeping
# constrained outputs valid within max_new_tokens cost the engine thread
_STEERING_COUNTERS = {"searches": "budget_searches", "searches_without_ending": "budget_searches_without_ending",
                      "search_seconds": "budget_search_seconds", "reused": "budget_endings_reused",
                      "learned_reused": "budget_endings_learned"}


class _Handle:
    """Delivers a request's outputs from the engine thread to one waiting caller (thread or asyncio)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop
        self.queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def put(self, event: dict[str, Any]) -> None:
        if self.loop is None:
            self.queue.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            pass


class _CallbackSink:
    """Delivers a request's outputs to a callback (``Engine.submit``) instead of a queue."""

    def __init__(self, callback: Callable[[int, dict], None], index: int):
        self.callback, self.index = callback, index

    def put(self, event: dict[str, Any]) -> None:
        self.callback(self.index, event)


def _check_program_id(program_id: Any) -> None:
    if not isinstance(program_id, str):
        raise TypeError(f"program_id must be a str (the program run's id), got {type(program_id).__name__}")
    if not program_id:
        raise ValueError("program_id must be a non-empty str (the program run's id)")


MAX_CACHE_NAMESPACE_CHARS = 1024
# jump_forward_decode_min_batch's default where decode steps replay CUDA graphs: below this many decoding
# requests a forced run is computed in one extend (the request's own steps saved outweigh one eager step
# for a small batch), from it on inside the decode batch
JUMP_FORWARD_DECODE_MIN_BATCH = 8


def _check_cache_namespace(namespace: Any) -> None:
    if namespace is None:
        return
    if not isinstance(namespace, str):
        raise TypeError(f"cache_namespace must be a str or None, got {type(namespace).__name__}")
    if not namespace or len(namespace) > MAX_CACHE_NAMESPACE_CHARS:
        raise ValueError(f"cache_namespace must be a non-empty str of at most {MAX_CACHE_NAMESPACE_CHARS} "
                         f"characters (None: the default namespace), got {len(namespace)} characters")


class Engine:
    """An in-process LLM engine: radix prefix cache, continuous batching, chunked prefill. Thread-safe."""

    def __init__(self, model: str = "smollm2-135m-instruct", **settings: Any):
        self.config = EngineConfig.from_kwargs(model=model, **settings)
        torch.manual_seed(self.config.random_seed)
        source = resolve_model(self.config.model, self.config.load_format, self.config.tokenizer_path)
        self.model_source = source
        self.tokenizer = Tokenizer.from_dir(source.tokenizer_dir) if source.tokenizer_dir else None
        self.runner = self._build_runner(source)
        self.config = self.runner.config  # with the batch limits resolved for this model and device
        self.model_config = self.runner.model_config
        self.context_length = self.runner.context_length
        self.tree = RadixCache(self.runner.pool, disabled=self.config.disable_radix_cache)
        pin_budget = self.config.max_pinned_tokens_per_program
        self.pins = ProgramPins(self.tree, self.runner.pool.capacity // 4 if pin_budget is None else pin_budget)
        self.scheduler = Scheduler(self.config, self.runner.pool, self.runner.slot_table, self.tree, self.pins,
                                   forced_in_decode_min_batch=self._forced_in_decode_min_batch(),
                                   lora=self.runner.lora)
        self.sampler = Sampler(seed=self.config.random_seed)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        cfg = self.config
        self.constrained = ConstrainedDecoding(
            self.tokenizer, self.model_config.vocab_size, timeout_s=cfg.grammar_compile_timeout_s,
            workers=cfg.grammar_compile_workers,
            max_queued=cfg.grammar_compile_max_queued, cache_bytes=cfg.grammar_cache_bytes,
            limits=GrammarLimits(cfg.grammar_max_bytes, cfg.grammar_max_depth, cfg.grammar_max_rules),
        )
        if cfg.disable_budget_steering:
            self.constrained.budget_margin = None
        self.token_healing = TokenHealer(self.constrained)  # `.enabled = False` turns token healing off
        # requests under a relaxed JSON schema: validated (and resampled) off the engine thread when they finish
        self.relaxed = RelaxedValidation(self, cfg.grammar_relaxed_max_attempts)
        # requests whose grammar compiles (submit with on_admitted) are prepared here once it is done
        self._admission = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-admit")
        self._awaiting_grammar: dict[str, bool] = {}  # rid -> aborted, while its grammar compiles
        self._counters = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "finished": 0, "steps": 0,
                          "overlapped_steps": 0, **dict.fromkeys(_STEERING_COUNTERS.values(), 0)}
        self._inbox: list[tuple[str, Any]] = []
        self._cv = threading.Condition()
        self._active: set[str] = set()
        self._stopped = False
        self._dead = False
        overlap = self.config.enable_overlap
        self.overlap = self.runner.device.type == "cuda" if overlap is None else overlap
        if self._tp is not None:  # the other ranks need each step's token ids before it runs
            self.overlap = False
        self._inflight: InFlightStep | None = None
        self._thread = threading.Thread(target=self._loop, name="plait-engine", daemon=True)
        self._thread.start()
        _LIVE_ENGINES.add(self)

    def _build_runner(self, source: Any) -> ModelRunner:
        """This process's model runner: the whole model, or with ``tp_size`` > 1 rank 0's part, the other
        ranks started first (they build their parts alongside; a rank that fails fails the start)."""
        self._tp: TensorParallelRanks | None = None
        if self.config.tp_size == 1:
            return ModelRunner(self.config, source)
        self._tp = TensorParallelRanks(self.config, source)
        try:
            self._tp.start()
            runner = ModelRunner(self.config, source)
        except BaseException as exc:
            reason = self._tp.first_error(exc)
            self._tp.stop(graceful=False)
            raise TensorParallelError(f"tensor parallelism of {self.config.tp_size} could not start: {reason}") from exc
        self._tp.attach(runner)
        return runner

    def _forced_in_decode_min_batch(self) -> int | None:
        """``Scheduler.forced_in_decode_min_batch`` from ``jump_forward_decode_min_batch`` (None: never)."""
        value = self.config.jump_forward_decode_min_batch
        if value is None:
            value = JUMP_FORWARD_DECODE_MIN_BATCH if self.runner.cuda_graphs is not None else 0
        return value or None

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        sampling_params: dict | SamplingParams | Sequence[dict | SamplingParams] | None = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        *,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
        rid: str | Sequence[str] | None = None,
        stream: bool = False,
        program_id: str | None = None,
        cache_namespace: str | None = None,
        lora_path: str | Sequence[str | None] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (returns a dict) or a list (returns a list; ``n > 1`` flattens per prompt).

        With ``stream=True`` returns an iterator of cumulative snapshots; for a batch each carries ``index``.
        ``program_id``: the program run these requests belong to; what they cache stays pinned until
        ``end_program(program_id)`` (see ``begin_program``). ``cache_namespace``: requests share cached
        prefixes only with requests of the same namespace (None: the default one), so that tenants cannot
        probe each other's prompts through cache hits (SGLang's ``extra_key`` / ``cache_salt``).
        ``lora_path``: the name of a loaded LoRA adapter serving the request (a list: one per prompt, None
        for the base model), as SGLang's Engine takes it; an unknown name raises ``UnknownLoraError``
        (a ValueError) naming the loaded ones. KV computed under an adapter is cached apart.
        """
        gi = self._prepare(prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                           top_logprobs_num, return_text_in_logprobs, rid, stream, program_id, cache_namespace,
                           lora_path)
        handles = [_Handle() for _ in gi.requests]
        self._submit(gi.requests, handles)
        if stream:
            return self._stream_sync(gi, handles)
        try:
            outputs = [self._wait_final_sync(h) for h in handles]
        finally:  # e.g. KeyboardInterrupt while waiting
            self._abort_unfinished(gi.requests)
        return outputs if gi.is_batch else outputs[0]

    async def async_generate(
        self,
        prompt: str | Sequence[str] | None = None,
        sampling_params: dict | SamplingParams | Sequence[dict | SamplingParams] | None = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        *,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
        rid: str | Sequence[str] | None = None,
        stream: bool = False,
        program_id: str | None = None,
        cache_namespace: str | None = None,
        lora_path: str | Sequence[str | None] | None = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """Async ``generate``; with ``stream=True`` returns an async iterator of snapshots."""
        loop = asyncio.get_running_loop()
        # off the event loop: tokenizing and compiling a grammar (constrained decoding) may take a while
        gi = await loop.run_in_executor(None, lambda: self._prepare(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num,
            return_text_in_logprobs, rid, stream, program_id, cache_namespace, lora_path))
        handles = [_Handle(loop) for _ in gi.requests]
        self._submit(gi.requests, handles)
        if stream:
            return self._stream_async(gi, handles)
        outputs = []
        try:
            for h in handles:
                while True:
                    event = await self._get_event_async(h)
                    if event["finished"]:
                        outputs.append(event["output"])
                        break
        finally:  # e.g. the awaiting task was cancelled
            self._abort_unfinished(gi.requests)
        return outputs if gi.is_batch else outputs[0]

    def submit(
        self,
        prompt: str | Sequence[str] | None = None,
        sampling_params: dict | SamplingParams | Sequence[dict | SamplingParams] | None = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        *,
        on_output: Callable[[int, dict], None],
        on_admitted: Callable[[Exception | None], None] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
        rid: str | Sequence[str] | None = None,
        stream: bool = False,
        program_id: str | None = None,
        cache_namespace: str | None = None,
        stream_text: bool = True,
        lora_path: str | Sequence[str | None] | None = None,
    ) -> list[str]:
        """Queue requests without waiting: ``on_output(index, event)`` is called on the engine thread for
        each event of request ``index`` (``{"finished": bool, "output": dict}``; with ``stream`` one per
        step, else only the final one). Returns the request ids, in index order. For servers and other
        event-driven callers; ``on_output`` must return quickly and must not call back into the engine.
        Invalid arguments raise before anything is queued, as in ``generate`` (``cache_namespace`` too).

        ``on_admitted``: never wait for a grammar compilation. Arguments that can be checked at once
        still raise here; then ``submit`` returns at once and ``on_admitted(None)`` is called when the
        requests are queued, or ``on_admitted(error)`` (a ``ValueError`` such as ``ConstraintError``, or
        a ``RuntimeError`` when the engine stopped) when the constraint cannot be served: exactly once,
        possibly before ``submit`` returns, on this or another engine thread. It must return quickly.
        While a compile is pending ``submit`` returns ``[]`` (the ids are known once admitted), and
        ``abort(rid)`` with the ``rid`` given here cancels the admission (``on_admitted`` gets an error).

        ``stream_text=False`` (a caller that decodes streamed ids itself, as the server's HTTP process
        does): a streamed request is detokenized here only where the engine needs its text (stop
        strings, token healing); its streamed events then say ``"text": False`` and their output's
        text stays empty until the final event, which has the whole text as always.
        """
        if on_admitted is not None:  # parsed once: the admission checks and _prepare both read them
            sampling_params = self._parsed_sampling_params(sampling_params)
        args = (prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num,
                return_text_in_logprobs, rid, stream, program_id, cache_namespace, lora_path, stream_text)
        params_list = self._sampling_params_list(sampling_params) if on_admitted is not None else []
        pending = self._pending_grammars(params_list)
        if pending or self._start_plans_pending(params_list):
            self._admit_when_compiled(pending, args, on_output, on_admitted)
            return []
        # with on_admitted the caller must not block: start plans only from cached endings (see above)
        gi = self._prepare(*args, plan_search=on_admitted is None)
        sinks = [_CallbackSink(on_output, index) for index in range(len(gi.requests))]
        self._submit(gi.requests, sinks)
        if on_admitted is not None:
            on_admitted(None)
        return [req.rid for req in gi.requests]

    @staticmethod
    def _parsed_sampling_params(sampling_params: Any) -> Any:
        """``sampling_params`` with each dict parsed into ``SamplingParams`` (one or a list, the shape
        kept); items of another type are left for ``_prepare`` to refuse."""
        if isinstance(sampling_params, dict):
            return SamplingParams.from_dict(sampling_params)
        if isinstance(sampling_params, (list, tuple)):
            return [SamplingParams.from_dict(item) if isinstance(item, dict) else item for item in sampling_params]
        return sampling_params

    @staticmethod
    def _sampling_params_list(parsed: Any) -> list[SamplingParams]:
        """The ``SamplingParams`` of ``_parsed_sampling_params``' result (one or a list) as a list; items
        of a bad type are left out (``_prepare`` says so)."""
        items = [parsed] if isinstance(parsed, SamplingParams) else parsed if isinstance(parsed, (list, tuple)) else []
        return [params for params in items if isinstance(params, SamplingParams)]

    def _pending_grammars(self, params_list: list[SamplingParams]) -> list[Future]:
        """Compilations (started now if not cached) that the constraints of ``params_list`` still wait
        for, and those that already failed (the admission path reports their error; ``_prepare`` would
        compile them again, on the caller's thread). A constraint that is malformed or past the limits
        raises ``ConstraintError`` here."""
        futures = []
        for params in params_list:
            future = self.constrained.grammar_future(params)
            if future is not None and (not future.done() or future.exception() is not None):
                futures.append(future)
        return futures

    def _start_plans_pending(self, params_list: list[SamplingParams]) -> bool:
        """Whether a constrained request of ``params_list`` (compiled already) would search for its
        budget plan from the grammar's start state (``ConstrainedDecoding.start_plan_pending``): then it is
        prepared on the admission thread, not on the caller's."""
        return any(self.constrained.start_plan_pending(params) for params in params_list)

    def _admit_when_compiled(self, pending: list[Future], args: tuple, on_output: Callable[[int, dict], None],
                             on_admitted: Callable[[Exception | None], None]) -> None:
        """Prepare and queue the requests once every compilation in ``pending`` is done (none: at once),
        on the admission thread (token healing may build a grammar, a budget plan may search); report the
        outcome through ``on_admitted``."""
        rid = args[7]
        keys = [rid] if isinstance(rid, str) else list(rid) if isinstance(rid, (list, tuple)) else []
        with self._cv:
            for key in keys:
                self._awaiting_grammar[key] = False  # True once aborted
        remaining = [max(len(pending), 1)]  # nothing to wait for: admitted at once (below)
        lock = threading.Lock()

        def admit() -> None:
            with self._cv:
                aborted = any([self._awaiting_grammar.pop(key, False) for key in keys])
            failed = next((f.exception() for f in pending if f.exception() is not None), None)
            if aborted:
                on_admitted(RuntimeError("aborted while its grammar compiled"))
            elif failed is not None:  # reported as is: _prepare would compile it again
                on_admitted(failed if isinstance(failed, (ValueError, RuntimeError)) else RuntimeError(str(failed)))
            else:
                try:
                    gi = self._prepare(*args)
                    self._submit(gi.requests, [_CallbackSink(on_output, i) for i in range(len(gi.requests))])
                except (ValueError, TypeError, RuntimeError) as exc:
                    on_admitted(exc)
                    return
                on_admitted(None)

        def one_done(_: Future | None) -> None:  # on the compiler's thread: hand the rest to the admission thread
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                self._admission.submit(admit)
            except RuntimeError as exc:  # shut down
                on_admitted(exc)

        if not pending:
            one_done(None)
        for future in pending:
            future.add_done_callback(one_done)

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load the PEFT LoRA adapter in directory ``path`` under ``name`` (SGLang's and vLLM's
        ``load_lora_adapter``). It is read and checked against the base model on this thread, then
        registered between steps; requests may name it once this returns. Raises ``LoraAdapterError``
        (a ValueError: bad files, another base model, rank or count past the engine's LoRA settings),
        ValueError for a name already loaded, and RuntimeError when the engine has no LoRA buffers
        (start it with ``lora_paths`` or ``enable_lora=True``)."""
        from plait.runtime.lora import check_lora_name, read_adapter

        lora = self._lora_manager()
        check_lora_name(name)
        adapter = read_adapter(path)
        adapter = lora.to_host_layout(adapter)  # checked, converted and pinned off the engine thread
        error = self._call_engine_thread("load_lora", (name, adapter))
        if error is not None:
            raise error

    def unload_lora_adapter(self, name: str) -> None:
        """Unload adapter ``name``. Refused (ValueError) while a queued or running request uses it: this
        does not wait for them; ``UnknownLoraError`` for a name not loaded. Its cached KV is never
        served again (a later adapter of the same name is cached apart) and is evicted as usual."""
        lora = self._lora_manager()
        lora.get(name)
        error = self._call_engine_thread("unload_lora", (name, None))
        if error is not None:
            raise error

    def lora_adapters(self) -> dict[str, str]:
        """The loaded LoRA adapters: name -> path (empty without LoRA)."""
        lora = self.runner.lora
        return {} if lora is None else {name: a.path for name, a in lora.adapters.items()}

    def _lora_manager(self):
        if self.runner.lora is None:
            raise RuntimeError("this engine keeps no LoRA buffers: start it with lora_paths=... or enable_lora=True")
        if self._stopped or self._dead:
            raise RuntimeError("the engine has been shut down" if self._stopped else "the engine loop has died")
        return self.runner.lora

    def abort(self, rid: str) -> None:
        """Abort a request (waiting or running); it finishes with ``{"type": "abort"}``. Unknown ids are ignored."""
        with self._cv:
            if rid in self._awaiting_grammar:  # not queued yet: cancel its admission
                self._awaiting_grammar[rid] = True
        self.relaxed.abort(rid)  # a document being validated (relaxed schema) is not sampled again
        self._post("abort", rid)

    def begin_program(self, program_id: str) -> None:
        """A program run starts: from now on, what its requests cache stays resident (pinned) until
        ``end_program``. Optional: the first request carrying ``program_id`` opens the run as well.

        Pins are bounded per run (``max_pinned_tokens_per_program``) and give way under memory
        pressure (least recently used run first), so they never block other requests.
        """
        _check_program_id(program_id)
        if self._stopped or self._dead:
            raise RuntimeError("the engine has been shut down" if self._stopped else "the engine loop has died")
        self._call_engine_thread("begin_program", program_id)

    def end_program(self, program_id: str) -> None:
        """The program run ended: unpin everything it holds (it stays cached, evictable). Unknown ids
        and calls after shutdown are ignored."""
        _check_program_id(program_id)
        if not (self._stopped or self._dead):
            self._call_engine_thread("end_program", program_id)

    def _call_engine_thread(self, kind: str, payload: Any) -> Any:
        """Run command ``kind`` on the engine thread between steps and wait for its result."""
        done = _Handle()
        self._post(kind, (payload, done))
        return self._get_event(done)

    def flush_cache(self) -> bool:
        """Drop the prefix cache (and every program's pins). Returns False (and does nothing) while
        requests are in flight."""
        done = _Handle()
        self._post("flush", done)
        return self._get_event(done)

    def stats(self) -> dict[str, Any]:
        """Cache hit rate, running/waiting counts, KV slots in use, cumulative token and step counters, and
        budget steering's totals over finished requests (``budget_*``: searches, those without an ending,
        their seconds, endings reused, and of those the endings learned by the grammar's requests)."""
        pool, c = self.runner.pool, dict(self._counters)
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_slots_total": pool.capacity,
            "kv_slots_used": pool.num_used,
            "kv_slots_cached": self.tree.total_size(),
            "kv_slots_evictable": self.tree.evictable_size(),
            # hybrid KV pools (EngineConfig.disable_hybrid_swa_memory): the sliding-window layers' slots
            "kv_sliding_slots_total": pool.num_sliding_slots,
            "kv_sliding_slots_used": pool.num_sliding_slots - pool.num_sliding_free,
            "cache_hit_rate": c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0,
            "retractions": self.scheduler.num_retractions,
            "peak_running": self.scheduler.peak_running,
            "new_token_ratio": self.scheduler.new_token_ratio,
            "graph_steps": self.runner.graph_steps,  # of "steps": decode steps replayed from CUDA graphs
            # of "steps": prefill and mixed steps replayed from piecewise CUDA graphs (attention eager)
            "piecewise_graph_steps": self.runner.piecewise_graph_steps,
            **self._lora_stats(),
            **self.pins.stats(),
            **c,
        }

    def _lora_stats(self) -> dict[str, Any]:
        lora = self.runner.lora
        if lora is None:
            return {}
        return {"lora_loaded": len(lora.adapters), "lora_resident": len(lora.resident()),
                "lora_slot_loads": lora.slot_loads, "lora_offloads": lora.offloads}

    def shutdown(self) -> None:
        """Abort everything in flight, stop the loop thread and free the model's and KV cache's memory."""
        _LIVE_ENGINES.discard(self)
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=30)
        self.constrained.shutdown()  # pending compilations fail: their admissions report it
        self._admission.shutdown(wait=True)
        self.relaxed.shutdown()  # validations in progress deliver their requests
        if not self._thread.is_alive():
            if self._tp is not None:
                self._tp.stop()
            self.runner.release()  # the model and KV cache memory is free for the next engine

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ request intake
    def _prepare(self, prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                 top_logprobs_num, return_text_in_logprobs, rid, stream, program_id=None,
                 cache_namespace=None, lora_path=None, stream_text: bool = True,
                 plan_search: bool = True) -> GenerateInput:
        if self._stopped or self._dead:
            raise RuntimeError("the engine has been shut down" if self._stopped else "the engine loop has died")
        if program_id is not None:
            _check_program_id(program_id)
        _check_cache_namespace(cache_namespace)
        gi = normalize_inputs(self, prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                              top_logprobs_num, rid, plan_search, lora_path)
        for req in gi.requests:
            # a relaxed schema's document is validated before anything is sent: one (final) event
            req.stream = stream and req.relaxation is None
            req.stream_ids_only = req.stream and not stream_text
            req.program_id = program_id
            req.cache_namespace = cache_namespace
            if req.lora_name is not None:  # KV under an adapter is never shared with the base or another adapter
                adapter = self.runner.lora.get(req.lora_name)
                req.cache_namespace = ("lora", adapter.name, adapter.uid, cache_namespace)
            req.return_text_in_logprobs = return_text_in_logprobs
            self._attach_detokenizer(req)
        return gi

    def _attach_detokenizer(self, req: Request) -> None:
        """Incremental detokenization only where text is needed before the end (streams whose caller
        wants their text, stop strings, token healing: the healed text is left out); other requests
        decode once when they finish."""
        params = req.params
        streams_text = req.stream and not req.stream_ids_only
        if self.tokenizer is not None and (streams_text or params.stop or params.stop_regex or req.healed_text):
            req.detokenizer = new_detokenizer(
                self.tokenizer, req.prompt_ids, req.healed_text, stop=params.stop, stop_regex=params.stop_regex,
                skip_special_tokens=params.skip_special_tokens, no_stop_trim=params.no_stop_trim,
            )
        elif params.stop or params.stop_regex:
            raise ValueError("stop strings and stop_regex need a tokenizer; this model has none (use stop_token_ids)")

    def _requeue(self, req: Request) -> bool:
        """Queue ``req`` (the next attempt of a relaxed request whose id is still active) unless the engine
        stopped; from any thread. False when it was not queued."""
        with self._cv:
            if self._stopped or self._dead:
                return False
            self._inbox.append(("add", req))
            self._cv.notify()
        return True

    def _submit(self, requests: list[Request], handles: list[_Handle]) -> None:
        with self._cv:
            if self._dead:  # checked again under the lock: the loop may have ended since _prepare
                raise RuntimeError("the engine loop has died")
            dup = [r.rid for r in requests if r.rid in self._active]
            if dup or len({r.rid for r in requests}) < len(requests):
                raise ValueError(f"request id(s) already in use: {dup or [r.rid for r in requests]}")
            for req, handle in zip(requests, handles):
                req.on_output = handle.put
                self._active.add(req.rid)
                self._inbox.append(("add", req))
            self._cv.notify()

    def _post(self, kind: str, payload: Any) -> None:
        with self._cv:
            self._inbox.append((kind, payload))
            self._cv.notify()

    def new_rid(self) -> str:
        return uuid.uuid4().hex

    def _abort_unfinished(self, requests: list[Request]) -> None:
        """The caller stopped listening (closed a stream, cancelled, interrupted): stop generating for it."""
        for req in requests:
            if not req.finished:
                self.abort(req.rid)

    # ------------------------------------------------------------------ result delivery (caller side)
    def _get_event(self, handle: _Handle) -> dict:
        """Next event for a synchronous caller; raises if the engine loop is gone instead of hanging."""
        while True:
            try:
                return handle.queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the engine loop has stopped; see the log for its error") from None

    async def _get_event_async(self, handle: _Handle) -> dict:
        """Next event for an asyncio caller; raises like ``_get_event`` instead of hanging."""
        while True:
            try:
                return await asyncio.wait_for(handle.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if not self._thread.is_alive():
                    raise RuntimeError("the engine loop has stopped; see the log for its error") from None

    def _wait_final_sync(self, handle: _Handle) -> dict:
        while True:
            event = self._get_event(handle)
            if event["finished"]:
                return event["output"]

    def _stream_sync(self, gi: GenerateInput, handles: list[_Handle]) -> Iterator[dict]:
        try:
            if not gi.is_batch:
                while True:
                    event = self._get_event(handles[0])
                    yield event["output"]
                    if event["finished"]:
                        return
            merged: queue.Queue = queue.Queue()
            for i, h in enumerate(handles):
                threading.Thread(target=self._pump, args=(h, i, merged), daemon=True).start()
            remaining = len(handles)
            while remaining:
                index, event = merged.get()
                if isinstance(event, Exception):
                    raise event
                yield {**event["output"], "index": index}
                remaining -= event["finished"]
        finally:  # also when the caller closes the stream early
            self._abort_unfinished(gi.requests)

    def _pump(self, handle: _Handle, index: int, merged: queue.Queue) -> None:
        try:
            while True:
                event = self._get_event(handle)
                merged.put((index, event))
                if event["finished"]:
                    return
        except RuntimeError as exc:  # the engine loop is gone: the reader raises it
            merged.put((index, exc))

    async def _stream_async(self, gi: GenerateInput, handles: list[_Handle]) -> AsyncIterator[dict]:
        pending = {asyncio.ensure_future(self._get_event_async(h)): i for i, h in enumerate(handles)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    index = pending.pop(fut)
                    event = fut.result()
                    yield {**event["output"], "index": index} if gi.is_batch else event["output"]
                    if not event["finished"]:
                        pending[asyncio.ensure_future(self._get_event_async(handles[index]))] = index
        finally:  # also when the caller closes the stream early or is cancelled
            for fut in pending:
                fut.cancel()
            self._abort_unfinished(gi.requests)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException:
            logger.exception("the engine loop died")
            self._dead = True
            raise

    def _run_loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.scheduler.has_work() and not self._stopped:
                    self._cv.wait()
                commands, self._inbox = self._inbox, []
                stopped = self._stopped
            for kind, payload in commands:
                self._apply(kind, payload)
            if stopped:
                self._drain_inflight()
                for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(req, {"type": "abort", "message": "engine shut down"})
                self.pins.release_all()
                return
            if self.scheduler.has_work():
                self._step()
            if self._dead:  # _fail_everything: the engine cannot run steps any more
                return

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            if not self._lora_still_loaded(payload):
                return
            self._counters["prompt_tokens"] += len(payload.prompt_ids)
            if payload.program_id is not None:
                self.pins.open(payload.program_id)  # a program run opens implicitly on first use
            self.scheduler.add_request(payload)
            if payload.grammar is not None:  # text the grammar forces at the start is appended now
                self._jump_forward(payload, payload.prompt_ids[-1])
        elif kind == "abort":  # a request id, or the base id of an n > 1 group
            for req in self.scheduler.find_all(payload):
                self._finish(req, {"type": "abort", "message": "aborted"})
        elif kind == "flush":
            payload.put(self.scheduler.flush_cache())
        elif kind in ("load_lora", "unload_lora"):
            (name, adapter), done = payload
            try:
                if kind == "load_lora":
                    self.runner.lora.register(name, adapter)
                else:
                    self._unload_lora(name)
            except ValueError as exc:
                done.put(exc)
            else:
                done.put(None)
        elif kind in ("begin_program", "end_program"):
            program_id, done = payload
            (self.pins.open if kind == "begin_program" else self.pins.close)(program_id)
            done.put(None)
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def _lora_still_loaded(self, req: Request) -> bool:
        """A request's adapter may have been unloaded (or replaced) between its validation and its arrival
        here: it then ends with an abort naming the adapter instead of running on other weights."""
        if req.lora_name is None:
            return True
        adapter = self.runner.lora.adapters.get(req.lora_name)
        if adapter is not None and req.cache_namespace[2] == adapter.uid:
            return True
        req.status = RequestStatus.FINISHED
        req.finish_reason = {"type": "abort", "message": f"LoRA adapter {req.lora_name!r} was unloaded"}
        self._deliver_final(req)
        return False

    def _unload_lora(self, name: str) -> None:
        """On the engine thread: drop adapter ``name``, refused (ValueError) while a request uses it."""
        users = [r.rid for r in self.scheduler.running + self.scheduler.waiting if r.lora_name == name]
        self.runner.lora.get(name)  # unknown: UnknownLoraError
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {len(users)} queued or running request(s); "
                             "unload it once they finish")
        self.runner.lora.unregister(name)

    def _step(self) -> None:
        items = self.scheduler.schedule()
        for req in self.scheduler.drain_failed():
            self._deliver_final(req)
        if not items:
            self._drain_inflight()
            return
        self._counters["steps"] += 1
        if self.overlap and overlappable(items):
            self._run_overlapped(items)
            return
        if self._inflight is not None:  # this step needs its results at once: settle the previous one first
            self._drain_inflight()
            items = self._drop_finished(items)
            if not items:
                return
        self._run_sync(items)

    def _drop_finished(self, items: list[ScheduledItem]) -> list[ScheduledItem]:
        """Items whose request finished while they were being scheduled give their slots back."""
        keep = []
        for item in items:
            if item.req.status is RequestStatus.FINISHED:
                self.runner.pool.free(item.slots)
            else:
                keep.append(item)
        return keep

    def _fail_everything(self, exc: Exception) -> None:
        """The engine cannot go on (a tensor-parallel rank died): every request ends with ``exc``'s
        message, and the loop stops after this (the engine reports itself dead)."""
        logger.error("the engine stops: %s", exc)
        message = f"engine unavailable: {exc}"
        with self._cv:  # nothing is queued after this (_submit checks under the lock)
            self._dead = True
            commands, self._inbox = self._inbox, []
        for kind, payload in commands:  # queued requests are finished below; calls get their answers
            self._apply(kind, payload)
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            if req.status is not RequestStatus.FINISHED:
                self._finish(req, {"type": "abort", "message": message})

    def _fail_items(self, items: list[ScheduledItem], exc: Exception) -> None:
        """A step failed: its requests end with ``exc``; if a tensor-parallel rank died under it (a
        collective in the forward broke), every request ends naming the rank and the engine stops."""
        failure = self._tp.failure_behind(exc) if self._tp is not None else None
        if failure is not None:
            self._fail_everything(failure)
            return
        logger.exception("engine step failed")
        for item in items:
            if item.req.status is not RequestStatus.FINISHED:
                self._finish(item.req, {"type": "abort", "message": f"internal error: {exc!r}"})

    def _run_sync(self, items: list[ScheduledItem]) -> None:
        """Forward, sample and read the tokens back in one go."""
        try:
            batch, plan = build_forward_batch(items, self.runner)
            logits = self.runner.forward(batch)
            if plan.prompt_rows:
                record_prompt_logprobs(plan, logits)
            self.scheduler.complete(items)
            done_without_sampling = [it for it in plan.sample_items if it.req.params.max_new_tokens == 0]
            if done_without_sampling:
                keep = [k for k, it in enumerate(plan.sample_items) if it.req.params.max_new_tokens > 0]
                plan.sample_rows = [plan.sample_rows[k] for k in keep]
                plan.sample_items = [plan.sample_items[k] for k in keep]
            sampled = sample_next_tokens(plan, logits, self.sampler)
        except TensorParallelError as exc:  # a rank is gone: no step can run again
            self._fail_everything(exc)
            return
        except Exception as exc:  # a bug or bad state in one step must not take the engine down
            self._fail_items(items, exc)
            return
        finish_prompt_logprobs(items)
        for item in done_without_sampling:
            self._finish(item.req, {"type": "length", "length": 0})
        for req, token in sampled:
            self._append_token(req, token)

    def _run_overlapped(self, items: list[ScheduledItem]) -> None:
        """Launch this step, then settle the previous one while the device computes (see overlap.py).
        With constrained rows the previous step is settled before this step's sampling is launched:
        their masks need its tokens."""
        prev = self._inflight
        self._counters["overlapped_steps"] += 1
        try:
            batch, plan = build_forward_batch(items, self.runner, prev.next_ids if prev is not None else None)
            logits = self.runner.forward(batch)
            self.scheduler.complete(items)
            constrained = settle_first(plan)
            if not constrained:
                self._inflight = launch_sampling(plan, logits, self.sampler, self.model_config.vocab_size)
        except Exception as exc:  # a bug or bad state in one step must not take the engine down
            self._inflight = prev
            self._drain_inflight()
            self._fail_items(items, exc)
            return
        if not constrained:
            if prev is not None:
                self._settle(prev)
            return
        self._inflight = None
        later = self._settle_for_masks(prev) if prev is not None else []  # while the device runs the forward
        try:
            keep_sampling(plan)
            if plan.sample_items:
                self._inflight = launch_sampling(plan, logits, self.sampler, self.model_config.vocab_size)
        except Exception as exc:
            self._fail_items(items, exc)
        finally:
            self._apply_tokens(later)  # while the device samples

    def _settle(self, step: InFlightStep) -> None:
        """Read a launched step's tokens back and apply them (finish checks, detokenizing, streaming)."""
        self._apply_tokens(zip(step.reqs, step.read_back()))

    def _settle_for_masks(self, step: InFlightStep) -> list[tuple[Request, int]]:
        """Read a launched step's tokens back and apply those of constrained requests: the masks of the
        step being launched need their grammars moved on. Returns the other requests' (request, token)
        pairs, applied once the sampling is launched, so that their work overlaps the device's."""
        pairs = list(zip(step.reqs, step.read_back()))
        self._apply_tokens([pair for pair in pairs if pair[0].grammar is not None])
        return [pair for pair in pairs if pair[0].grammar is None]

    def _apply_tokens(self, pairs: Iterable[tuple[Request, int]]) -> None:
        """Apply each request's token from a step (a request that finished meanwhile drops it)."""
        for req, token in pairs:
            req.inflight -= 1
            if req.status is RequestStatus.FINISHED:
                continue  # finished (or aborted) while this token was computed: it is dropped
            self._append_token(req, token)

    def _drain_inflight(self) -> None:
        step, self._inflight = self._inflight, None
        if step is not None:
            self._settle(step)

    def _append_token(self, req: Request, token: int, jump_forward: bool = True) -> None:
        if jump_forward and req.grammar is not None and self._replaced_by_ending(req, token):
            return
        req.output_ids.append(token)
        self._counters["generated_tokens"] += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        params = req.params
        reason = None
        is_stop_token = token in req.eos_token_ids or token in params.stop_token_ids
        grammar_reason = None
        if req.grammar is not None and not is_stop_token:
            grammar_reason = req.grammar.accept_token(token)  # complete (stop) or refused (abort)
        detok = req.detokenizer
        if detok is not None and (not is_stop_token or params.no_stop_trim):
            detok.add(token)
            req.text = detok.emitted_text  # not detok.text: that includes a held-back start of a stop string
        if is_stop_token:
            reason = {"type": "stop", "matched": token}
        elif grammar_reason is not None:
            reason = grammar_reason
        elif detok is not None and detok.failure is not None:
            reason = {"type": "abort", "message": detok.failure}
        elif detok is not None and detok.stopped:
            reason = {"type": "stop", "matched": detok.matched_stop}
        elif len(req.output_ids) >= params.max_new_tokens:
            reason = {"type": "length", "length": params.max_new_tokens}
        elif req.total_len >= self.context_length:
            reason = {"type": "length", "length": len(req.output_ids)}
        if reason is not None:
            self._finish(req, reason)
            return
        if jump_forward and req.grammar is not None:
            self._jump_forward(req, token)
        if req.stream and req.on_output is not None and not req.finished:
            req.on_output(self._stream_event(req))

    def _budget(self, req: Request) -> int:
        """How many more tokens ``req`` may append (``max_new_tokens``, the context length)."""
        return min(req.params.max_new_tokens - len(req.output_ids), self.context_length - req.total_len)

    def _jump_forward(self, req: Request, prev_token: int) -> None:
        """Append the tokens the grammar forces next, or the ending that fits the token budget when it is
        about to run out (no sampling; their KV is computed in one extend). After forced tokens the
        ending is checked again (the state moved), without forcing more."""
        grammar = req.grammar
        tokens = grammar.forced_tokens(prev_token, self._budget(req))
        self._append_forced(req, tokens, grammar.closing)
        if tokens and not grammar.closing and grammar.steering is not None and not req.finished:
            self._append_forced(req, grammar.forced_tokens(tokens[-1], self._budget(req), jump=False), True)

    def _append_forced(self, req: Request, tokens: list[int], closing: bool) -> None:
        """Append tokens chosen without sampling: jump-forward's, or an ending for the budget (``closing``)."""
        grammar = req.grammar
        for token in tokens:
            if closing:
                grammar.closing_count += 1
            else:
                grammar.forced_count += 1
            req.stream, stream = False, req.stream  # one snapshot for the whole jump, not one per token
            try:
                self._append_token(req, token, jump_forward=False)
            finally:
                req.stream = stream
            if req.finished:
                return

    def _replaced_by_ending(self, req: Request, token: int) -> bool:
        """Near the end of the token budget, a sampled token after which no ending of the grammar fits is
        not appended: the ending that fits is, instead (``BudgetSteering.vet``). True if so."""
        if token in req.eos_token_ids or token in req.params.stop_token_ids:
            return False
        ending = req.grammar.ending_instead_of(token, self._budget(req))
        if ending is None:
            return False
        # overlap scheduling may have computed the KV of ``token`` at its position already: forget it
        self.scheduler.rewind(req, req.total_len)
        if req.return_logprob and req.output_token_logprobs and req.output_token_logprobs[-1][1] == token:
            req.output_token_logprobs.pop()  # recorded when it was sampled; it is not in the output
            req.output_top_logprobs.pop()
        self._append_forced(req, ending, closing=True)
        if req.stream and req.on_output is not None and not req.finished:
            req.on_output(self._stream_event(req))
        return True

    def _stream_event(self, req: Request) -> dict[str, Any]:
        """A streamed (not final) snapshot of ``req``; ``"text"`` says whether its output's text is the
        text streamed so far (False: a ``stream_text=False`` stream without a detokenizer here, whose
        caller decodes the ids itself)."""
        return {"finished": False, "output": build_output(req, self.tokenizer),
                "text": not req.stream_ids_only or req.detokenizer is not None}

    def _finish(self, req: Request, reason: dict[str, Any]) -> None:
        self.scheduler.finish(req, reason)
        self._deliver_final(req)

    def _deliver_final(self, req: Request) -> None:
        req.finished_at = time.perf_counter()
        steering = req.grammar.steering if req.grammar is not None else None
        if steering is not None:  # budget steering's work for this request, into the engine's totals
            for attribute, counter in _STEERING_COUNTERS.items():
                self._counters[counter] += getattr(steering, attribute)
        if req.detokenizer is not None and not req.detokenizer.stopped:
            req.detokenizer.finish()
        if req.detokenizer is not None:
            req.text = req.detokenizer.text
        elif self.tokenizer is not None:
            ids = req.output_ids
            matched = (req.finish_reason or {}).get("matched")
            if isinstance(matched, int) and ids and ids[-1] == matched and not req.params.no_stop_trim:
                ids = ids[:-1]  # a stop token is not part of the text
            req.text = self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)
        if req.relaxation is not None:
            self.relaxed.hold(req)  # validated off this thread; delivered (or sampled again) from there
            return
        self._emit_final(req)

    def _emit_final(self, req: Request) -> None:
        """Count ``req`` finished and send its final event (the engine thread, or the validation thread
        for a relaxed schema's request)."""
        with self._cv:  # two threads may count here
            self._counters["finished"] += 1
            self._counters["cached_tokens"] += req.cached_tokens
            self._active.discard(req.rid)
        if req.on_output is not None:
            req.on_output({"finished": True, "output": build_output(req, self.tokenizer)})

