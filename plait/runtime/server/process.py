"""The engine process, the detokenizer process and the pipes between them and the HTTP process.

``plait serve`` runs the engine loop in a child process (``run_engine_process``) so that parsing,
tokenizing and streaming in the HTTP process never take the GIL from the scheduler, and (by default)
makes streamed text in a third process (``run_detokenizer_process``), as SGLang's DetokenizerManager
does, so that neither the engine thread nor the HTTP event loop spends its time decoding tokens::

    HTTP process --(commands: pipe A)--> engine process --(outputs: pipe B)--> detokenizer --(pipe C)--> HTTP

- HTTP -> engine (A): ``("generate", rid, spec)``, ``("abort", rid)``, ``("call", call_id, name, arg)``
  where ``name`` is ``flush_cache``, ``stats``, ``begin_program``, ``end_program``,
  ``load_lora_adapter`` (arg: (name, path)), ``unload_lora_adapter`` (arg: name) or ``shutdown``.
- engine -> HTTP (B, then C): lists of ``("accepted", rid)`` or ``("error", rid, message)`` (the answer
  to ``generate``), ``("out", rid, index, finished, payload)`` and ``("reply", call_id, ok, value)``.
  Outputs produced in one engine step travel as one list. The detokenizer forwards every message in
  order; it only adds text to streamed payloads (below), and its last list is ``[("ended", reason)]``
  once the engine's pipe closes (a detokenizer that dies says nothing). Without a detokenizer process
  the engine's outputs come back over A.

A streamed request's payloads are deltas (new output ids, new logprob entries, new text), so a long
stream costs O(tokens) over the pipes, not O(tokens^2); the final payload carries the full text.
Prompts arrive tokenized (the HTTP process tokenizes) and logprob entries leave without token text
(the HTTP process adds it), which keeps tokenizer work off the engine process. So does streamed text:
with a detokenizer process the HTTP process asks (``"detokenize_in_front"``) for streams whose
payloads carry ids only; the engine then first sends ``("decode", rid, prompt_tail,
skip_special_tokens, outputs)`` (consumed by the detokenizer, which keeps one ``IncrementalDetokenizer``
per output) and the detokenizer adds each payload's ``text_delta``. The engine still detokenizes a
stream where it needs the text itself (stop strings, token healing) and then sends ``text_delta``
itself; every final payload has the engine's full text.

A streamed sample's first output (its time to first token) also takes a shortcut when the engine is
not busy sending: the engine thread decodes its text and writes it straight to the HTTP process over
A, besides the usual copy through the detokenizer (one hop fewer: about 0.4 ms a first token on an
H200 host). Both copies carry ``payload["first"] = True``; the HTTP process delivers whichever arrives
first and drops the other (``EngineClient._dispatch``), so later outputs, which all come through the
detokenizer behind its copy, can never overtake the first, and the two texts are the same (one
``IncrementalDetokenizer`` algorithm over the same prompt tail and ids).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.spawn import start_process
from plait.runtime.tokenizer import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer

logger = logging.getLogger(__name__)

# Python hands the GIL to a thread that waits for it only when the holder blocks, or after this long
# (its default: 5 ms). The server's hand-over threads wait on busy ones: the engine process's sender on
# the engine thread (which goes on to build and launch the next step), the HTTP process's reader on
# the event loop. On an H200 host the first token took 0.33 ms to reach the sender, and a token could
# wait up to the default's 5 ms on a busy loop (2026-12-02, RESULTS.md). Both processes are plait's own.
SWITCH_INTERVAL_S = 0.00025


def use_server_switch_interval() -> None:
    """Set this process's GIL switch interval to ``SWITCH_INTERVAL_S`` (the engine and HTTP processes)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs")
_OUTPUT_KEYS = ("output_token_logprobs", "output_top_logprobs")
_INPUT_KEYS = ("input_token_logprobs", "input_top_logprobs")
_LOGPROB_KEY_SET = frozenset(LOGPROB_KEYS)


class EngineUnavailableError(RuntimeError):
    """The engine process is not running (failed to start, died, or is shutting down)."""


