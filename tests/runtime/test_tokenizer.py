"""Tokenizer and incremental detokenizer against the bundled SmolLM2-135M-Instruct tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from plait.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.model

FFFD = "\ufffd"
TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "👍🏽🎉",
    "你好，世界。日本語のテキスト",
    "Mixed: café naïve 👍🏽 and 你好 then ascii again 🎉!",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n\tindented\n",
    " ",
]


@pytest.fixture(scope="module")
def tok(bundled_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(bundled_model_dir)


def stream(
    tok: Tokenizer, ids: list[int], finish: bool = True, **kwargs
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ``ids`` one by one; return the chunks (and ``finish()``'s last) and the detokenizer."""
    detok = IncrementalDetokenizer(tok, **kwargs)
    chunks = []
    for i in ids:
        chunks.append(detok.add(i))
        # What was streamed is always a prefix of the text known so far.
        assert detok.text.startswith("".join(chunks))
    if finish:
        chunks.append(detok.finish())
    return chunks, detok


# ---------------------------------------------------------------------------------- Tokenizer
def test_basic_properties(tok: Tokenizer) -> None:
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert im_end == [2]
    assert 2 in tok.eos_token_ids
    assert tok.vocab_size == 49152
    assert {0, 1, 2} <= set(tok.all_special_ids)
    ids = tok.encode("Hello world")
    assert tok.convert_ids_to_tokens(ids) == ["Hello", "Ġworld"]
    assert tok.decode(ids) == "Hello world"
    assert tok.decode([2, *ids, 2]) == "Hello world"
    assert tok.decode([2, *ids], skip_special_tokens=False) == "<|im_end|>Hello world"


@pytest.mark.parametrize("special", [True, False])
def test_encode_through_the_rust_tokenizer_gives_the_wrappers_ids(tok: Tokenizer, special: bool) -> None:
    assert tok._fast_encoder is not None  # the bundled tokenizer encodes without the wrapper
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>", ""]:
        assert tok.encode(text, add_special_tokens=special) == list(tok.hf.encode(text, add_special_tokens=special))


def test_encoding_releases_the_gil(tok: Tokenizer) -> None:
    """A long text tokenized on one thread lets another run meanwhile (the server tokenizes large bodies
    on worker threads so that its event loop keeps serving): a thread ticking every millisecond gets
    many ticks in; with the GIL held for the whole encode it would get about one."""
    import threading
    import time

    text = "Mixed: café naïve 👍🏽 and 你好 then ascii again 🎉! " * 4000
    ticks, stop = [0], threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.01)
    ticks[0] = 0
    start = time.perf_counter()
    tok.encode(text)
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    assert elapsed > 0.02, "the text is too short to tell"
    assert ticks[0] >= 5, f"{ticks[0]} ticks in {elapsed * 1e3:.0f} ms of encoding"


def test_a_wrapper_that_encodes_differently_is_kept(tok: Tokenizer) -> None:
    """A wrapper whose ids differ from its Rust tokenizer's on the probe text (here: one that appends
    a token) keeps encoding through the wrapper; so does one that splits special tokens."""

    class Appending:
        backend_tokenizer = tok.hf.backend_tokenizer
        eos_token, eos_token_id, clean_up_tokenization_spaces = "<|im_end|>", 2, False

        def encode(self, text, add_special_tokens=True):
            return tok.hf.encode(text, add_special_tokens=add_special_tokens) + [7]

    appending = Tokenizer(Appending())
    assert appending._fast_encoder is None and appending.encode("Hello") == tok.encode("Hello") + [7]

    class Splitting(Appending):
        split_special_tokens = True

        def encode(self, text, add_special_tokens=True):
            return tok.hf.encode(text, add_special_tokens=add_special_tokens)

    assert Tokenizer(Splitting())._fast_encoder is None


def test_from_dir_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_dir(missing)
    empty = tmp_path / "empty_model_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_model_dir"):
        Tokenizer.from_dir(empty)


