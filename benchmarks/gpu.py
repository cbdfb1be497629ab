"""The GPU benchmark: card speed, then plait's engine on Llama-3.1-8B (dummy weights), in one run.

A thin wrapper: the implementation is ``plait.bench`` (``plait bench`` runs the same code). Prints one
markdown table with the card's name and the date, every figure next to the floor it implies:

  (card) copy bandwidth and bf16 matmul rate, measured first;
  (a) batch-1 decode tok/s;  (b) decode tok/s at batch 64/128/256, 128- and 1024-token prompts;
  (c) offline throughput, 1000 x 256 in / 256 out;  (d) shared-prefix workload, prefix cache on vs off;
  (e) transformers' generate on the same weights, batch 1 and 64;  (f) time to first token, 1024 tokens.

Usage: python benchmarks/gpu.py [--only a,b] [--out results.md] [--engine-arg attention_backend=triton]
       python benchmarks/gpu.py --quick --model smollm2-135m-instruct   (tiny CPU run, every row)
"""

from __future__ import annotations

import sys

from plait.bench import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
