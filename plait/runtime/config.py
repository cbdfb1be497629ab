"""EngineConfig: every engine setting in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
# the default bound of piecewise CUDA graphs' token buckets: beyond it a step's device work hides its
# launches (a 4,096-token Llama-3.1-8B step is about 100 ms on an H200) and the graphs' activations cost memory
PIECEWISE_DEFAULT_MAX_TOKENS = 4096
# LoRA: PEFT's names of the linear maps an adapter may target; bounds on the adapter counts
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LORA_SLOTS = 1024
MAX_LOADED_LORAS = 4096
DEFAULT_MAX_LOADED_LORAS = 64
# kv_cache_dtype -> the torch dtype's name (None: the model's dtype)
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclass(frozen=True)
class Rendezvous:
    """Where tensor-parallel ranks meet (``EngineConfig.rendezvous``): ``nnodes`` hosts of
    ``ranks_per_node`` ranks each; this host is ``node_rank``; ``address`` ("host:port", node 0's) or None
    on one host (a free local port)."""

    nnodes: int
    node_rank: int
    address: str | None
    ranks_per_node: int

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.ranks_per_node + local_rank


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine. Derived values are properties; invalid values raise ValueError naming the field."""

    model: str = "smollm2-135m-instruct"
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    tokenizer_path: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # tensor parallelism: the model split over this many ranks, one process each (GPUs cuda:0 .. N-1 on a
    # GPU host, gloo on the CPU); the scheduler, radix cache and sampling run once, on rank 0
    tp_size: int = 1
    # tensor parallelism across hosts (SGLang's --nnodes / --node-rank / --dist-init-addr): tp_size ranks,
    # tp_size / nnodes on each host, joined at node 0's "host:port"; node 0 runs the engine (and serves),
    # the others only their ranks (``plait serve --node-rank R``). Unset: torchrun's environment (NNODES,
    # NODE_RANK, MASTER_ADDR and MASTER_PORT) where it is set, else one host (``rendezvous()``)
    nnodes: int | None = None
    node_rank: int | None = None
    dist_init_addr: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # expert weight format: None (the checkpoint's: MXFP4 when its quantization_config says so, else dtype)
    # | "mxfp4" (dummy weights drawn in MXFP4; a checkpoint must already be MXFP4)
    quantization: str | None = None
    context_length: int | None = None  # default: the model's, capped at 32768
    max_total_tokens: int | None = None  # KV slots; default from kv_cache_gb (CPU) or mem_fraction (GPU)
    kv_cache_gb: float = 1.0  # CPU KV budget when max_total_tokens is not given
    # the KV cache's element type: "auto" (the model's dtype) or FP8 ("fp8_e4m3", its alias "fp8", or
    # "fp8_e5m2"; SGLang's and vLLM's names): half the bytes of bf16, so twice the tokens, values rounded to
    # 3 (e4m3) or 2 (e5m2) mantissa bits and saturated at the format's largest finite value (unit scales,
    # as both do without calibrated ones); attention reads it back in the model's dtype
    kv_cache_dtype: str = "auto"
    # models mixing sliding-window and full-attention layers (GPT-OSS): the sliding layers keep their KV
    # in a smaller pool of their own, since they read only their window (SGLang's hybrid SWA memory; its
    # names). The sliding pool holds swa_full_tokens_ratio times the full pool's tokens, and at least
    # what every running request's window needs (None: 0.1 of it, with that floor)
    disable_hybrid_swa_memory: bool = False
    swa_full_tokens_ratio: float | None = None
    mem_fraction: float = 0.85  # GPU: fraction of device memory for weights + KV
    # requests decoding at once, and the largest decode batch replayed from captured CUDA graphs (larger
    # batches run eagerly). None: ``batch_limits``' defaults, by device and model
    max_running_requests: int | None = None
    # admission reserves KV for the running requests' expected outputs (scheduler.py, SGLang's
    # new-token ratio) scaled by this; 0 reserves nothing (admit while the prompts fit, retract later)
    schedule_conservativeness: float = 1.0
    chunked_prefill_size: int = 2048  # per-step budget of prefill tokens; longer prompts are chunked
    schedule_policy: str = "lpm"  # lpm (longest prefix match first) | fcfs
    disable_radix_cache: bool = False
    attention_backend: str = "auto"  # auto: triton on CUDA, torch on CPU
    disable_cuda_graph: bool = False
    enable_overlap: bool | None = None  # schedule step N+1 while the device runs step N; None: on for CUDA
    cuda_graph_max_bs: int | None = None
    # prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs (everything but
    # attention, captured per token bucket; executor/piecewise_graph.py); larger ones run eagerly.
    # None: chunked_prefill_size, at most PIECEWISE_DEFAULT_MAX_TOKENS. Off with disable_cuda_graph too
    disable_piecewise_cuda_graph: bool = False
    piecewise_cuda_graph_max_tokens: int | None = None
    # constrained decoding: from how many decoding requests on jump-forward's forced tokens are computed one
    # a step inside the decode batch (which keeps the step on its CUDA graph) rather than in one extend
    # chunk (which makes the whole step a mixed, eager one); 0: always in one extend. None: 8 where decode
    # steps replay CUDA graphs, else 0 (an eager step loses nothing to an extend)
    jump_forward_decode_min_batch: int | None = None
    # constrained requests end valid within max_new_tokens (docs/constrained.md, "Ending within the token
    # budget"): near the budget's end a search finds a short ending and the engine appends it. True turns
    # this off: such requests are cut at max_new_tokens, as SGLang and vLLM cut them (finish "length",
    # meta_info incomplete), and their last tokens cost the engine thread no searches
    disable_budget_steering: bool = False
    random_seed: int = 0
    tune_gemv: bool = True  # CUDA bf16/fp16: at load, time a Triton GEMV against cuBLAS per linear shape for batch 1
    cpu_prepack: bool = True  # CPU float32: keep MKL-prepacked weights for small-batch decode (2x the weight memory)
    inbatch_prefix_threshold: int = 32  # defer a waiting request sharing this many uncached tokens with one just admitted
    # program-aware caching: tokens one open program run may keep pinned in the prefix cache
    # (None: a quarter of the KV cache; 0: program ids are accepted but pin nothing)
    max_pinned_tokens_per_program: int | None = None
    # grammar compilation (constrained decoding; docs/constrained.md): compile worker processes (0: threads
    # of the engine process, no isolation), per-compile timeout (the worker is killed past it), compiles
    # waiting for a worker at most, estimated bytes of compiled grammars cached, and bounds on one
    # constraint checked before compiling (source bytes, bracket / JSON nesting, EBNF rules)
    grammar_compile_workers: int = 2
    grammar_compile_timeout_s: float = 30.0
    grammar_compile_max_queued: int = 64
    grammar_cache_bytes: int = 512 * 2**20
    grammar_max_bytes: int = 256 * 1024
    grammar_max_depth: int = 64
    grammar_max_rules: int = 1000
    # a JSON schema compiled relaxed (docs/constrained.md, "Relaxed schemas"): attempts per request, the first
    # included, until the document validates against the original schema
    grammar_relaxed_max_attempts: int = 3
    max_samples_per_prompt: int = 128  # the largest n (parallel samples of one prompt); past it: ValueError
    # prompt positions whose logprobs one step computes (all requests together): a request asking for
    # prompt logprobs is prefilled in chunks of at most this many scored positions, so that its logprob
    # work (log-softmax and top-k over the vocabulary per position) cannot stall others' decode steps
    prompt_logprob_chunk_size: int = 512
    # multi-LoRA serving (docs/architecture.md, "LoRA adapters"; SGLang's names): PEFT adapters loaded at
    # start, as {name: path} or a list of "name=path" / "path" (the path is then the name); enable_lora
    # keeps LoRA buffers without them (adapters loaded at run time). max_loras_per_batch: adapters on the
    # device at once (slots; so also the most distinct adapters in one batch); max_loaded_loras: adapters
    # registered (kept in host memory) at most, None: DEFAULT_MAX_LOADED_LORAS. max_lora_rank: the slots'
    # rank, None: the largest of lora_paths (else 64); lora_target_modules: the modules with LoRA buffers
    # (of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj), None: lora_paths' targets (else all)
    enable_lora: bool = False
    lora_paths: tuple[str, ...] | None = None
    max_loras_per_batch: int = 8
    max_loaded_loras: int | None = None
    max_lora_rank: int | None = None
    lora_target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._check_lora_settings()
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.quantization not in (None, "mxfp4"):
            raise ValueError(f"quantization must be None or 'mxfp4', got {self.quantization!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError(f"schedule_policy must be 'lpm' or 'fcfs', got {self.schedule_policy!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}")
        if type(self.tp_size) is not int or self.tp_size < 1:
            raise ValueError(f"tp_size must be an int >= 1, got {self.tp_size!r}")
        if self.nnodes is not None or self.node_rank is not None or self.dist_init_addr is not None:
            self.rendezvous()  # the explicit values are checked now (the environment's when used)
        for name in ("max_running_requests", "chunked_prefill_size", "cuda_graph_max_bs", "max_samples_per_prompt",
                     "prompt_logprob_chunk_size", "piecewise_cuda_graph_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.jump_forward_decode_min_batch is not None and self.jump_forward_decode_min_batch < 0:
            raise ValueError(f"jump_forward_decode_min_batch must be >= 0 or None, got {self.jump_forward_decode_min_batch}")
        for name in ("context_length", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2, got {value}")
        if not 0 < self.mem_fraction <= 1:
            raise ValueError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if self.max_pinned_tokens_per_program is not None and self.max_pinned_tokens_per_program < 0:
            raise ValueError(f"max_pinned_tokens_per_program must be >= 0 or None, got {self.max_pinned_tokens_per_program}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.swa_full_tokens_ratio is not None and not 0 < self.swa_full_tokens_ratio <= 1:
            raise ValueError(f"swa_full_tokens_ratio must be in (0, 1] or None, got {self.swa_full_tokens_ratio}")
        if self.schedule_conservativeness < 0:
            raise ValueError(f"schedule_conservativeness must be >= 0, got {self.schedule_conservativeness}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.grammar_compile_workers < 0:
            raise ValueError(f"grammar_compile_workers must be >= 0, got {self.grammar_compile_workers}")
        if self.grammar_compile_timeout_s <= 0:
            raise ValueError(f"grammar_compile_timeout_s must be > 0, got {self.grammar_compile_timeout_s}")
        if self.grammar_relaxed_max_attempts < 1:
            raise ValueError(f"grammar_relaxed_max_attempts must be >= 1, got {self.grammar_relaxed_max_attempts}")
        for name in ("grammar_compile_max_queued", "grammar_cache_bytes", "grammar_max_bytes",
                     "grammar_max_depth", "grammar_max_rules"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _check_lora_settings(self) -> None:
        pairs = parse_lora_paths(self.lora_paths)
        object.__setattr__(self, "lora_paths", pairs or None)  # normalized: ((name, path), ...)
        if type(self.max_loras_per_batch) is not int or not 1 <= self.max_loras_per_batch <= MAX_LORA_SLOTS:
            raise ValueError(f"max_loras_per_batch must be an int in [1, {MAX_LORA_SLOTS}], got {self.max_loras_per_batch!r}")
        loaded = self.max_loaded_loras
        if loaded is not None and (type(loaded) is not int or not self.max_loras_per_batch <= loaded <= MAX_LOADED_LORAS):
            raise ValueError(f"max_loaded_loras must be an int in [max_loras_per_batch, {MAX_LOADED_LORAS}], got "
                             f"{loaded!r}")
        if len(pairs) > self.resolved_max_loaded_loras:
            raise ValueError(f"lora_paths names {len(pairs)} adapters; max_loaded_loras is {self.resolved_max_loaded_loras}")
        if self.max_lora_rank is not None and (type(self.max_lora_rank) is not int or not 1 <= self.max_lora_rank <= 1024):
            raise ValueError(f"max_lora_rank must be an int in [1, 1024] or None, got {self.max_lora_rank!r}")
        targets = self.lora_target_modules
        if targets is not None:
            targets = (targets,) if isinstance(targets, str) else tuple(targets)
            if "all" in targets:
                targets = LORA_TARGET_MODULES
            bad = [t for t in targets if t not in LORA_TARGET_MODULES]
            if bad or not targets:
                raise ValueError(f"lora_target_modules must name some of {list(LORA_TARGET_MODULES)} (or 'all'), got {bad or targets}")
            object.__setattr__(self, "lora_target_modules", targets)

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine keeps LoRA buffers (``enable_lora`` or adapters in ``lora_paths``)."""
        return self.enable_lora or bool(self.lora_paths)

    @property
    def resolved_max_loaded_loras(self) -> int:
        if self.max_loaded_loras is not None:
            return self.max_loaded_loras
        return max(DEFAULT_MAX_LOADED_LORAS, self.max_loras_per_batch)

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step carries: ``chunked_prefill_size`` prompt tokens beside one token for each
        of up to ``max_running_requests`` decoding requests (decode rows are not charged to the budget)."""
        return self.chunked_prefill_size + self.max_running_requests

    def piecewise_max_tokens(self) -> int:
        """The largest step replayed from piecewise CUDA graphs (0: none), where CUDA graphs are used."""
        if self.disable_cuda_graph or self.disable_piecewise_cuda_graph:
            return 0
        if self.piecewise_cuda_graph_max_tokens is not None:
            return self.piecewise_cuda_graph_max_tokens
        return min(self.chunked_prefill_size, PIECEWISE_DEFAULT_MAX_TOKENS)

    def with_batch_limits(self, device_type: str, is_moe: bool, device_memory: int = 0) -> "EngineConfig":
        """This config with ``max_running_requests`` and ``cuda_graph_max_bs`` set where they are None
        (``batch_limits``); the engine runs on the result."""
        running, graphs = batch_limits(device_type, is_moe, device_memory)
        running = self.max_running_requests if self.max_running_requests is not None else running
        graphs = self.cuda_graph_max_bs if self.cuda_graph_max_bs is not None else min(graphs, running)
        return dataclasses.replace(self, max_running_requests=running, cuda_graph_max_bs=graphs)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from keyword arguments; an unknown setting raises TypeError naming it and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**kwargs)

    def rendezvous(self, environ: Any = None) -> "Rendezvous":
        """Where this process's tensor-parallel ranks meet: the settings, else torchrun's environment
        variables (``environ``, default ``os.environ``), else one host. Raises ValueError on a bad value."""
        import os

        env = os.environ if environ is None else environ
        if self.tp_size == 1:  # one rank: a torchrun environment around a single-GPU engine means nothing here
            env = {}

        def number(value: Any, variable: str, default: int) -> int:
            if value is None:
                value = env.get(variable, default)
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{variable.lower()} must be an int, got {value!r}") from None

        nnodes = number(self.nnodes, "NNODES", 1)
        node_rank = number(self.node_rank, "NODE_RANK", 0)
        address = self.dist_init_addr
        if address is None and nnodes > 1 and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
            address = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ValueError(f"nnodes must be >= 1 and node_rank in [0, nnodes), got nnodes={nnodes}, "
                             f"node_rank={node_rank}")
        if nnodes > 1 and self.tp_size % nnodes:
            raise ValueError(f"tp_size ({self.tp_size}) must be a multiple of nnodes ({nnodes}): each host runs "
                             "the same number of ranks")
        if address is not None:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr must be 'host:port', got {address!r}")
        if nnodes > 1 and address is None:
            raise ValueError("tensor parallelism over several hosts needs node 0's address: dist_init_addr "
                             "'host:port' (or MASTER_ADDR and MASTER_PORT in the environment)")
        return Rendezvous(nnodes, node_rank, address, self.tp_size // nnodes)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def parse_lora_paths(value: Any) -> tuple[tuple[str, str], ...]:
    """``lora_paths`` as (name, path) pairs: a dict ``{name: path}``, or a list of ``"name=path"`` or
    ``"path"`` (the path is the name), SGLang's forms, or such pairs. Raises ValueError on another shape
    or a repeated name."""
    if value is None:
        return ()
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str):
        items = [_split_lora_spec(value)]
    elif isinstance(value, (list, tuple)):
        items = [_split_lora_spec(v) if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else v
                 for v in value]
    else:
        raise ValueError(f"lora_paths must be a dict {{name: path}} or a list of 'name=path', got {type(value).__name__}")
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) and s for s in item)):
            raise ValueError(f"lora_paths entry {item!r} is not a (name, path) of non-empty strings")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"lora_paths names an adapter twice: {names}")
    return tuple(items)


def _split_lora_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (spec, spec)


# Default batch limits: (max_running_requests, cuda_graph_max_bs).
DENSE_BATCH_LIMITS = (256, 256)
# Mixture-of-experts models on a GPU with at least MOE_LARGE_BATCH_MIN_MEMORY: from about 64 requests on,
# a decode step reads nearly every expert, so a larger batch costs little more per step and offline
# throughput is bound by how many requests run at once. Measured on an H200 (benchmarks/RESULTS.md,
# 2026-12-01): GPT-OSS-120B, 1000 x 1024 in / 1024 out, 9,482 total tok/s at (256, 256) against 12,369
# at (1024, 512); the admission's KV reservation (scheduler.py) keeps the running requests within what
# the KV cache holds. Decode batches above the graphs' limit run eagerly, so the graphs go up to the
# whole 1,024: with the hybrid sliding-window KV layout 561 (120b) and all 1,000 (20b) requests run at
# once, and graphs up to 1,024 instead of 512 gave 11,555 -> 13,049 (120b) and 21,369 -> 24,694 (20b)
# total tok/s, for ~8 s more capture at start-up and 0.7% of the 120b's KV cache. On smaller GPUs the
# memory kept for 1024 requests' logits (2.5 GB at GPT-OSS's vocabulary) would take a large share of a
# KV cache that holds fewer requests anyway.
MOE_GPU_BATCH_LIMITS = (1024, 1024)
MOE_LARGE_BATCH_MIN_MEMORY = 100 * 2**30


def batch_limits(device_type: str, is_moe: bool, device_memory: int = 0) -> tuple[int, int]:
    """Default ``(max_running_requests, cuda_graph_max_bs)`` for a device type ("cuda", "cpu"), model and
    the device's total memory in bytes."""
    if device_type == "cuda" and is_moe and device_memory >= MOE_LARGE_BATCH_MIN_MEMORY:
        return MOE_GPU_BATCH_LIMITS
    return DENSE_BATCH_LIMITS