def test_generation_config_eos(bundled_model_dir: Path, tmp_path: Path, tok: Tokenizer) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    for name in names:
        if (bundled_model_dir / name).exists():
            shutil.copy(bundled_model_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0, 7]}')
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == frozenset({0, 2, 7})
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 5}')
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == frozenset({2, 5})
    assert Tokenizer.from_hf(tok.hf, eos_token_ids=[9]).eos_token_ids == frozenset({2, 9})


def test_chat_template_chatml(tok: Tokenizer) -> None:
    assert tok.chat_template is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt.endswith("Hi there<|im_end|>\n")
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    rendered = tok.apply_chat_template(messages, template=custom)
    assert rendered == "[system] Be brief.\n[user] Hi there\n"


def test_no_chat_template_is_an_error(bundled_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bundled_model_dir))
    hf.chat_template = None
    bare = Tokenizer.from_hf(hf)
    assert bare.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------- IncrementalDetokenizer
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(
    tok: Tokenizer, text: str, skip_special_tokens: bool
) -> None:
    ids = tok.encode(text)
    chunks, detok = stream(tok, ids, skip_special_tokens=skip_special_tokens)
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(chunks) == expected == detok.text
    assert detok.output_ids == ids
    assert not any(FFFD in c for c in chunks)


def test_partial_characters_are_exercised(tok: Tokenizer) -> None:
    """Emoji and CJK are split into byte tokens here: single tokens decode to U+FFFD."""
    for text in ("👍🏽🎉", "你好，世界。日本語のテキスト"):
        ids = tok.encode(text)
        assert any(tok.decode([i]).endswith(FFFD) for i in ids)
        chunks, _ = stream(tok, ids)
        assert "" in chunks[:-1]  # some token completed no character and emitted nothing


def test_special_tokens_in_output(tok: Tokenizer) -> None:
    ids = tok.encode("Hi<|im_end|>\n<|im_start|>user 👍🏽", add_special_tokens=False)
    assert 2 in ids and 1 in ids
    for skip in (True, False):
        chunks, detok = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in detok.text


def test_prompt_context_keeps_leading_space_and_hides_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nWell,")
    out = tok.encode(" hello 你好 world")
    for skip in (True, False):
        chunks, detok = stream(tok, out, prompt_ids=prompt, skip_special_tokens=skip)
        assert "".join(chunks) == " hello 你好 world" == detok.text
        assert chunks[0] == " hello"
    # A prompt ending inside a character gives no usable context; its bytes are never emitted.
    party = tok.encode("party 🎉")
    chunks, detok = stream(tok, party[-1:], prompt_ids=party[:-1])
    assert "".join(chunks) == tok.decode(party[-1:]) and "party" not in detok.text


def test_finish_flushes_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🎉")
    chunks, detok = stream(tok, ids[:-1], finish=False)
    assert "".join(chunks) == "ok "
    tail = detok.finish()
    assert tail == tok.decode(ids[:-1])[len("ok ") :] and tail.endswith(FFFD)
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.add(ids[-1])


def _sentencepiece_style_tokenizer() -> Tokenizer:
    """A tiny Llama-style tokenizer: "▁" spaces, byte fallback, first space stripped."""
    import string

    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in ["▁", *string.ascii_letters, *string.digits, *",.!?"]:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ["▁Hello", "▁world", "Hello"]:
        for k in range(2, len(word) + 1):
            merges.append((word[: k - 1], word[k - 1]))
            vocab.setdefault(word[:k], len(vocab))
    bpe = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    rust = RustTokenizer(bpe)
    rust.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    rust.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return Tokenizer.from_hf(hf)