class EngineRequestError(ValueError):
    """The engine refused a request (bad input it detected); the message says why."""


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP process needs to know about the engine it fronts."""

    model: str
    tokenizer_dir: str | None
    context_length: int
    max_prompt_tokens: int  # longest prompt the KV cache and context accept
    vocab_size: int
    kv_slots_total: int
    config: dict[str, Any]
    supports_program_id: bool


@dataclass
class EngineEvent:
    """One output of one (sub-)request, as the HTTP side sees it.

    ``text`` is cumulative, ``text_delta`` what this event added; ``output_ids`` and the logprob lists in
    ``meta_info`` are what this event added (all of them for a request that was not streamed).
    """

    index: int
    text: str
    text_delta: str
    output_ids: list[int]
    meta_info: dict[str, Any]
    finished: bool


# ---------------------------------------------------------------------------------------- engine side
# a stream of more outputs than this (n > 1) sends its first outputs through the detokenizer only
DIRECT_FIRST_MAX_OUTPUTS = 8


class _Forwarder:
    """Stands in for the engine's per-request handle: turns each snapshot into a delta on the outbox.

    ``put`` runs on the engine thread (or, for a relaxed JSON schema, its validation thread), so it only
    slices lists and appends to the outbox.
    """

    def __init__(self, outbox: _Outbox, rid: str, index: int, first_text: Any = None):
        """``first_text``: for a stream decoded in front, an ``IncrementalDetokenizer`` made for this
        output (off the engine thread) that gives the first output's text for the direct copy."""
        self.outbox, self.rid, self.index = outbox, rid, index
        self.first_text = first_text
        self.sent_ids = 0
        self.sent_out_logprobs = 0
        self.sent_first = False  # the first output (the one carrying input logprobs) has gone
        self.sent_text = 0

    def put(self, event: dict[str, Any]) -> None:
        out, finished = event["output"], event["finished"]
        ids, meta, text = out["output_ids"], out["meta_info"], out["text"]
        # copied: the sender thread pickles it later; without logprobs (most outputs) nothing to slice
        meta = dict(meta) if _LOGPROB_KEY_SET.isdisjoint(meta) else self._logprob_deltas(meta)
        payload = {"output_ids": ids[self.sent_ids:], "meta_info": meta}
        if finished:
            payload["text"] = text
        elif event.get("text", True):  # else the detokenizer process decodes the ids (stream_text=False)
            payload["text_delta"] = text[self.sent_text:]
        self.sent_ids, self.sent_text = len(ids), len(text)
        message = ("out", self.rid, self.index, finished, payload)
        if self.sent_first:
            self.outbox.put(message)
            return
        self.sent_first = True  # this sample's first output: its time to first token
        payload["first"] = True  # the HTTP process keeps one of the (up to) two copies
        self.outbox.put(message, urgent=True, direct=self._direct_copy(message) if self.outbox.direct else None)

    def _logprob_deltas(self, snapshot_meta: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``snapshot_meta`` whose logprob lists hold only what this output adds."""
        meta = dict(snapshot_meta)
        for key in _OUTPUT_KEYS:
            if key in meta:
                meta[key] = meta[key][self.sent_out_logprobs:]
        for key in _INPUT_KEYS:
            if key in meta and self.sent_first:
                meta[key] = []
        if "output_token_logprobs" in meta:  # SGLang's running count, as streamed entries are deltas
            meta["output_token_logprobs_length"] = self.sent_out_logprobs + len(meta["output_token_logprobs"])
        self.sent_out_logprobs += len(meta.get("output_token_logprobs", ()))
        return meta

    def _direct_copy(self, message: tuple) -> tuple | None:
        """The first output as the HTTP process needs it without the detokenizer: with its text."""
        payload = message[4]
        if "text" in payload or "text_delta" in payload:  # finished, or decoded by the engine already
            return message
        if self.first_text is None:
            return None
        add = self.first_text.add
        direct = {**payload, "text_delta": "".join([add(token) for token in payload["output_ids"]])}
        self.first_text = None  # one use: the detokenizer's own copy goes on from here
        return (*message[:4], direct)


def merge_outputs(messages: list[tuple]) -> tuple:
    """One ``("out", rid, index, finished, payload)`` message standing for consecutive ones of the same
    sample (only the last may be finished), built in one pass: ids, text and output logprob entries are
    their deltas joined; input logprobs come from the first (later messages carry none); the rest
    (counts, finish reason) is the last's."""
    if len(messages) == 1:
        return messages[0]
    _, rid, index, finished, last = messages[-1]
    payloads = [message[4] for message in messages]
    metas = [payload["meta_info"] for payload in payloads]
    meta = dict(last["meta_info"])
    for key in _OUTPUT_KEYS:
        if any(key in m for m in metas):
            meta[key] = [entry for m in metas for entry in m.get(key, ())]
    for key in _INPUT_KEYS:
        if metas[0].get(key):
            meta[key] = metas[0][key]
    merged = {"output_ids": [token for payload in payloads for token in payload["output_ids"]], "meta_info": meta}
    if finished:
        merged["text"] = last["text"]
    elif "text_delta" in last:  # (none of them has one where the HTTP process decodes the ids)
        merged["text_delta"] = "".join(payload["text_delta"] for payload in payloads)
    return ("out", rid, index, finished, merged)


class _Outbox:
    """Messages to the HTTP process; a sender thread ships whatever has piled up as one list.

    ``put(item, urgent=True)`` (a request's first output: its time to first token) ships ``item`` on the
    caller's thread when nothing waits or is being sent, instead of waking the sender thread: that
    thread needs the GIL, which the engine thread holds while it builds the next step (0.33 ms on an
    H200 host before the sender got it). Order is kept: with anything pending the item queues behind it.
    """

    def __init__(self, conn: Any, direct: Any = None):
        """``direct``: the HTTP process's own pipe, where a first output's copy may go (the module's
        docstring) when ``conn`` leads to the detokenizer; None otherwise."""
        self.conn, self.direct = conn, direct
        self.items: list[tuple] = []
        self.cv = threading.Condition()
        self.closed = False
        self.sending = False  # a thread is writing to the pipe: others queue behind it
        self.thread = threading.Thread(target=self._run, name="plait-engine-sender", daemon=True)
        self.thread.start()

    def put(self, item: tuple, urgent: bool = False, direct: tuple | None = None) -> None:
        """Queue ``item`` (or, urgent and idle, send it now). ``direct``: a copy of an urgent item for
        the HTTP process's own pipe, written on this thread when idle, while ``item`` itself goes the
        usual way (queued for the sender thread)."""
        with self.cv:
            if not urgent or self.items or self.sending or self.closed:
                self.items.append(item)
                self.cv.notify()
                return
            if direct is not None and self.direct is not None:
                self.items.append(item)
                self.cv.notify()
            else:
                self.sending = True
        if direct is not None and self.direct is not None:
            with contextlib.suppress(OSError, EOFError):  # the HTTP process is gone: the sender finds out
                self.direct.send([direct])
            return
        self._send([item])

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def _send(self, batch: list[tuple]) -> bool:
        """Write ``batch`` (this thread has set ``sending``); False once the HTTP side is gone."""
        try:
            self.conn.send(batch)
            return True
        except (OSError, EOFError):  # the HTTP process is gone
            return False
        finally:
            with self.cv:
                self.sending = False
                self.cv.notify()

    def _run(self) -> None:
        while True:
            with self.cv:
                while self.sending or (not self.items and not self.closed):
                    self.cv.wait()
                batch, self.items = self.items, []
                closed = self.closed
                self.sending = bool(batch)
            if batch and not self._send(batch):
                return
            if closed:
                return


class _EngineServer:
    """Runs in the engine process: applies commands from the pipe to one ``Engine``."""

    def __init__(self, engine: Any, conn: Any, out_conn: Any = None):
        """Commands come over ``conn``; outputs leave over ``out_conn`` (the detokenizer process's pipe)
        or, without one, over ``conn``."""
        self.engine, self.conn = engine, conn
        self.outbox = _Outbox(out_conn if out_conn is not None else conn, direct=conn if out_conn is not None else None)
        self.supports_program_id = hasattr(engine, "end_program")

    def info(self) -> EngineInfo:
        engine = self.engine
        capacity = engine.runner.pool.capacity
        tokenizer_dir = engine.model_source.tokenizer_dir
        return EngineInfo(
            model=engine.config.model,
            tokenizer_dir=str(tokenizer_dir) if tokenizer_dir is not None else None,
            context_length=engine.context_length,
            max_prompt_tokens=min(engine.context_length, capacity) - 1,
            vocab_size=engine.model_config.vocab_size,
            kv_slots_total=capacity,
            config={k: v for k, v in vars(engine.config).items()},
            supports_program_id=self.supports_program_id,
        )

    def serve(self) -> None:
        """Apply commands until ``shutdown`` or until the HTTP process goes away."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                logger.warning("the HTTP process went away; shutting the engine down")
                self.engine.shutdown()
                return
            kind = message[0]
            if kind == "generate":
                self._generate(message[1], message[2])
            elif kind == "abort":
                self.engine.abort(message[1])
            elif kind == "call":
                if message[2] == "shutdown":
                    self.engine.shutdown()
                    self.outbox.put(("reply", message[1], True, None))
                    self.outbox.close()
                    return
                # flush / begin / end wait for the engine thread: never block the command loop on them
                threading.Thread(target=self._call, args=message[1:], daemon=True).start()

    def _generate(self, rid: str, spec: dict[str, Any]) -> None:
        extra = {"program_id": spec["program_id"]} if spec.get("program_id") is not None else {}
        if extra and not self.supports_program_id:
            self.outbox.put(("error", rid, "program_id is not supported by this engine"))
            return
        if spec.get("cache_namespace") is not None:
            extra["cache_namespace"] = spec["cache_namespace"]
        if spec.get("lora_path") is not None:
            extra["lora_path"] = spec["lora_path"]
        first_texts: dict[int, IncrementalDetokenizer] = {}  # the direct first outputs' text, per output
        if spec.get("detokenize_in_front"):  # the detokenizer process makes this stream's text: its context
            params = spec["sampling_params"] or {}
            context = list(spec["input_ids"][-PROMPT_CONTEXT_TOKENS:])
            skip_special_tokens = bool(params.get("skip_special_tokens", True))
            outputs = int(spec.get("outputs", 1))
            self.outbox.put(("decode", rid, context, skip_special_tokens, outputs))
            tokenizer = getattr(self.engine, "tokenizer", None)
            if tokenizer is not None and outputs <= DIRECT_FIRST_MAX_OUTPUTS:  # made off the engine thread
                first_texts = {i: IncrementalDetokenizer(tokenizer, context,
                                                         skip_special_tokens=skip_special_tokens)
                               for i in range(outputs)}
        forwarders: dict[int, _Forwarder] = {}  # one per request of this rid (n > 1 or a batch make several)

        def on_output(index: int, event: dict[str, Any]) -> None:  # the engine thread (or its validation thread)
            forwarder = forwarders.get(index)
            if forwarder is None:
                forwarder = forwarders[index] = _Forwarder(self.outbox, rid, index, first_texts.pop(index, None))
            forwarder.put(event)

        def on_admitted(error: Exception | None) -> None:  # never waits for a grammar compile
            if error is None:
                self.outbox.put(("accepted", rid))
            elif isinstance(error, (ValueError, TypeError)):
                self.outbox.put(("error", rid, str(error)))
            else:
                self.outbox.put(("error", rid, f"engine unavailable: {error}"))

        try:
            self.engine.submit(
                input_ids=spec["input_ids"], sampling_params=spec["sampling_params"], on_output=on_output,
                return_logprob=spec["return_logprob"], logprob_start_len=spec["logprob_start_len"],
                top_logprobs_num=spec["top_logprobs_num"], rid=rid, stream=spec["stream"],
                stream_text=not spec.get("detokenize_in_front", False), on_admitted=on_admitted, **extra,
            )
        except (ValueError, TypeError) as exc:
            self.outbox.put(("error", rid, str(exc)))
        except RuntimeError as exc:  # the engine is shut down or its loop died
            self.outbox.put(("error", rid, f"engine unavailable: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a bug in one request's path must not end the command loop
            logger.exception("request %s: unexpected error while submitting", rid)
            self.outbox.put(("error", rid, f"the engine could not take this request: {type(exc).__name__}: {exc}"))

    def _call(self, call_id: int, name: str, arg: Any) -> None:
        try:
            if name == "flush_cache":
                value = self.engine.flush_cache()
            elif name == "stats":
                value = self.engine.stats()
            elif name in ("begin_program", "end_program") and self.supports_program_id:
                value = getattr(self.engine, name)(arg)
            elif name == "load_lora_adapter":
                value = self.engine.load_lora_adapter(*arg)
            elif name == "unload_lora_adapter":
                value = self.engine.unload_lora_adapter(arg)
            else:
                raise ValueError(f"unknown engine call {name!r}")
            self.outbox.put(("reply", call_id, True, value))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, who turns it into an HTTP error
            self.outbox.put(("reply", call_id, False, f"{type(exc).__name__}: {exc}"))


def run_engine_process(conn: Any, model: str, settings: dict[str, Any], log_level: str,
                       out_conn: Any = None) -> None:
    """Entry point of the engine process: build the engine, report ``ready`` (or ``failed``), serve.

    With ``out_conn`` (the detokenizer process's pipe) outputs leave there, after a first
    ``("tokenizer", dir)`` message that tells the detokenizer which tokenizer to load.
    SIGINT and SIGTERM are ignored here: the HTTP process drains requests and then tells the engine
    to shut down; if the HTTP process dies, the closed pipe ends this process too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    use_server_switch_interval()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s plait-engine %(levelname)s %(message)s")
    try:
        from plait.runtime.engine import Engine

        engine = Engine(model=model, **settings)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prints it and exits
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    engine.constrained.warm_up()  # compile workers start now, not on the first constrained request
    server = _EngineServer(engine, conn, out_conn)
    info = server.info()
    if out_conn is not None:
        server.outbox.put(("tokenizer", info.tokenizer_dir))
    conn.send(("ready", info))
    server.serve()
    # Shut down, every reply sent: skip the interpreter's teardown (joining the engine's thread pools,
    # unloading torch), a second or more that only delays the server's exit.
    logging.shutdown()
    os._exit(0)


# ------------------------------------------------------------------------------------ detokenizer side
# streams the detokenizer keeps at most (each ends when its outputs finish or the engine refuses it;
# past this many the oldest is dropped, which can only happen if the engine lost track of requests)
DETOKENIZER_MAX_STREAMS = 65536
# a stream's detokenizers made when it registers (the rest at their first output): making one costs
# 0.17 ms on a development VM after an idle gap (cold caches), which a first token should not wait for
_EAGER_DETOKENIZERS = 8
# messages the detokenizer takes from its pipe before forwarding them as one list
_DETOKENIZER_BATCH = 4096
DETOKENIZER_START_TIMEOUT_S = 120.0  # after the engine is ready: importing and loading the tokenizer


class _DecodedStream:
    """One streamed request (all its outputs) whose text the detokenizer makes."""

    __slots__ = ("context", "skip_special_tokens", "outputs", "detokenizers")

    def __init__(self, context: list[int], skip_special_tokens: bool, outputs: int):
        self.context, self.skip_special_tokens, self.outputs = context, skip_special_tokens, outputs
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}


class StreamDecoder:
    """The detokenizer process's work, apart from its pipes (so that it can be tested in one process).

    ``process`` takes one list of engine messages and returns the list to forward: ``("decode", ...)``
    messages register a stream and are consumed; every streamed payload of a registered stream that has
    no ``text_delta`` (the engine did not decode it) gets one, made by the output's own
    ``IncrementalDetokenizer`` (the prompt's tail as context); everything else passes unchanged.
    """

    def __init__(self, tokenizer: Any, max_streams: int = DETOKENIZER_MAX_STREAMS):
        self.tokenizer, self.max_streams = tokenizer, max_streams
        self.streams: OrderedDict[str, _DecodedStream] = OrderedDict()
        self.dropped = 0  # streams dropped at the bound (each one's later payloads arrive without text)

    def process(self, batch: list[tuple]) -> list[tuple]:
        forward = []
        for message in batch:
            kind = message[0]
            if kind == "decode":
                _, rid, context, skip_special_tokens, outputs = message
                stream = self.streams[rid] = _DecodedStream(context, skip_special_tokens, outputs)
                for index in range(min(outputs, _EAGER_DETOKENIZERS)):  # now, not on the first token's path
                    stream.detokenizers[index] = self._detokenizer(stream)
                if len(self.streams) > self.max_streams:
                    self.streams.popitem(last=False)
                    self.dropped += 1
                    logger.warning("the detokenizer holds more than %d streams: the oldest was dropped",
                                   self.max_streams)
                continue
            if kind == "out":
                stream = self.streams.get(message[1])
                if stream is not None:
                    self._decode(message, stream)
            elif kind == "error":
                self.streams.pop(message[1], None)
            forward.append(message)
        return forward

    def _detokenizer(self, stream: _DecodedStream) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, stream.context, skip_special_tokens=stream.skip_special_tokens)

    def _decode(self, message: tuple, stream: _DecodedStream) -> None:
        _, rid, index, finished, payload = message
        if finished:
            stream.detokenizers.pop(index, None)
            stream.outputs -= 1
            if stream.outputs <= 0:
                del self.streams[rid]
            return
        if "text_delta" in payload:  # the engine decoded this one (stop strings, token healing)
            return
        detokenizer = stream.detokenizers.get(index)
        if detokenizer is None:
            detokenizer = stream.detokenizers[index] = self._detokenizer(stream)
        add = detokenizer.add
        payload["text_delta"] = "".join([add(token) for token in payload["output_ids"]])


