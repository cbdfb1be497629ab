"""Row e: transformers' ``generate`` on plait's own weight tensors, decode tok/s at batch 1 and 64.

The Hugging Face model is built from the same config on the meta device; each of its parameters then
becomes a view of the plait parameter holding it (q/k/v rows of ``qkv_proj``, gate/up rows of
``gate_up_proj``), so the weights are shared, not copied, and need no second copy in GPU memory.
The caller shuts the plait engine down and frees its KV cache first.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from plait.bench.gpu_workloads import Row, fmt, rate_row, synchronize
from plait.runtime.models.llama import PACKED_WEIGHTS


def plait_tensor_for(hf_name: str, model: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plait tensor (or row slice of a packed one) that holds the Hugging Face parameter ``hf_name``."""
    if hf_name == "lm_head.weight" and getattr(model, "lm_head", None) is None:
        return model.lm_head_weight().data  # tied to the embedding
    for ckpt_part, (param_part, shard_id) in PACKED_WEIGHTS.items():
        if ckpt_part in hf_name:
            name = hf_name.replace(ckpt_part, param_part)
            offset, size = model.get_submodule(name.rsplit(".", 1)[0]).shard_offsets[shard_id]
            return params[name].data.narrow(0, offset, size)  # rows [offset, offset + size): contiguous
    if hf_name not in params:
        raise KeyError(f"transformers parameter {hf_name!r} has no counterpart in plait's model")
    return params[hf_name].data


def build_hf_model(model: nn.Module, hf_config: dict[str, Any], device: torch.device) -> nn.Module:
    """A transformers causal LM from ``hf_config`` whose parameters are views of plait ``model``'s."""
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        owner, leaf = name.rsplit(".", 1)
        tensor = plait_tensor_for(name, model, params)
        setattr(hf.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))
    for name, module in list(hf.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if "Rotary" not in type(module).__name__:
            raise RuntimeError(f"cannot materialize the buffers of {name} ({type(module).__name__})")
        with torch.device(device):
            replacement = type(module)(config=hf.config)  # recomputes inv_freq on ``device``
        owner, _, leaf = name.rpartition(".")
        setattr(hf.get_submodule(owner) if owner else hf, leaf, replacement)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model still has meta tensors: {left[:3]}")
    return hf.eval()


def hf_decode_rate(hf: nn.Module, prompts: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """transformers decode tok/s = batch * (N - 1) / (time(N) - time(1)), greedy, exactly N tokens each."""
    device, batch = prompts.device, prompts.shape[0]
    eos = hf.config.eos_token_id
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)

    def run(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=pad or 0)
        synchronize(device)
        if out.shape[1] != prompts.shape[1] + n:
            raise RuntimeError(f"transformers generated {out.shape[1] - prompts.shape[1]} tokens, not {n}")
        return time.perf_counter() - start

    run(2)  # warm-up
    t_n = statistics.median(run(new_tokens) for _ in range(repeats))
    t_1 = statistics.median(run(1) for _ in range(repeats))
    if t_n <= t_1:
        raise RuntimeError(f"time({new_tokens} tokens) {t_n:.3f} s <= time(1 token) {t_1:.3f} s")
    return batch * (new_tokens - 1) / (t_n - t_1)


def hf_decode_rows(model: nn.Module, hf_config: dict[str, Any], device: torch.device, facts: Any, machine: Any,
                   sizes: Any, plait_rates: dict[tuple[int, int, int], float], seed: int, notes: list[str],
                   repeats: int = 1) -> list[Row]:
    """Row e, one row per batch size in ``sizes.hf_batch_sizes``; appends a note saying which weights were used."""
    names = [f"transformers generate, batch {b}" for b in sizes.hf_batch_sizes]
    try:
        import transformers
    except ImportError:
        return [Row("e", name, "skipped: transformers is not installed") for name in names]
    hf = build_hf_model(model, hf_config, device)
    where = ""
    if device.type == "cuda":
        where = f" ({torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated on the GPU with both models)"
    notes.append(f"Row e: transformers {transformers.__version__} `{type(hf).__name__}` built on the meta device, "
                 f"its parameters views of the plait engine's own weight tensors (shared, not copied, no re-created "
                 f"weights); the engine was shut down and its KV cache freed first{where}.")
    rng = np.random.default_rng(seed + 1)
    rows, p = [], sizes.decode_prompt
    for batch, name in zip(sizes.hf_batch_sizes, names):
        n = sizes.decode_new_tokens if batch == 1 else sizes.batch_new_tokens
        prompts = torch.tensor(rng.integers(0, hf.config.vocab_size, size=(batch, p)), device=device)
        rate = hf_decode_rate(hf, prompts, n, repeats)
        step, bound = facts.decode_step(machine, batch, p + n / 2)
        plait = plait_rates.get((batch, p, n))
        versus = f"plait {fmt(plait)} tok/s = {plait / rate:.2f}x transformers" if plait else "plait: not measured"
        rows.append(rate_row("e", f"{name}, prompt {p}, N={n}", rate, "tok/s", batch / step,
                             f"{versus}; floor {bound}-bound"))
    return rows
