"""Engine decode throughput with LoRA adapters in the batch, next to the base model alone in the same run.

For each batch size (``--batches``) the script runs the base model alone, then the same workload with
every request on an adapter, the batch spread over 1, 8, 64 and 256 distinct adapters (``--adapters``,
at most the batch size), all in one ``Engine``: ``--batch`` requests of ``--input-len`` random token ids
submitted at once, ``--output-len`` tokens each (``ignore_eos``), fresh prompts and an empty prefix cache
each run. Decode throughput is the output tokens after each request's first over the time from the last
first token to the last finish (every request decoding), so the prefill does not weigh in; the ratio is
that against the base's.

Adapters are PEFT directories of random rank-``--rank`` LoRA weights on all seven linear modules, made for
the model's shapes: one directory written once and registered under as many names as the largest
``--adapters`` (each name is its own adapter to the engine: its own device slot and kernel reads). The
engine gets ``max_loras_per_batch`` = that count, so every adapter of a run stays on the device.

    python benchmarks/lora_serving.py --model llama-3.1-8b --load-format dummy --tokenizer DIR \\
        --batches 64,256 --adapters 1,8,64,256 --rank 16
    python benchmarks/lora_serving.py --batches 4 --adapters 1,2 --output-len 8   # the bundled model, CPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(directory: Path, shapes: dict[str, tuple[int, int]], num_layers: int, rank: int,
                         seed: int = 0) -> Path:
    """A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) of random bfloat16
    weights: ``A`` [rank, in] and ``B`` [out, rank] for every module of ``shapes`` ({name: (in, out)}) in
    every layer; alpha = 2 x rank. Returns ``directory``."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for name, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator)
                                               / fan_in ** 0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator)
                                               * 0.01).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes),
        "bias": "none", "use_rslora": False}))
    return directory


def decode_run(engine: Any, prompts: list[list[int]], output_len: int, adapters: list[str | None]
               ) -> dict[str, float]:
    """Submit every prompt at once (request i on ``adapters[i]``); the run's decode figures."""
    firsts: list[float | None] = [None] * len(prompts)
    left, done = [len(prompts)], threading.Event()
    lock = threading.Lock()
    errors: list[str] = []

    def on_output(index: int, event: dict) -> None:
        now = time.perf_counter()
        if firsts[index] is None and event["output"]["meta_info"]["completion_tokens"] > 0:
            firsts[index] = now
        if event["finished"]:
            reason = event["output"]["meta_info"].get("finish_reason") or {}
            with lock:
                if reason.get("type") == "abort":
                    errors.append(str(reason.get("message")))
                left[0] -= 1
                if not left[0]:
                    done.set()

    params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0.0}
    start = time.perf_counter()
    engine.submit(input_ids=prompts, sampling_params=[dict(params) for _ in prompts], on_output=on_output,
                  stream=True, lora_path=adapters)
    done.wait()
    end = time.perf_counter()
    if errors:
        raise RuntimeError(f"{len(errors)} requests were aborted, the first: {errors[0]}")
    decoding_from = max(firsts)
    decode_tokens = len(prompts) * (output_len - 1)
    return {"seconds": end - start, "decode_seconds": end - decoding_from,
            "decode_tok_s": decode_tokens / (end - decoding_from) if end > decoding_from else float("nan"),
            "total_output_tok_s": len(prompts) * output_len / (end - start)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from plait.runtime.engine import Engine
    from plait.runtime.lora import whole_model_shapes

    most = max(args.adapters)
    root = Path(tempfile.mkdtemp(prefix="plait-lora-bench-"))
    settings: dict[str, Any] = dict(args.engine_arg)
    for key, value in (("load_format", args.load_format), ("tokenizer_path", args.tokenizer)):
        if value:
            settings[key] = value
    settings.update(enable_lora=True, max_loras_per_batch=most, max_loaded_loras=most,
                    max_lora_rank=args.rank, lora_target_modules=TARGETS)
    rows = []
    with Engine(model=args.model, **settings) as engine:
        cfg = engine.model_config
        path = str(write_random_adapter(root / "adapter", whole_model_shapes(cfg), cfg.num_layers, args.rank))
        names = [f"adapter-{i}" for i in range(most)]
        for name in names:
            engine.load_lora_adapter(name, path)
        device = _device_name(engine)
        rng = random.Random(args.seed)
        vocab = cfg.vocab_size

        def prompts(batch: int) -> list[list[int]]:
            return [[rng.randrange(100, vocab - 100) for _ in range(args.input_len)] for _ in range(batch)]

        for batch in args.batches:
            engine.flush_cache()
            decode_run(engine, prompts(batch), args.output_len, [None] * batch)  # warm-up (graphs, kernels)
            for count in [0] + [a for a in args.adapters if a <= batch]:
                engine.flush_cache()
                adapters = [None] * batch if count == 0 else [names[i % count] for i in range(batch)]
                figures = decode_run(engine, prompts(batch), args.output_len, adapters)
                rows.append({"device": device, "batch": batch, "adapters": count, **figures})
                base = next(r for r in rows if r["batch"] == batch and r["adapters"] == 0)
                rows[-1]["ratio_to_base"] = figures["decode_tok_s"] / base["decode_tok_s"]
                print(f"batch {batch:4d}  adapters {count:4d}  decode {figures['decode_tok_s']:10.1f} tok/s  "
                      f"ratio to base {rows[-1]['ratio_to_base']:.3f}", flush=True)
    return rows


def _device_name(engine: Any) -> str:
    device = engine.runner.device
    if device.type != "cuda":
        return "CPU"
    import torch

    return torch.cuda.get_device_name(device)


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--load-format", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (config-only presets need one)")
    p.add_argument("--batches", type=_int_list, default=[64, 256])
    p.add_argument("--adapters", type=_int_list, default=[1, 8, 64, 256],
                   help="distinct adapters in a batch, per run (those above the batch size are skipped)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    from plait.bench import parse_engine_arg

    p.add_argument("--engine-arg", type=parse_engine_arg, action="append", default=[],
                   help="an engine setting as key=value (JSON value), repeatable")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.output_len < 2:
        p.error("--output-len must be at least 2 (decode is timed after each request's first token)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