def test_sentencepiece_leading_space_uses_prompt_context() -> None:
    sp = _sentencepiece_style_tokenizer()
    out = sp.encode(" world 你好 🎉", add_special_tokens=False)
    assert sp.decode(out[1:2]) == "world"  # decoded alone, the first token loses its space
    prompt = sp.encode("Hello", add_special_tokens=False)
    chunks, detok = stream(sp, out[1:], prompt_ids=prompt)
    assert chunks[0] == " world" and "".join(chunks) == " world 你好 🎉" == detok.text
    assert not any(FFFD in c for c in chunks)
    ids = sp.encode("Hello world 🎉!", add_special_tokens=False)
    chunks, _ = stream(sp, ids)
    assert "".join(chunks) == sp.decode(ids) == "Hello world 🎉!"


# --------------------------------------------------------------------------------- stops
def test_stop_across_token_boundary(tok: Tokenizer) -> None:
    ids = tok.encode("Say: STOP!now")
    pieces = [tok.decode([i]) for i in ids]
    assert not any("STOP" in p for p in pieces)  # the stop string straddles two tokens
    assert "STOP" in "".join(pieces[2:4]) and pieces[2] == " ST"
    chunks, detok = stream(tok, ids, stop=["STOP"])
    assert detok.stopped and detok.matched_stop == "STOP"
    assert "".join(chunks) == detok.text == "Say: "
    # Never partially streamed: 'ST' was held back, so no chunk holds any part of it.
    assert chunks[2:] == [" ", "", "", "", ""]
    assert detok.output_ids == ids  # later tokens are recorded but change nothing


def test_stop_returns_text_up_to_stop_in_same_add(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42. END here")
    detok = IncrementalDetokenizer(tok, stop=[". END"])
    returned, stopped = [], []
    for i in ids:
        returned.append(detok.add(i))
        stopped.append(detok.stopped)
    stop_step = stopped.index(True)
    assert tok.decode(ids[: stop_step + 1]).endswith(". END")  # the token completing the stop
    assert "".join(returned[: stop_step + 1]) == "The answer is 42"
    assert returned[stop_step - 1 : stop_step + 1] == ["", ""]  # "." was held back, then cut
    assert all(r == "" for r in returned[stop_step + 1 :])
    assert detok.finish() == ""


def test_stop_inside_single_token(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42")
    assert tok.decode([ids[1]]) == " answer"
    chunks, detok = stream(tok, ids, stop=["nsw"])
    assert detok.matched_stop == "nsw" and "".join(chunks) == detok.text == "The a"
    chunks, detok = stream(tok, ids, stop=["nsw"], no_stop_trim=True)
    assert "".join(chunks) == detok.text == "The answ"


def test_stop_inside_split_character(tok: Tokenizer) -> None:
    ids = tok.encode("party 🎉 time")
    chunks, detok = stream(tok, ids, stop=["🎉"])
    assert "".join(chunks) == "party " and detok.matched_stop == "🎉"


def test_multiple_stops_pick_earliest(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42. END here")
    for stops in (["here", "is"], ["is", "here"], ["42. END here", "is 4"]):
        chunks, detok = stream(tok, ids, stop=stops)
        assert "".join(chunks) == "The answer " and detok.text == "The answer "
    chunks, detok = stream(tok, ids, stop=["42", "4"])  # same start: the shorter completes first
    assert detok.matched_stop == "4" and "".join(chunks) == "The answer is "


def test_no_stop_trim_keeps_stop(tok: Tokenizer) -> None:
    ids = tok.encode("Say: STOP!now")
    chunks, detok = stream(tok, ids, stop=["!", "STOP"], no_stop_trim=True)
    assert detok.matched_stop == "STOP" and "".join(chunks) == detok.text == "Say: STOP"


def test_held_back_prefix_released_when_no_stop(tok: Tokenizer) -> None:
    ids = tok.encode("Say: ST and more")
    chunks, detok = stream(tok, ids, stop=["STOP"])
    assert not detok.stopped and detok.matched_stop is None
    assert "".join(chunks) == "Say: ST and more"
    ids = tok.encode("ends with ST")
    chunks, detok = stream(tok, ids, stop=["STOP"], finish=False)
    assert "".join(chunks) == "ends with " and detok.finish() == "ST"


def test_empty_stop_string_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, stop=[""])


# ---------------------------------------------------------------------------- properties
_alphabet = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters=FFFD),
    st.sampled_from(list("👍🏽🎉你好世界日本語のテキスト，。 \n\tabc")),
)


