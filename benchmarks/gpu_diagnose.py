"""GPU diagnostics behind the figures in RESULTS.md (Llama-3.1-8B config by default, dummy weights).

    python benchmarks/gpu_diagnose.py profile [--model gpt-oss-120b]  # where the batch-1 decode step's time goes
    python benchmarks/gpu_diagnose.py decode-batched --batches 64 128 256  # the same for batched decode
    python benchmarks/gpu_diagnose.py ttft --prompt-lens 64 256 1024  # the engine's own TTFT, fresh prompts
    python benchmarks/gpu_diagnose.py gemv      # cuBLAS bf16 GEMV bandwidth at the 8B layer shapes
    python benchmarks/gpu_diagnose.py drift     # per-layer hidden-state error, plait vs transformers, float32

``profile`` times the batch-1 decode CUDA graph's replay and lists its kernels (GPU time per step),
then the kernels one whole engine step launches outside the graph. ``drift`` shares the engine's
float32 weights with a transformers model (views, no copy) and compares every layer's output on one
prompt, next to transformers' own sdpa-vs-eager difference (how far two correct float32
implementations of these random weights drift apart).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from plait.bench import parse_engine_arg
from plait.runtime.engine import Engine

PROMPT_LEN = 128


def _greedy(n: int) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}


def _kernel_table(prof, steps: int, top: int = 40) -> tuple[str, float]:
    """Kernels by GPU time per step; also the total GPU time per step (ms)."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[ev.name[:90]]
            t[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            t[1] += 1
    total_us = sum(v[0] for v in totals.values()) / steps
    lines = [f"{'us/step':>9} {'calls/step':>10}  kernel"]
    for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / steps:9.1f} {calls / steps:10.1f}  {name}")
    return "\n".join(lines), total_us / 1000


def profile(model: str = "llama-3.1-8b") -> None:
    engine = Engine(model=model, load_format="dummy", device="cuda", max_total_tokens=16384,
                    max_running_requests=8, cuda_graph_max_bs=8)
    prompt = torch.randint(0, engine.model_config.vocab_size, (PROMPT_LEN,)).tolist()
    try:
        from plait.runtime.kernels.gemv import tuning_report

        print("\n".join(tuning_report()))
    except ImportError:
        pass
    engine.generate(input_ids=prompt, sampling_params=_greedy(32))

    # wall time per decode token, as bench row (a) measures it
    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(input_ids=prompt, sampling_params=_greedy(n))
        return time.perf_counter() - t0

    per_token = statistics.median((timed(129) - timed(1)) / 128 for _ in range(3))
    print(f"engine decode, batch 1: {per_token * 1e3:.3f} ms/token ({1 / per_token:.1f} tok/s)")

    graph = engine.runner.cuda_graphs.graphs[1]
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 50)
    print(f"bs=1 graph replay: {statistics.median(times):.3f} ms (median of 5 x 50 replays)")

    steps = 20
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    table, total = _kernel_table(prof, steps)
    print(f"\n== kernels of one bs=1 graph replay (GPU busy {total:.3f} ms/step)\n{table}")

    n = 64
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.generate(input_ids=prompt, sampling_params=_greedy(n))
        torch.cuda.synchronize()
    table, total = _kernel_table(prof, n, top=25)
    print(f"\n== all kernels of one engine request ({n} tokens, per token; GPU busy {total:.3f} ms/token)\n{table}")
    engine.shutdown()