def preload_tokenizer_modules() -> None:
    """Import what loading a tokenizer needs (transformers' ``AutoTokenizer`` pulls in its config
    machinery and torch: 2-3 s of CPU), so that it overlaps the engine's start instead of following
    it. ``import transformers`` alone is lazy and imports none of that."""
    with contextlib.suppress(ImportError):
        importlib.import_module("transformers").AutoTokenizer  # noqa: B018 - the attribute access imports
        importlib.import_module("plait.runtime.tokenizer")


def run_detokenizer_process(engine_conn: Any, http_conn: Any, log_level: str) -> None:
    """Entry point of the detokenizer process: forward the engine's messages to the HTTP process,
    adding streamed text (``StreamDecoder``), until the engine's pipe closes.

    The engine's first message names the tokenizer; the HTTP process gets ``("ready",)`` once it is
    loaded (or ``("failed", message)``) before any forwarded list. Signals are ignored, as in the engine
    process: the engine's shutdown closes the pipe, which ends this process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s plait-detokenizer %(levelname)s %(message)s")
    preload_tokenizer_modules()  # while the engine loads its weights
    decoder: StreamDecoder | None = None
    try:
        while True:
            try:
                batch = engine_conn.recv()
                while len(batch) < _DETOKENIZER_BATCH and engine_conn.poll():
                    batch.extend(engine_conn.recv())
            except (EOFError, OSError):  # the engine process is gone (or shut down): say so, then end
                http_conn.send([("ended", "the engine process exited")])
                return
            if decoder is None:
                if not batch or batch[0][0] != "tokenizer":
                    http_conn.send(("failed", f"unexpected first message from the engine: {batch[:1]!r}"))
                    return
                decoder = _start_decoder(batch.pop(0)[1], http_conn)
                if decoder is None:
                    return
            forward = decoder.process(batch)
            if forward:
                http_conn.send(forward)
    except (OSError, EOFError):  # the HTTP process is gone
        return
    finally:
        http_conn.close()


def _start_decoder(tokenizer_dir: str | None, http_conn: Any) -> StreamDecoder | None:
    """Load the engine's tokenizer and tell the HTTP process (``ready`` or ``failed``)."""
    tokenizer = None
    if tokenizer_dir is not None:
        try:
            from plait.runtime.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(tokenizer_dir)
        except Exception as exc:  # noqa: BLE001 - reported to the HTTP process, which fails its start
            http_conn.send(("failed", f"the detokenizer could not load the tokenizer: {type(exc).__name__}: {exc}"))
            return None
    http_conn.send(("ready",))
    return StreamDecoder(tokenizer)