_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(
    text=st.text(_alphabet, max_size=40), prompt=st.text(_alphabet, max_size=8), skip=st.booleans()
)
def test_property_incremental_equals_full(
    tok: Tokenizer, text: str, prompt: str, skip: bool
) -> None:
    ids = tok.encode(text)
    chunks, detok = stream(tok, ids, prompt_ids=tok.encode(prompt), skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(chunks) == full == detok.text
    if FFFD not in full:
        assert not any(FFFD in c for c in chunks)


@_SETTINGS
@given(text=st.text(_alphabet, min_size=1, max_size=40), data=st.data())
def test_property_stop_truncates_at_first_occurrence(
    tok: Tokenizer, text: str, data: st.DataObject
) -> None:
    ids = tok.encode(text)
    full = tok.decode(ids)
    assume(full)  # some control characters encode to nothing
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start : start + data.draw(st.integers(1, 4))]
    chunks, detok = stream(tok, ids, stop=[stop])
    expected = full[: full.find(stop)]
    assert detok.stopped and detok.matched_stop == stop
    assert "".join(chunks) == detok.text == expected


# ------------------------------------------------------------------ the decode stream against the window
def _window_only(tokenizer: Tokenizer) -> Tokenizer:
    """The same tokenizer with no decode stream: IncrementalDetokenizer's window decode (the reference)."""
    plain = Tokenizer.from_hf(tokenizer.hf, tokenizer.eos_token_ids)
    plain.decode_stream = lambda skip_special_tokens=True: None
    return plain


@pytest.mark.parametrize("style", ["bundled", "sentencepiece"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_the_decode_stream_gives_the_window_decodes_text(tok: Tokenizer, style: str, skip_special_tokens: bool) -> None:
    """With a Rust tokenizer the committed text grows by ``DecodeStream``'s chunks: on random token
    sequences (split characters, special tokens, a prompt as context) the text, every finish and the
    text shown so far after each token equal the window decode's, whose behaviour the tests above pin."""
    import random

    tokenizer = tok if style == "bundled" else _sentencepiece_style_tokenizer()
    reference = _window_only(tokenizer)
    assert tokenizer.decode_stream() is not None and reference.decode_stream() is None
    rng = random.Random(7)
    texts = [*TEXTS, "Hello world 🎉!"]
    for trial in range(60):
        if trial % 3:  # random ids: byte tokens, partial characters, special tokens anywhere
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        else:
            ids = tokenizer.encode(rng.choice(texts), add_special_tokens=False)
        prompt = tokenizer.encode(rng.choice(texts), add_special_tokens=False)[: rng.randrange(0, 8)]
        fast = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
        slow = IncrementalDetokenizer(reference, prompt, skip_special_tokens=skip_special_tokens)
        assert fast._stream is not None and slow._stream is None
        for token in ids:
            fast.add(token)
            slow.add(token)
            assert fast.text == slow.text, (ids, prompt)
        assert fast.finish() == slow.finish() and fast.text == slow.text, (ids, prompt)


def test_the_decode_stream_decodes_no_window_for_a_complete_token(tok: Tokenizer) -> None:
    """The stream path (one call a token) decodes no window for a token that completes its text."""
    calls = []
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    detok._decode = lambda ids: calls.append(ids) or ""
    for token in tok.encode(" plain ascii words, one after another"):
        detok.add(token)
    assert calls == [] and detok.text == " plain ascii words, one after another"
