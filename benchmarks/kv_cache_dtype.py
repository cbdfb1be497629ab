"""What an FP8 KV cache (``kv_cache_dtype``) costs in accuracy and gives in capacity, on the bundled model.

    python benchmarks/kv_cache_dtype.py [--model smollm2-135m-instruct] [--max-new-tokens 32]

For a few fixed texts, each KV cache type scores the text's tokens (prompt logprobs, float32 model)
and then decodes greedily; reported against the model's own dtype: the mean and largest absolute
difference of the prompt logprobs, how many greedy tokens agree before the first difference, and the
token slots the same memory budget holds. Runs on the CPU (torch backend) or a GPU (Triton kernels).
"""

from __future__ import annotations

import argparse

import torch

from plait.runtime.engine import Engine
from plait.runtime.kvcache.pool import KVPool

TEXTS = (
    "The quick brown fox jumps over the lazy dog. In the beginning God created the heaven and the earth. "
    "And the earth was without form, and void.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water and, "
    "using sunlight, produce glucose and release oxygen.",
)
KV_TYPES = ("auto", "fp8_e4m3", "fp8_e5m2")


def score(engine: Engine, text: str, max_new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """(prompt logprobs of the text's tokens after the first, greedy output ids)."""
    out = engine.generate(prompt=text, sampling_params={"max_new_tokens": max_new_tokens, "temperature": 0},
                          return_logprob=True, logprob_start_len=0)
    logprobs = torch.tensor([lp for lp, *_ in out["meta_info"]["input_token_logprobs"][1:]])
    return logprobs, out["output_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    results: dict[str, list[tuple[torch.Tensor, list[int]]]] = {}
    for kv in KV_TYPES:
        with Engine(model=args.model, max_total_tokens=4096, kv_cache_dtype=kv) as engine:
            results[kv] = [score(engine, text, args.max_new_tokens) for text in TEXTS]
            pool = engine.runner.pool
            per_slot = KVPool.bytes_per_slot(pool.num_layers, pool.num_kv_heads, pool.head_dim, pool.dtype)
            print(f"{kv}: cache {pool.dtype}, {per_slot} bytes a token", flush=True)
    print(f"\n| KV cache | prompt logprob diff, mean / max (nats) | greedy tokens equal before the first difference (of {args.max_new_tokens}) |")
    print("| --- | --- | --- |")
    for kv in KV_TYPES[1:]:
        diffs = torch.cat([(lp - ref).abs() for (lp, _), (ref, _) in zip(results[kv], results["auto"])])
        agree = []
        for (_, ids), (_, ref_ids) in zip(results[kv], results["auto"]):
            same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
            agree.append(str(same))
        print(f"| {kv} | {diffs.mean():.3f} / {diffs.max():.3f} ({diffs.numel()} tokens) | {', '.join(agree)} |")


if __name__ == "__main__":
    main()
