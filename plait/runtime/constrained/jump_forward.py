"""Jump-forward: turn the bytes a grammar forces next into tokens the tokenizer itself would produce.

The forced bytes are encoded with the model's own tokenizer, so the forced tokens are its canonical
tokenization of that text. Two boundaries could still make them non-canonical, and both are checked:

- left: the token before (the last sampled one, or the prompt's last token) might merge with the
  forced text. ``encode(text(prev) + forced)`` must start with ``[prev] + tokens``; otherwise nothing
  is forced now (the model samples one more token under the mask and the jump is retried).
- right: the last forced token might merge with what comes after. It is never forced, and every token
  kept must survive a set of probe continuations (letters, digits, space, quote, newline).

What remains are tokens the tokenizer produces for every text that starts with the forced bytes.
"""

from __future__ import annotations

from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = ["canonical_forced_tokens"]

_PROBES = ("a", "Z", "0", " ", '"', "\n", "_", "}")


def _utf8_prefix(data: bytes) -> str:
    """The longest prefix of ``data`` that is whole UTF-8 characters, decoded."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data[: exc.start].decode("utf-8")


def _starts_with(seq: list[int], prefix: list[int]) -> bool:
    return seq[: len(prefix)] == prefix


# (forced text, previous token) pairs remembered per tokenizer: the same keys of the same schemas come
# back request after request, and working one out encodes up to ten texts
FORCED_CACHE_SIZE = 4096


def canonical_forced_tokens(info: TokenizerInfo, forced: bytes, prev_token: int | None, budget: int) -> list[int]:
    """Tokens to append for the ``forced`` bytes after ``prev_token`` (at most ``budget``); may be empty."""
    if budget <= 0 or not forced:
        return []
    text = _utf8_prefix(forced)
    if not text:
        return []
    key = (text, prev_token)
    tokens = info.forced_cache.get(key)
    if tokens is None:
        if len(info.forced_cache) >= FORCED_CACHE_SIZE:
            info.forced_cache.clear()
        tokens = info.forced_cache[key] = tuple(_canonical(info, text, prev_token))
    return list(tokens[:budget])


def _canonical(info: TokenizerInfo, text: str, prev_token: int | None) -> list[int]:
    """``canonical_forced_tokens`` for the whole of ``text`` (no budget)."""
    tokens = info.encode(text)[:-1]  # the last token may merge with what follows: never forced
    if not tokens:
        return []
    for probe in _PROBES:
        probed = info.encode(text + probe)
        keep = 0
        while keep < len(tokens) and keep < len(probed) and probed[keep] == tokens[keep]:
            keep += 1
        tokens = tokens[:keep]
        if not tokens:
            return []
    prev_bytes = info.token_bytes[prev_token] if prev_token is not None and prev_token < info.vocab_size else None
    if prev_bytes is not None:  # special tokens (None) never merge with text
        try:
            prev_text = prev_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return []  # the previous token ends mid-character: wait until it is complete
        if not _starts_with(info.encode(prev_text + text), [prev_token, *tokens]):
            return []
    return tokens
