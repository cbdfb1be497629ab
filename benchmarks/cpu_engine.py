"""CPU benchmark: plait's engine against transformers' ``generate`` on the bundled model, same run.

Prints a table:
- decode tokens/s at batch 1 and 8 (decode time = time(N new tokens) - time(1 new token), both sides,
  plait and transformers alternated within each repeat; medians), next to the bandwidth floor
  (weight bytes per step / measured copy bandwidth);
- 8 requests sharing a ~400-token prefix, 32 new tokens each: end-to-end time with the prefix cache on
  and off, and cached_tokens / prompt_tokens.

Usage: python benchmarks/cpu_engine.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.runtime.engine import Engine
from plait.runtime.models.registry import ensure_preset_dir
from plait.runtime.tokenizer import Tokenizer


def copy_bandwidth_gbs() -> float:
    x = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best / 1e9  # read + write


def plait_decode_runner(engine: Engine, prompts: list[list[int]]):
    def run(n: int) -> float:
        t = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": n, "ignore_eos": True})
        elapsed = time.perf_counter() - t
        engine.flush_cache()  # every run prefills the same way
        return elapsed

    return run


def hf_decode_runner(model, prompts: list[list[int]]):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0)
        return time.perf_counter() - t

    return run


def interleaved_decode_rates(runners: dict, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode tok/s per runner: batch * (N - 1) / (time(N) - time(1)), runners alternated within each
    repeat so that a machine whose speed drifts affects all of them alike; medians over repeats."""
    for run in runners.values():
        run(2)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            rates[name].append(batch * (new_tokens - 1) / (run(new_tokens) - run(1)))
    return {name: statistics.median(r) for name, r in rates.items()}


def shared_prefix_workload(tok: Tokenizer) -> list[list[int]]:
    system = "You are a meticulous assistant for a library. " + " ".join(
        f"Rule {i}: always check the catalogue entry {i * 7} before answering, and cite shelf {i % 13}."
        for i in range(18)
    )
    questions = ["Where are the atlases?", "Can I renew a book?", "When do you open?", "Is there wifi?",
                 "How many books can I borrow?", "Where is shelf 4?", "Do you have audiobooks?", "Who runs it?"]
    return [tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                                 {"role": "user", "content": q}])) for q in questions]


def run_shared_prefix(model_dir: str, prompts: list[list[int]], repeats: int):
    """End-to-end time of the 8 requests with the cache on and off (two engines, runs alternated)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    ratio = 0.0
    with Engine(model=model_dir) as on, Engine(model=model_dir, disable_radix_cache=True) as off:
        for eng in (on, off):
            eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            for cache_on, eng in ((True, on), (False, off)):
                eng.flush_cache()  # cold cache: the 8 requests share the prefix among themselves
                t = time.perf_counter()
                outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 32,
                                                                       "ignore_eos": True})
                times[cache_on].append(time.perf_counter() - t)
                if cache_on:
                    ratio = sum(o["meta_info"]["cached_tokens"] for o in outs) / sum(len(p) for p in prompts)
    return statistics.median(times[True]), statistics.median(times[False]), ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model_dir = str(ensure_preset_dir("smollm2-135m-instruct"))
    tok = Tokenizer.from_dir(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bw = copy_bandwidth_gbs()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    floor_b1 = bw * 1e9 / weight_bytes
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a cat."}]))
    rows = []
    with Engine(model=model_dir) as eng:
        for bs in (1, 8):
            prompts = [list(prompt) for _ in range(bs)]
            rates = interleaved_decode_rates({"plait": plait_decode_runner(eng, prompts),
                                              "hf": hf_decode_runner(hf, prompts)}, bs, args.new_tokens, args.repeats)
            p, h = rates["plait"], rates["hf"]
            rows.append((f"decode tok/s, batch {bs}", p, h, p / h, f"floor {floor_b1 * bs:.0f} (weights/bandwidth)"))
    shared = shared_prefix_workload(tok)
    t_on, t_off, hit = run_shared_prefix(model_dir, shared, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bw:.1f} GB/s, "
          f"weights {weight_bytes / 1e6:.0f} MB fp32")
    print(f"{'metric':34} {'plait':>10} {'transformers':>13} {'ratio':>7}  note")
    for name, p, h, r, note in rows:
        print(f"{name:34} {p:10.1f} {h:13.1f} {r:6.2f}x  {note}")
    print(f"{'shared prefix 8x~400 tok, e2e s':34} {'on ' + format(t_on, '.2f'):>10} {'off ' + format(t_off, '.2f'):>13} "
          f"{t_off / t_on:6.2f}x  cached/prompt tokens {hit:.2f}; prompt {sum(map(len, shared)) // len(shared)} tok avg")


if __name__ == "__main__":
    main()