# ------------------------------------------------------------------------------------------ HTTP side
@dataclass
class _Pending:
    queue: asyncio.Queue
    expected: int  # outputs still to finish (n of them for an ``n > 1`` request)
    texts: dict[int, str] = field(default_factory=dict)
    accepted: bool = False  # the engine's answer to ``generate`` has been queued
    early: list = field(default_factory=list)  # outputs (direct first copies) that overtook the answer
    firsts: set = field(default_factory=set)  # outputs whose first payload was delivered (one copy of two)


class EngineClient:
    """The HTTP process's handle on the engine process. ``start`` blocks; the rest is asyncio.

    Not thread-safe: after ``start``, call it only from the event loop given to ``attach``.
    """

    def __init__(self, model: str, settings: dict[str, Any], log_level: str = "warning",
                 detokenizer_process: bool = True):
        """``detokenizer_process``: make streamed text in a process of its own (see the module's
        docstring); False leaves it to the engine process's thread."""
        self.model, self.settings, self.log_level = model, settings, log_level
        self.detokenizer_process = detokenizer_process
        self.info: EngineInfo | None = None
        self._conn: Any = None  # commands to the engine (and, without a detokenizer process, its outputs)
        self._outputs: Any = None  # where the engine's outputs arrive (set by ``start``)
        self._process: multiprocessing.Process | None = None
        self._detokenizer: multiprocessing.Process | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, _Pending] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._dead: str | None = None
        self._closing = False

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 900.0) -> EngineInfo:
        """Spawn the engine process (and the detokenizer process) and wait until the model is loaded.
        Raises RuntimeError on failure."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        engine_out = None
        if self.detokenizer_process:
            detokenizer_in, engine_out = ctx.Pipe(duplex=False)
            self._outputs, detokenizer_out = ctx.Pipe(duplex=False)
            self._detokenizer = ctx.Process(target=run_detokenizer_process,
                                            args=(detokenizer_in, detokenizer_out, self.log_level),
                                            name="plait-detokenizer", daemon=True)
            start_process(self._detokenizer)
            detokenizer_in.close()
            detokenizer_out.close()
        else:
            self._outputs = parent
        # an engine with tensor-parallel ranks starts processes of its own, which a daemonic process
        # may not: then it is not daemonic, and this process closes its pipe at exit (before
        # multiprocessing joins it), which makes the engine shut down, ranks included
        tensor_parallel = int(self.settings.get("tp_size", 1) or 1) > 1
        self._process = ctx.Process(
            target=run_engine_process, args=(child, self.model, self.settings, self.log_level, engine_out),
            name="plait-engine", daemon=not tensor_parallel,
        )
        start_process(self._process)
        if tensor_parallel:
            atexit.register(parent.close)
        child.close()
        if engine_out is not None:
            engine_out.close()  # the engine holds the only write end: its exit ends the detokenizer
        self._conn = parent
        try:
            self.info = self._wait_ready(timeout)
        except BaseException:
            self._kill_children()
            raise
        return self.info

    def _wait_ready(self, timeout: float) -> EngineInfo:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited with status {self._process.exitcode} while loading")
            if self._detokenizer is not None and not self._detokenizer.is_alive():
                raise RuntimeError(f"the detokenizer process exited with status {self._detokenizer.exitcode}")
            if waited >= timeout:
                raise RuntimeError(f"the engine did not load within {timeout:.0f} s")
        kind, value = self._conn.recv()
        if kind != "ready":
            self._process.join(timeout=10)
            raise RuntimeError(f"the engine failed to start: {value}")
        if self._detokenizer is not None:  # its tokenizer loads once the engine has named it
            if not self._outputs.poll(DETOKENIZER_START_TIMEOUT_S):
                raise RuntimeError(f"the detokenizer process did not start within {DETOKENIZER_START_TIMEOUT_S:.0f} s")
            try:
                answer = self._outputs.recv()
            except (EOFError, OSError):
                raise RuntimeError(f"the detokenizer process exited with status {self._detokenizer.exitcode}") from None
            if answer[0] != "ready":
                raise RuntimeError(f"the detokenizer failed to start: {answer[1]}")
        return value

    def _kill_children(self) -> None:
        for process in (self._process, self._detokenizer):
            if process is not None and process.is_alive():
                process.kill()
                process.join(timeout=10)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering engine messages to ``loop``."""
        self._loop = loop
        threading.Thread(target=self._read, name="plait-engine-reader", daemon=True).start()
        if self._outputs is not self._conn:  # first outputs' direct copies arrive on the command pipe
            threading.Thread(target=self._read_direct, name="plait-engine-direct-reader", daemon=True).start()

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Ask the engine process to finish and wait for it to exit (killing it after ``timeout``)."""
        if self._process is None:
            return
        if self._process.is_alive():
            self._closing = True
            if self._dead is None:
                try:
                    await asyncio.wait_for(self.call("shutdown"), timeout)
                except (asyncio.TimeoutError, EngineUnavailableError, RuntimeError):
                    logger.warning("the engine process did not confirm shutdown")
            else:  # the engine lives but its answers cannot arrive (its detokenizer died): tell it anyway
                with contextlib.suppress(OSError, EOFError):
                    self._conn.send(("call", next(self._call_ids), "shutdown", None))
        await asyncio.to_thread(self._process.join, timeout)
        if self._detokenizer is not None:  # it ends when the engine's pipe closes
            await asyncio.to_thread(self._detokenizer.join, 10)
        self._kill_children()
        self._dead = self._dead or "the engine has been shut down"

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (or given up) yet."""
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return (self._dead is None and self._process is not None and self._process.is_alive()
                and (self._detokenizer is None or self._detokenizer.is_alive()))

    # ------------------------------------------------------------------ requests
    async def submit(self, rid: str, spec: dict[str, Any], n: int) -> RequestStream:
        """Submit one prompt (``n`` samples); returns once the engine accepted it.

        Raises ``EngineRequestError`` when the engine refuses the request (the message says why) and
        ``EngineUnavailableError`` when there is no engine.
        """
        if rid in self._pending:
            raise EngineRequestError(f"request id {rid!r} is already in use")
        self._check_alive()
        pending = _Pending(asyncio.Queue(), n)
        if spec.get("stream") and self._detokenizer is not None and self.info.tokenizer_dir is not None:
            spec = {**spec, "detokenize_in_front": True, "outputs": n}
        self._pending[rid] = pending
        try:
            self._send(("generate", rid, spec))
            answer = await pending.queue.get()
        except BaseException:  # cancelled while waiting: make sure nothing keeps running
            self._pending.pop(rid, None)
            self.abort(rid)
            raise
        if answer[0] != "accepted":
            self._pending.pop(rid, None)
            if answer[0] == "dead":
                raise EngineUnavailableError(answer[1])
            raise EngineRequestError(answer[2])
        return RequestStream(self, rid, pending)

    def abort(self, rid: str) -> None:
        """Abort a request by id (or an ``n > 1`` group by its base id); unknown ids are ignored."""
        if self.alive:
            self._send(("abort", rid))

    async def call(self, name: str, arg: Any = None) -> Any:
        """Run ``flush_cache``, ``stats``, ``begin_program``, ``end_program`` or ``shutdown`` in the engine."""
        self._check_alive()
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._send(("call", call_id, name, arg))
        try:
            ok, value = await future
        finally:
            self._calls.pop(call_id, None)
        if not ok:
            raise RuntimeError(value)
        return value

    # ------------------------------------------------------------------ plumbing
    def _finish_stream(self, rid: str, pending: _Pending) -> None:
        self._pending.pop(rid, None)
        if pending.expected:
            self.abort(rid)

    def _check_alive(self) -> None:
        if not self.alive:
            raise EngineUnavailableError(self._dead or "the engine process is not running")

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, EOFError) as exc:
            self._mark_dead(f"the engine process is gone ({exc})")
            raise EngineUnavailableError(self._dead) from None

    @staticmethod
    def _event(pending: _Pending, message: tuple) -> EngineEvent:
        _, _, index, finished, payload = message
        before = pending.texts.get(index, "")
        if finished:
            text = payload["text"]
            delta = text.removeprefix(before)
            pending.expected -= 1
        else:
            delta = payload["text_delta"]
            text = before + delta
        pending.texts[index] = text
        return EngineEvent(index, text, delta, payload["output_ids"], payload["meta_info"], finished)

    def _read(self) -> None:
        """Reader thread: hand every batch from the engine to the event loop."""
        ended = None  # the detokenizer's last word: why its input ended
        while True:
            try:
                batch = self._outputs.recv()
            except (EOFError, OSError):
                if ended is None and self._detokenizer is not None:
                    ended = "the detokenizer process exited"  # it ended without saying why
                reason = self._dead or ended or "the engine process exited"
                with contextlib.suppress(RuntimeError):  # the event loop is already closed
                    self._loop.call_soon_threadsafe(self._mark_dead, reason)
                return
            if batch and batch[-1][0] == "ended":
                ended = batch.pop()[1]
            try:
                self._loop.call_soon_threadsafe(self._dispatch, batch)
            except RuntimeError:  # the event loop is closed
                return

    def _read_direct(self) -> None:
        """Reader thread of the command pipe: first outputs' direct copies (the module's docstring).
        The pipe closing is left to ``_read``, which learns why from the detokenizer."""
        while True:
            try:
                batch = self._conn.recv()
            except (EOFError, OSError):
                return
            try:
                self._loop.call_soon_threadsafe(self._dispatch, batch)
            except RuntimeError:  # the event loop is closed
                return

    def _dispatch(self, batch: list[tuple]) -> None:
        for message in batch:
            kind = message[0]
            if kind == "reply":
                future = self._calls.get(message[1])
                if future is not None and not future.done():
                    future.set_result((message[2], message[3]))
                continue
            pending = self._pending.get(message[1])
            if pending is None:  # the caller left; the request was aborted
                continue
            if kind == "out":
                if message[4].get("first"):  # one of a first output's two copies: the earlier one counts
                    if message[2] in pending.firsts:
                        continue
                    pending.firsts.add(message[2])
                if not pending.accepted:  # a direct copy overtook the engine's answer: keep it for later
                    pending.early.append(message)
                    continue
            pending.queue.put_nowait(message)
            if kind == "accepted":
                pending.accepted = True
                for early in pending.early:
                    pending.queue.put_nowait(early)
                pending.early.clear()

    def fail_pending(self, reason: str) -> None:
        """End every request in flight with ``reason`` (as if the engine were gone) and abort it in the
        engine: streams end with an error event, waiting callers get a 503. The engine stays up."""
        for pending in self._pending.values():
            pending.queue.put_nowait(("dead", reason))

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
            (logger.info if self._closing else logger.error)("%s", reason)
        for pending in self._pending.values():
            pending.queue.put_nowait(("dead", reason))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineUnavailableError(reason))


