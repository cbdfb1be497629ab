"""Tokenizer wrapper and UTF-8 safe incremental detokenizer.

``Tokenizer`` wraps a Hugging Face fast tokenizer and adds what the runtime needs: the full set of
end-of-sequence ids (tokenizer + ``generation_config.json``), chat templating to text, and a fast
decode path straight into the Rust ``tokenizers`` backend.

``IncrementalDetokenizer`` turns generated token ids into text one token at a time, the way vLLM and
SGLang do (``prefix_offset`` / ``read_offset``): it decodes a short window of ids and emits only the
text that the newest token added (with a Rust tokenizer, its ``DecodeStream`` does that in one call a
token, as vLLM's fast detokenizer does), so that

- a character split across byte-level tokens is emitted once complete, never as U+FFFD halves;
- the first generated token keeps its leading space (prompt tokens give the decoder context);
- stop strings are found across token boundaries and inside one token, and no part of a stop
  string is ever streamed (a tail that could start a stop string is held back);
- stop regexes likewise, searched over a bounded tail window (``plait.runtime.stop_regex``).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from plait.runtime.stop_regex import StopRegexes, StopRegexTimeout

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the window decode below only
    _DecodeStream = None

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first generated token (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5


def _read_generation_eos(path: Path) -> set[int]:
    """The ``eos_token_id`` entries (int or list) of ``path/generation_config.json``, if any."""
    config_file = path / "generation_config.json"
    if not config_file.is_file():
        return set()
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    value = config.get("eos_token_id")
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class Tokenizer:
    """A Hugging Face fast tokenizer plus the runtime's view of it (eos ids, chat template)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Iterable[int] = ()) -> None:
        """Wrap ``hf_tokenizer``; ``eos_token_ids`` are added to the tokenizer's own eos id."""
        self.hf = hf_tokenizer
        eos = {int(i) for i in eos_token_ids}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # The Rust tokenizer decodes ~4x faster than the Python wrapper; usable only when the
        # wrapper adds no post-processing of its own (clean_up_tokenization_spaces).
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        cleanup = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))
        self._fast_decoder = backend if backend is not None and not cleanup else None
        # Encoding through the Rust tokenizer skips the wrapper's Python around it; used only where it
        # gives the wrapper's ids on a probe text. Its batch call, as the wrapper's: that releases the GIL
        # (its single-text encode does not), so tokenizing on the server's worker threads never stalls
        # the event loop.
        self._fast_encoder = backend if backend is not None and self._encodes_like_wrapper(backend) else None

    def _encodes_like_wrapper(self, backend: Any) -> bool:
        """Whether ``backend.encode_batch`` gives the wrapper's ids (with and without special tokens) on a
        probe text holding punctuation, digits, accents, whitespace runs and the eos token's text."""
        if getattr(self.hf, "split_special_tokens", False):
            return False
        eos = getattr(self.hf, "eos_token", None)
        probe = f"Hello, world! 1234 \u00fcn\u00efc\u00f6de  two  spaces\n\tend{eos if isinstance(eos, str) else ''} x"
        try:
            return all(list(self.hf.encode(probe, add_special_tokens=special))
                       == backend.encode_batch([probe], add_special_tokens=special)[0].ids
                       for special in (True, False))
        except Exception:  # noqa: BLE001 - any failure means: keep the wrapper
            return False

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer saved in directory ``path`` (``save_pretrained`` layout).

        Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` if it holds no
        loadable tokenizer.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"no loadable tokenizer in {path}: {e}") from e
        if hf_tokenizer is None or not callable(getattr(hf_tokenizer, "encode", None)):
            raise ValueError(f"no loadable tokenizer in {path}")
        return cls(hf_tokenizer, _read_generation_eos(path))

    @classmethod
    def from_hf(cls, hf_tokenizer: Any, eos_token_ids: Iterable[int] | None = None) -> Tokenizer:
        """Wrap an already loaded Hugging Face tokenizer, with optional extra eos ids."""
        return cls(hf_tokenizer, eos_token_ids or ())

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        if self._fast_encoder is not None:
            return self._fast_encoder.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; an incomplete UTF-8 sequence decodes to U+FFFD."""
        ids = [int(i) for i in ids]
        if self._fast_decoder is not None:
            return self._fast_decoder.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Any | None:
        """A fresh ``tokenizers.decoders.DecodeStream`` for this tokenizer (its ``step(backend, id)``
        returns the text a token completes, or None while a character is incomplete), and the backend
        to pass it: ``(stream, backend)``; None where decoding goes through the Python wrapper."""
        if self._fast_decoder is None or _DecodeStream is None:
            return None
        return _DecodeStream(skip_special_tokens=skip_special_tokens), self._fast_decoder

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings of ``ids`` (byte-level forms such as ``Ġhello``)."""
        return list(self.hf.convert_ids_to_tokens([int(i) for i in ids]))

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return len(self.hf)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of all special tokens."""
        return list(self.hf.all_special_ids)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos id (see ``eos_token_ids`` for the full set)."""
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        """The tokenizer's bos id, if any."""
        return self.hf.bos_token_id

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, or None if it has none."""
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) else None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` to prompt text with ``template`` or the model's chat template.

        ``tools`` (OpenAI-format declarations) and ``template_kwargs`` (extra template variables)
        are passed to the template. Raises ``ValueError`` if there is no template.
        """
        template = template if template is not None else self.chat_template
        if template is None:
            raise ValueError(
                "this model's tokenizer has no chat template; pass template= explicitly"
            )
        text = self.hf.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=template,
            tools=tools,
            **template_kwargs,
        )
        return str(text)

    def __repr__(self) -> str:
        eos = sorted(self.eos_token_ids)
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={eos})"


def _failure_function(pattern: str) -> array:
    """KMP failure function: entry i is the length of the longest proper prefix of ``pattern[: i + 1]``
    that is also its suffix. O(len(pattern)) time; 4 bytes per character."""
    fail = array("i", bytes(4 * len(pattern)))
    k = 0
    for i in range(1, len(pattern)):
        c = pattern[i]
        while k and pattern[k] != c:
            k = fail[k - 1]
        if pattern[k] == c:
            k += 1
        fail[i] = k
    return fail


class StopStringMatcher:
    """Follows a growing text against a set of stop strings in time and memory linear in their length.

    For every stop string it keeps the length of the longest suffix of the text fed so far that is a
    prefix of that string (Knuth-Morris-Pratt), so ``feed`` costs amortized O(1) per character and
    stop string, and the longest tail that could start a stop string (``longest_partial``) is known
    without listing the strings' prefixes (which would be quadratic in their length).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """``stops``: non-empty strings."""
        self.stops = tuple(stops)
        self._failure = [_failure_function(s) for s in self.stops]
        self._state = [0] * len(self.stops)

    def feed(self, text: str) -> list[int]:
        """Append ``text``; return the indices of the stop strings that an occurrence ending inside
        ``text`` completed (in order of index)."""
        completed = []
        for i, stop in enumerate(self.stops):
            fail, k, n, hit = self._failure[i], self._state[i], len(stop), False
            for c in text:
                if k == n:
                    k = fail[k - 1]
                while k and stop[k] != c:
                    k = fail[k - 1]
                if stop[k] == c:
                    k += 1
                    hit = hit or k == n
            self._state[i] = k
            if hit:
                completed.append(i)
        return completed

    @property
    def longest_partial(self) -> int:
        """Length of the longest suffix of the text fed so far that is a proper prefix of a stop string."""
        # a whole stop string at the end: its longest proper prefix that is also a suffix of it
        return max((k if k < len(s) else fail[k - 1] for k, s, fail in zip(self._state, self.stops, self._failure)),
                   default=0)


