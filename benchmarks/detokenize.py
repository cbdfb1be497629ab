"""Incremental detokenizing per token: the Rust tokenizer's decode stream against the window decode.

    python benchmarks/detokenize.py [--model PRESET|DIR] [--requests 100] [--tokens 256] [--repeats 3]

``IncrementalDetokenizer`` grows a stream's text with the Rust tokenizer's ``DecodeStream`` (one call a
token) where the tokenizer has one, and with two window decodes a token otherwise. This times both on
the same outputs: ``--requests`` outputs of ``--tokens`` tokens each, each with a fresh detokenizer and
a short prompt as context, for random token ids (what dummy weights write, split characters included)
and for the README's text. Printed: the fastest of ``--repeats`` passes in microseconds a token, and
whether both paths gave the same text.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from plait.runtime.models.registry import ensure_preset_dir
from plait.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


def window_only(tokenizer: Tokenizer) -> Tokenizer:
    """The same tokenizer without a decode stream (the window decode)."""
    plain = Tokenizer.from_hf(tokenizer.hf, tokenizer.eos_token_ids)
    plain.decode_stream = lambda skip_special_tokens=True: None
    return plain


def time_outputs(tokenizer: Tokenizer, outputs: list[list[int]], prompt: list[int], repeats: int) -> tuple[float, list[str]]:
    """(fastest seconds a token, the texts) over ``repeats`` passes."""
    best, texts = float("inf"), []
    for _ in range(repeats):
        start, texts = time.perf_counter(), []
        for ids in outputs:
            detokenizer = IncrementalDetokenizer(tokenizer, prompt)
            for token in ids:
                detokenizer.add(token)
            detokenizer.finish()
            texts.append(detokenizer.text)
        best = min(best, time.perf_counter() - start)
    return best / sum(map(len, outputs)), texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a preset with a tokenizer, or a directory")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model_dir = args.model if Path(args.model).is_dir() else str(ensure_preset_dir(args.model))
    tokenizer = Tokenizer.from_dir(model_dir)
    if tokenizer.decode_stream() is None:
        print("this tokenizer has no decode stream: only the window decode runs")
        return 1
    rng = random.Random(0)
    prompt = tokenizer.encode("Extract a record as JSON from this text: lorem ipsum")
    readme = tokenizer.encode((Path(__file__).resolve().parents[1] / "README.md").read_text())
    n, size = args.requests, args.tokens
    workloads = {
        "random ids": [[rng.randrange(1000, min(30000, tokenizer.vocab_size)) for _ in range(size)] for _ in range(n)],
        "README text": [readme[(i * size) % max(1, len(readme) - size):][:size] for i in range(n)],
    }
    for name, outputs in workloads.items():
        window, window_texts = time_outputs(window_only(tokenizer), outputs, prompt, args.repeats)
        stream, stream_texts = time_outputs(tokenizer, outputs, prompt, args.repeats)
        print(f"{name}: window decode {window * 1e6:.2f} us a token, decode stream {stream * 1e6:.2f} us a token; "
              f"same text: {window_texts == stream_texts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