class RequestStream:
    """The events of one accepted request. Iterate it once; ``close`` (or leaving the iteration
    early) aborts whatever is still running."""

    def __init__(self, client: EngineClient, rid: str, pending: _Pending):
        self.client, self.rid, self._pending = client, rid, pending
        self.closed = False
        self._held: tuple | None = None  # a message taken from the queue that could not be merged

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        """Each event; outputs of one sample that already wait together arrive as one event (below)."""
        try:
            while self._pending.expected:
                message, self._held = self._held or await self._pending.queue.get(), None
                if message[0] == "dead":
                    raise EngineUnavailableError(message[1])
                yield self.client._event(self._pending, self._coalesced(message))
        finally:
            self.close()

    def _coalesced(self, message: tuple) -> tuple:
        """``message`` merged with the outputs of the same sample already waiting behind it.

        When the event loop falls behind the engine (a loaded server), a stream's queue holds several
        steps' outputs; sending them as one event costs one JSON encoding and one socket write instead
        of one per token, so the loop catches up instead of falling further behind. An idle server
        never waits to coalesce: each output leaves as soon as it is read."""
        queue, run = self._pending.queue, [message]
        while run[-1][0] == "out" and not run[-1][3] and not queue.empty():
            following = queue.get_nowait()
            if following[0] != "out" or following[2] != message[2]:
                self._held = following
                break
            run.append(following)
        return merge_outputs(run)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client._finish_stream(self.rid, self._pending)