class IncrementalDetokenizer:
    """Streams the text of generated tokens, UTF-8 safe and stop-string aware.

    Feed each generated token to ``add``; it returns the text that became safe to show. Call
    ``finish`` when generation ends for another reason than a stop string to flush what is held
    back. After a stop string (or a match of a ``stop_regex`` pattern) is found, ``stopped`` is True,
    ``matched_stop`` names it (the pattern, for a regex), and the text ends right before it (right
    after it with ``no_stop_trim``); later tokens change nothing. A stop regex that exceeds its time
    limit stops the text where it was emitted and sets ``failure`` to a message.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        no_stop_trim: bool = False,
        stop_regex: Sequence[str] = (),
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.no_stop_trim = no_stop_trim
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # The text's tail that could start a stop string is held back; the matcher tracks it.
        self._stop_matcher = StopStringMatcher(self.stop)
        self._completed_stops: list[int] = []  # stop strings that the text's last growth completed
        self.stop_regex = StopRegexes(stop_regex)
        self._watches_stops = bool(self.stop) or bool(self.stop_regex)
        self.failure: str | None = None

        context = [int(i) for i in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its text is not a prefix of what follows.
            context = []
        self._ids: list[int] = context  # prompt context + generated ids
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # ids before this are committed text
        self._prefix_text = self._decode(context)
        # With a Rust tokenizer the committed text grows by DecodeStream's chunks (primed with the
        # context): one call a token instead of two window decodes. ``_hidden`` leading characters of
        # it are not output (a subclass's decoding context, see HealedDetokenizer).
        self._hidden = 0
        # (start, end, text) of the committed ids that the pending ones are decoded after (``_pending_text``)
        self._window_prefix: tuple[int, int, str] = (-1, -1, "")
        self._stream = tokenizer.decode_stream(skip_special_tokens) if hasattr(tokenizer, "decode_stream") else None
        if self._stream is not None:
            stream, backend = self._stream
            try:
                for token in context:  # context: its text is not output
                    stream.step(backend, token)
            except Exception:  # noqa: BLE001 - a context the stream cannot take: start without it
                self._stream = tokenizer.decode_stream(skip_special_tokens)

        self.output_ids: list[int] = []
        self._committed = ""  # output text of ids before _read_offset
        self._text = ""  # output text known so far (committed + complete part of the rest)
        self._emitted = 0  # characters of _text already returned
        self.matched_stop: str | None = None
        self.stopped = False
        self.finished = False

    # ------------------------------------------------------------------ public
    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text newly safe to show (maybe empty)."""
        if self.finished:
            raise RuntimeError("add() called after finish()")
        token_id = int(token_id)
        self.output_ids.append(token_id)
        if self.stopped:
            return ""
        self._ids.append(token_id)
        if self._stream is not None:
            chunk = self._step(token_id)
            if chunk is not None:
                if self._read_offset < len(self._ids) - 1:
                    # it completes tokens held back before (a split or invalid character): their text
                    # as the window decodes it (U+FFFD for invalid bytes, where the stream drops them)
                    chunk = self._pending_text()
                self._committed += chunk
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                candidate = self._committed
            else:  # an incomplete character: the complete text before it in the pending tokens shows
                candidate = self._committed + self._pending_text().rstrip(_REPLACEMENT_CHAR)
            return self._extend(candidate[self._hidden:] if self._hidden else candidate, final=False)
        window_text = self._decode(self._ids[self._prefix_offset :])
        new = window_text[len(self._prefix_text) :]
        if new.endswith(_REPLACEMENT_CHAR):
            # An incomplete character: keep only the complete text before it, commit nothing.
            candidate = self._committed + new.rstrip(_REPLACEMENT_CHAR)
        else:
            candidate = self._committed + new
            if len(window_text) > len(self._prefix_text):
                self._committed = candidate
                self._prefix_text = self._decode(self._ids[self._read_offset :])
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
        return self._extend(candidate, final=False)

    def finish(self) -> str:
        """Flush held-back text (generation ended without a stop string); return it."""
        if self.finished:
            return ""
        self.finished = True
        if self.stopped:
            return ""
        candidate = self._text
        if self._stream is not None:  # the stream's pending tokens (an incomplete character: U+FFFD)
            candidate = (self._committed + self._pending_text())[self._hidden:]
        elif self._read_offset < len(self._ids):
            window_text = self._decode(self._ids[self._prefix_offset :])
            candidate = self._committed + window_text[len(self._prefix_text) :]
        return self._extend(candidate, final=True)

    @property
    def text(self) -> str:
        """All output text so far: emitted plus held back (the final text after ``finish``)."""
        return self._text

    @property
    def emitted_text(self) -> str:
        """The output text returned by ``add``/``finish`` so far."""
        return self._text[: self._emitted]

    # ------------------------------------------------------------------ internals
    def _step(self, token_id: int) -> str | None:
        """Feed ``token_id`` to the decode stream; the text it completed (None: an incomplete
        character). A stream whose state an odd token sequence broke (tokenizers raises "Invalid
        prefix encountered") is replaced by a fresh one, as vLLM does."""
        stream, backend = self._stream
        try:
            return stream.step(backend, token_id)
        except Exception:  # noqa: BLE001 - the stream's own state error; a fresh stream takes the token
            self._stream = self.tokenizer.decode_stream(self.skip_special_tokens)
            stream, backend = self._stream
            return stream.step(backend, token_id)

    def _pending_text(self) -> str:
        """The text of the tokens the decode stream has not committed yet (U+FFFD for an incomplete
        character), decoded after the last committed token(s) for context. The context's own text is
        decoded once per committed window, not once per held-back token."""
        if self._read_offset == len(self._ids):
            return ""
        start, end = self._prefix_offset, self._read_offset
        if self._window_prefix[:2] != (start, end):
            self._window_prefix = (start, end, self._decode(self._ids[start:end]))
        return self._decode(self._ids[start:])[len(self._window_prefix[2]) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _extend(self, candidate: str, final: bool) -> str:
        """Grow ``_text`` to ``candidate``, look for stop strings, return the newly safe text."""
        old_len = len(self._text)
        if len(candidate) > old_len and candidate.startswith(self._text):
            self._text = candidate
        elif len(candidate) > old_len:
            # Defensive: a decoder that rewrites earlier text; never take back emitted text.
            self._text = self._text + candidate[old_len:]
        if self.stop and len(self._text) > old_len:
            self._completed_stops = self._stop_matcher.feed(self._text[old_len:])
        if self._watches_stops and len(self._text) > old_len:
            try:
                cut = self._find_stop(old_len)
                held = 0 if final else self._held_back(old_len)
            except StopRegexTimeout as exc:
                self.failure, self.stopped = str(exc), True
                self._text = self._text[: self._emitted]
                return ""
            if cut is not None:
                cut = max(cut, self._emitted)  # emitted text is never taken back
                self._text = self._text[:cut]
                self.stopped = True
                return self._emit(cut)
            return self._emit(len(self._text) - held)
        if final:
            return self._emit(len(self._text))
        return self._emit(len(self._text) - self._held_back(old_len))

    def _find_stop(self, old_len: int) -> int | None:
        """Find the earliest stop string or stop-regex match that the text's growth from ``old_len``
        characters completed; set ``matched_stop``.

        Returns the index where the text is cut, or None. Ties prefer the shorter match, the one
        generation completed first.
        """
        best: tuple[int, int, str] | None = None  # (start, end, what matched)
        start = max(0, old_len - self._max_stop_len + 1)
        for s in (self.stop[i] for i in self._completed_stops):  # only these can match in the new text
            idx = self._text.find(s, start)
            if idx >= 0 and (best is None or (idx, idx + len(s)) < best[:2]):
                best = (idx, idx + len(s), s)
        if self.stop_regex:
            match = self.stop_regex.find(self._text, old_len)
            if match is not None and (best is None or (match.start, match.end) < best[:2]):
                best = (match.start, match.end, match.pattern)
        if best is None:
            return None
        begin, end, what = best
        self.matched_stop = what
        return end if self.no_stop_trim else begin

    def _held_back(self, old_len: int) -> int:
        """Length of the longest unemitted tail that could be the start of a stop string or match."""
        if not self._watches_stops:  # the usual request: nothing to hold back
            return 0
        available = len(self._text) - self._emitted
        # Emitted text never holds the start of a stop string (it would have been held back), so the
        # clamp only guards against a subclass that emits otherwise.
        held = min(self._stop_matcher.longest_partial, available)
        if self.stop_regex and available > held:
            partial = self.stop_regex.partial_start(self._text, old_len)
            if partial is not None:
                held = max(held, min(available, len(self._text) - partial))
        return held

    def _emit(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        chunk = self._text[self._emitted : end]
        self._emitted = end
        return chunk