def idle_gaps(trace_path: str, steps: int, top: int = 12) -> str:
    """The device's idle time between kernels in a profiler trace, per step, by cause: "host late" when the
    next kernel was launched only after the device ran dry (the host set the pace), "queued" when it was
    launched before (the device waited on something else: a copy, an event). The largest causes are
    listed with the next kernel's name and the API call that launched it (runtime or driver API: Triton
    launches through the driver's ``cuLaunchKernelEx``)."""
    events = json.load(open(trace_path))["traceEvents"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    causes: dict[tuple[str, str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    totals = collections.Counter()
    for prev, nxt in zip(device, device[1:]):
        prev_end = prev["ts"] + prev.get("dur", 0)
        gap = nxt["ts"] - prev_end
        if gap <= 2:
            continue
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        late = launch is not None and launch["ts"] + launch.get("dur", 0) > prev_end
        kind = "host late" if late else "queued"
        totals[kind] += gap
        key = (kind, nxt["name"][:60], launch["name"] if launch else "?")
        causes[key][0] += gap
        causes[key][1] += 1
    span = device[-1]["ts"] + device[-1].get("dur", 0) - device[0]["ts"]
    lines = [f"device span {span / steps / 1e3:.3f} ms a step; idle: "
             + ", ".join(f"{k} {v / steps / 1e3:.3f} ms" for k, v in totals.items()) + " a step",
             f"{'us/step':>9} {'gaps/step':>9}  cause / next kernel / launched by"]
    for (kind, name, api), (us, n) in sorted(causes.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / steps:9.1f} {n / steps:9.1f}  {kind} / {name} / {api}")
    return "\n".join(lines)


def trace_idle_gaps(prof, steps: int) -> str:
    """``idle_gaps`` of a finished profiler run (its Chrome trace written to a scratch file)."""
    with tempfile.TemporaryDirectory() as scratch:
        trace = os.path.join(scratch, "trace.json")
        prof.export_chrome_trace(trace)
        return idle_gaps(trace, steps)


def decode_batched(model: str, batches: list[int], prompt_len: int = PROMPT_LEN, new_tokens: int = 128) -> None:
    """Where a batched decode step's time goes, for each batch size: the wall time a step (as bench row b
    measures it: (time(N) - time(1)) / (N - 1)), the replay of that batch's CUDA graph alone, its kernels,
    and the kernels and host ops of whole engine steps (GPU busy against wall shows the host's share)."""
    engine = Engine(model=model, load_format="dummy", device="cuda", max_running_requests=max(batches),
                    cuda_graph_max_bs=max(batches))
    runner = engine.runner.cuda_graphs
    for batch in batches:
        prompts = torch.randint(0, engine.model_config.vocab_size, (batch, prompt_len)).tolist()
        engine.generate(input_ids=prompts, sampling_params=_greedy(2))  # warm-up; leaves the prompts cached

        def timed(n: int) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(input_ids=prompts, sampling_params=_greedy(n))
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        step = statistics.median((timed(new_tokens) - timed(1)) / (new_tokens - 1) for _ in range(3))
        print(f"\n==== batch {batch}, prompt {prompt_len}, N={new_tokens}: {step * 1e3:.3f} ms a step "
              f"({batch / step:,.0f} tok/s)")
        padded = min(bs for bs in runner.batch_sizes if bs >= batch)
        graph = runner.graphs[padded]  # its buffers hold the last decode step of the run above
        for _ in range(5):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        print(f"graph replay (bs {padded}): {start.elapsed_time(end) / 20:.3f} ms")
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
        table, total = _kernel_table(prof, 10, top=30)
        print(f"-- kernels of one replay (GPU busy {total:.3f} ms)\n{table}")
        n = 32
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            engine.generate(input_ids=prompts, sampling_params=_greedy(n))
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        table, total = _kernel_table(prof, n, top=15)
        print(f"-- kernels of a whole {n}-token run, per step (GPU busy {total:.3f} ms; wall {wall / n * 1e3:.3f} "
              f"ms a step, profiler on)\n{table}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:  # device and API calls only: cheaper
            t0 = time.perf_counter()
            engine.generate(input_ids=prompts, sampling_params=_greedy(n))
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        print(f"-- where the device idles ({n}-token run, device activity only, wall {wall / n * 1e3:.3f} "
              f"ms a step)\n{trace_idle_gaps(prof, n)}")
    engine.shutdown()


def batch_prefill(model: str, batch: int, prompt_len: int) -> None:
    """Wall time of ``batch`` prompts of ``prompt_len`` random tokens with one new token (the prefill of
    bench row b), three times; then the kernels and host ops of a fourth run by GPU and CPU time."""
    engine = Engine(model=model, load_format="dummy", device="cuda")
    prompts = torch.randint(0, engine.model_config.vocab_size, (batch, prompt_len)).tolist()
    for n in (257, 1):  # first what bench row a does (batch 1, 128-token prompt, 256 new tokens)
        t0 = time.perf_counter()
        engine.generate(input_ids=prompts[0], sampling_params=_greedy(n))
        print(f"batch 1, {prompt_len} tokens, {n} new: {time.perf_counter() - t0:.3f} s")
    for i in range(3):
        engine.flush_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=_greedy(1))
        torch.cuda.synchronize()
        print(f"run {i}: {batch} x {prompt_len} tokens, 1 new: {time.perf_counter() - t0:.3f} s")
    engine.flush_cache()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.generate(input_ids=prompts, sampling_params=_greedy(1))
        torch.cuda.synchronize()
    table, total = _kernel_table(prof, 1, top=20)
    print(f"\n== kernels (GPU busy {total:.1f} ms)\n{table}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    engine.shutdown()


def ttft(model: str, prompt_lens: list[int], repeats: int = 12, settings: dict | None = None) -> None:
    """The engine's own time to first token for fresh prompts (nothing cached), one at a time: the wall
    time of ``generate(max_new_tokens=1)``, and inside it the model forward's host time (the call's return)
    against its device time (CUDA events), then where the device idles in one such request (a device
    trace: "host late" gaps are the host's launches) and the host ops by CPU time. ``settings``: more
    ``Engine`` settings (``--engine-arg``)."""
    engine = Engine(model=model, load_format="dummy", device="cuda", **(settings or {}))
    runner = engine.runner
    calls: list[tuple[int, float, torch.cuda.Event, torch.cuda.Event]] = []
    plain_forward = runner.forward

    def timed_forward(batch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        logits = plain_forward(batch)
        host = time.perf_counter() - t0
        end.record()
        calls.append((int(batch.input_ids.numel()), host, start, end))
        return logits

    runner.forward = timed_forward
    vocab = engine.model_config.vocab_size

    def fresh(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,)).tolist()

    for n in prompt_lens:
        engine.generate(input_ids=fresh(n), sampling_params=_greedy(1))  # warm-up
        walls, forwards = [], []
        for _ in range(repeats):
            calls.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(input_ids=fresh(n), sampling_params=_greedy(1))
            walls.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            forwards.extend((tokens, host, start.elapsed_time(end)) for tokens, host, start, end in calls)
        prefill = [(host, device) for tokens, host, device in forwards if tokens > 1]
        print(f"\n==== fresh prompt of {n} tokens, 1 new token: wall {statistics.median(walls) * 1e3:.2f} ms "
              f"median of {repeats} (min {min(walls) * 1e3:.2f}); forwards a request {len(forwards) / repeats:.1f}; "
              f"prefill forward: host {statistics.median(h for h, _ in prefill) * 1e3:.2f} ms, "
              f"device {statistics.median(d for _, d in prefill):.2f} ms")
        prompt = fresh(n)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate(input_ids=prompt, sampling_params=_greedy(1))
            torch.cuda.synchronize()
        table, total = _kernel_table(prof, 1, top=12)
        print(f"-- kernels of one request (GPU busy {total:.2f} ms)\n{table}")
        print(f"-- where the device idles (one request)\n{trace_idle_gaps(prof, 1)}")
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(input_ids=fresh(n), sampling_params=_greedy(1))
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    runner.forward = plain_forward
    engine.shutdown()


def gemv() -> None:
    """bf16 [1, K] x [K, N] through torch (cuBLAS) at the 8B shapes, 8 rotated weight copies (no L2 reuse)."""
    shapes = {"qkv 4096x6144": (4096, 6144), "o 4096x4096": (4096, 4096), "gate_up 4096x28672": (4096, 28672),
              "down 14336x4096": (14336, 4096), "lm_head 4096x128256": (4096, 128256)}
    print(f"{'shape':>22} {'us':>8} {'GB/s':>8}")
    for name, (k, n) in shapes.items():
        copies = 2 if n > 100000 else 8
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for w in ws:
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 40
        start.record()
        for i in range(reps):
            torch.nn.functional.linear(x, ws[i % copies])
        end.record()
        end.synchronize()
        us = start.elapsed_time(end) / reps * 1000
        print(f"{name:>22} {us:8.1f} {k * n * 2 / us / 1e3:8.1f}")
        del ws


def drift(prompt_len: int, model_name: str = "llama-3.1-8b", device: str = "cuda", init: str = "engine") -> None:
    from plait.bench.hf_reference import build_hf_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    load = "dummy" if model_name == "llama-3.1-8b" else "auto"
    engine = Engine(model=model_name, load_format=load, device=device, dtype="float32",
                    max_total_tokens=4096, max_running_requests=2, disable_cuda_graph=True)
    model = engine.runner.model
    if init == "normal":  # transformers' own init: linear and embedding weights normal(0, 0.02), norms 1
        gen = torch.Generator(device=device).manual_seed(0)
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.data.normal_(0.0, 0.02, generator=gen)
    hf = build_hf_model(model, engine.model_source.config, torch.device(device))
    ids = torch.randint(0, engine.model_config.vocab_size, (prompt_len,)).tolist()

    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        x, residual = output
        if x.shape[0] == prompt_len:
            captured.append((x + residual).detach().clone())

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    for h in handles:
        h.remove()
    ours_lp = torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])

    def hf_run(impl: str):
        hf.config._attn_implementation = impl
        for layer in hf.model.layers:
            layer.self_attn.config._attn_implementation = impl
        with torch.no_grad():
            res = hf(torch.tensor([ids], device=device), output_hidden_states=True)
        logits = res.logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu()
        return [h[0] for h in res.hidden_states], lp

    sdpa_h, sdpa_lp = hf_run("sdpa")
    eager_h, eager_lp = hf_run("eager")

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    print(f"prompt {prompt_len} tokens, float32, TF32 off, weights: {init}")
    print(f"{'layer':>5} {'|h|':>10} {'plait vs sdpa':>14} {'eager vs sdpa':>14} {'last-pos plait':>15} {'last-pos eager':>15}")
    for i, ours in enumerate(captured[: len(sdpa_h) - 2]):
        ref = sdpa_h[i + 1]
        print(f"{i:5d} {ref.norm().item():10.1f} {rel(ours, ref):14.2e} {rel(eager_h[i + 1], ref):14.2e} "
              f"{rel(ours[-1], ref[-1]):15.2e} {rel(eager_h[i + 1][-1], ref[-1]):15.2e}")
    print(f"prompt logprobs, mean |diff| vs sdpa: plait {(ours_lp - sdpa_lp).abs().mean():.4f}, "
          f"eager {(eager_lp - sdpa_lp).abs().mean():.4f}; max plait {(ours_lp - sdpa_lp).abs().max():.4f}, "
          f"eager {(eager_lp - sdpa_lp).abs().max():.4f}")
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["profile", "gemv", "drift", "batch-prefill", "decode-batched", "ttft"],
                        nargs="+")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256], help="decode-batched: batch sizes")
    parser.add_argument("--batch", type=int, default=64, help="batch-prefill: prompts in the batch")
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 256, 1024], help="ttft: fresh prompt lengths")
    parser.add_argument("--model", default="llama-3.1-8b", help="profile: the preset (dummy weights); drift: a preset/dir (non-8B models load real weights)")
    parser.add_argument("--device", default="cuda", help="drift: cuda or cpu")
    parser.add_argument("--init", default="engine", choices=["engine", "normal"],
                        help="drift: the engine's dummy weights, or transformers' normal(0, 0.02) init")
    parser.add_argument("--engine-arg", dest="engine_args", type=parse_engine_arg, action="append", default=[],
                        metavar="KEY=VALUE", help="ttft: an Engine setting (as plait bench takes it); repeatable")
    args = parser.parse_args()
    for what in args.what:
        print(f"\n######## {what}")
        if what == "drift":
            drift(args.prompt_len, args.model, args.device, args.init)
        elif what == "profile":
            profile(args.model)
        elif what == "decode-batched":
            decode_batched(args.model, args.batches)
        elif what == "ttft":
            ttft(args.model, args.prompt_lens, settings=dict(args.engine_args))
        elif what == "batch-prefill":
            batch_prefill(args.model, args.batch, args.prompt_len)
        else:
            {"profile": profile, "gemv": gemv}[what]()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
