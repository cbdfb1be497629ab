"""ModelRunner: owns the model weights, the KV pool and the request-to-slot table; runs forward passes.

It executes; it makes no scheduling decisions.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable

import torch

from plait.runtime.config import KV_CACHE_DTYPES, EngineConfig
from plait.runtime.constrained.bitmask import apply_batch_bitmask
from plait.runtime.distributed import TensorParallelLayout, tensor_parallel
from plait.runtime.executor.cuda_graph import CudaGraphRunner
from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.executor.loader import ModelLoadError, iter_safetensors_weights
from plait.runtime.executor.piecewise_graph import PiecewiseCudaGraphRunner
from plait.runtime.kvcache.pool import KVPool
from plait.runtime.kvcache.table import ReqToSlotTable
from plait.runtime.layers.attention import TorchAttentionBackend
from plait.runtime.lora import LoraManager, build_lora_manager, whole_model_shapes
from plait.runtime.models.architectures import model_class
from plait.runtime.models.config import ModelConfig
from plait.runtime.models.registry import ModelSource

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_CONTEXT = 32768


def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every meta parameter with uninitialized storage on ``device`` in ``dtype``, keeping
    each parameter's ``weight_loader`` (``Module.to_empty`` would drop such attributes). Parameters
    that are not floating point (MXFP4 codes and scales, uint8) keep their dtype."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            param_dtype = dtype if param.is_floating_point() else param.dtype
            new = torch.nn.Parameter(torch.empty(param.shape, device=device, dtype=param_dtype), requires_grad=False)
            if hasattr(param, "weight_loader"):
                new.weight_loader = param.weight_loader
            setattr(module, name, new)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    """Builds the model on the meta device, materializes it on the target device and loads its weights."""

    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        self.device = torch.device(config.resolved_device())
        self.dtype = resolve_dtype(config, self.device)
        self.model_config = _with_engine_quantization(ModelConfig.from_hf(source.config), config, source)
        cfg = self.model_config
        # this rank's part of the model with tp_size > 1 (its rank: this process's tensor-parallel group),
        # else the whole model: its head counts size the attention backend, the KV cache and the graphs' buffers
        tp = tensor_parallel()
        if config.tp_size > 1 and tp.size != config.tp_size:
            raise RuntimeError(f"tp_size={config.tp_size} but this process is not a rank of such a group "
                               "(the engine starts one: Engine(tp_size=N))")
        self.tp_layout = (TensorParallelLayout.for_model(cfg, tp.rank, tp.size) if config.tp_size > 1
                          else TensorParallelLayout.for_model(cfg))
        self.local_config = self.tp_layout.local_config(cfg)
        memory = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0
        self.config = config = config.with_batch_limits(self.device.type, cfg.moe is not None, memory)
        limit = cfg.max_position_embeddings
        if config.context_length is not None and config.context_length > limit:
            raise ValueError(f"context_length {config.context_length} exceeds the model's limit {limit}")
        self.context_length = config.context_length or min(limit, DEFAULT_MAX_CONTEXT)
        self.attn_backend = self._build_attention_backend()
        self.model = self._build_model(source)
        # LoRA adapters (None: off): their slot buffers are allocated before the KV pool takes the memory
        # left, and the targeted linears are wrapped before any graph is captured
        steps = max(config.max_step_tokens, config.piecewise_max_tokens(),
                    config.cuda_graph_max_bs or 0)
        self.lora: LoraManager | None = build_lora_manager(config, self.model, steps, self.device, self.dtype,
                                                           whole_model_shapes(cfg))
        self.pool = self._build_pool()
        # one extra row, reserved: padded rows of CUDA-graph batches read slot 0 through it
        self.slot_table = ReqToSlotTable(config.max_running_requests + 1, self.context_length + 1, self.device,
                                         full_to_sliding=self.pool.full_to_sliding)
        self.pad_row = self.slot_table.alloc()
        self.cuda_graphs: CudaGraphRunner | None = None
        # tensor parallelism's rank 0: called with each batch before its forward (sends it to the other ranks)
        self.before_forward: Callable[[ForwardBatch], None] | None = None
        self.piecewise_graphs: PiecewiseCudaGraphRunner | None = None
        self.graph_steps = 0  # decode steps replayed from a captured CUDA graph
        self.piecewise_graph_steps = 0  # prefill and mixed steps replayed piecewise (the others ran eagerly)
        if self.device.type == "cuda" and not config.disable_cuda_graph and self.backend_name == "triton":
            self.cuda_graphs = CudaGraphRunner(self, min(config.cuda_graph_max_bs, config.max_running_requests))
            with self.lora.capturing() if self.lora is not None else contextlib.nullcontext():
                self.cuda_graphs.capture()
                max_tokens = config.piecewise_max_tokens()
                if max_tokens:
                    self.piecewise_graphs = PiecewiseCudaGraphRunner(self, max_tokens, pool=self.cuda_graphs.mempool)
                    self.piecewise_graphs.capture()
        if self.device.type == "cuda":
            self.warm_up_steps()

    def warm_up_steps(self, sizes: list[int] | None = None) -> list[int]:
        """Run eager prefill steps of ``sizes`` tokens (default: ``warm_up_sizes``: every power of two up
        to the largest step, the prefill budget and the largest step) once at start-up, each a mixed
        batch: one request's prompt and one decode row, both on the reserved pad row writing slot 0
        (nothing is allocated yet).

        Triton compiles a kernel variant on its first launch, and the MoE tiling changes with the token
        count (``fused_moe_config.token_bucket``): without this the first mixed and prefill steps of a
        loaded server compile them (seconds each on a busy host, measured as TTFT tails of several
        seconds at concurrency 256). Decode-only sizes are compiled by the CUDA-graph capture.
        Returns the sizes run."""
        if sizes is None:
            sizes = warm_up_sizes(self.config.chunked_prefill_size, self.config.max_running_requests)
        start = time.perf_counter()
        device = self.device
        for n in sizes:
            prompt = n - 1
            batch = ForwardBatch(
                input_ids=torch.zeros(n, dtype=torch.int64, device=device),
                positions=torch.cat((torch.arange(prompt, device=device), torch.zeros(1, dtype=torch.int64,
                                                                                      device=device))),
                out_cache_loc=torch.zeros(n, dtype=torch.int64, device=device),
                req_rows=torch.full((2,), self.pad_row, dtype=torch.int64, device=device),
                prefix_lens=[0, 0], extend_lens=[prompt, 1], seq_lens=[prompt, 1], extend_starts=[0, prompt],
                logits_indices=torch.tensor([prompt - 1, prompt], dtype=torch.int64, device=device),
                pool=self.pool, slot_table=self.slot_table.table, sliding_slot_table=self.slot_table.sliding_table,
                sliding_out_cache_loc=(torch.zeros(n, dtype=torch.int64, device=device)
                                       if self.pool.hybrid else None),
            )
            self.forward(batch)
        if device.type == "cuda":
            # the constrained rows' logit mask (the sampler's path), else compiled by the first constrained step
            vocab = self.model_config.vocab_size
            bitmask = torch.full((2, (vocab + 31) // 32), -1, dtype=torch.int32, pin_memory=True)
            apply_batch_bitmask(torch.zeros(2, vocab, device=device), bitmask, [1])
            torch.cuda.synchronize(device)
        logger.info("warmed up prefill steps of %s tokens in %.1f s", sizes, time.perf_counter() - start)
        return sizes

    def _build_attention_backend(self):
        name = self.config.attention_backend
        if name == "auto":
            name = "triton" if self.device.type == "cuda" else "torch"
        self.backend_name = name
        if name == "torch":
            return TorchAttentionBackend()
        from plait.runtime.layers.triton_attention import TritonAttentionBackend

        cfg = self.local_config
        return TritonAttentionBackend(
            cfg.num_heads, cfg.head_dim, max_batch_size=self.config.max_running_requests, device=self.device
        )

    def _check_fits(self) -> None:
        """A model whose weights cannot fit in the GPU memory share is a clear error, not an OOM crash."""
        if self.device.type != "cuda":
            return
        weight_bytes = self.model_config.weight_bytes(torch.tensor([], dtype=self.dtype).element_size())
        free, total = torch.cuda.mem_get_info(self.device)
        allowed = free - total * (1 - self.config.mem_fraction)
        if weight_bytes > allowed:
            raise MemoryError(
                f"the model's weights need {weight_bytes / 2**30:.1f} GiB but only {max(allowed, 0) / 2**30:.1f} GiB "
                f"of this GPU may be used ({free / 2**30:.1f} GiB free, mem_fraction={self.config.mem_fraction})"
            )

    def _build_model(self, source: ModelSource) -> torch.nn.Module:
        self._check_fits()
        with torch.device("meta"):
            model_cls = model_class(self.model_config.model_type)
            model = model_cls(self.model_config, self.attn_backend, self.context_length + 1, layout=self.tp_layout)
        materialize(model, self.device, self.dtype)
        if source.load_format == "dummy" or source.weights_dir is None:
            self._init_dummy_weights(model)
        else:
            # a rank of a tensor-parallel group reads only its part of each split tensor (lazily, then
            # narrowed); a whole model reads each tensor whole
            weights = iter_safetensors_weights(source.weights_dir, lazy=self.tp_layout.size > 1)
            loaded = model.load_weights(weights)
            missing = sorted(n for n, _ in model.named_parameters() if n not in loaded)
            if missing:
                raise ModelLoadError(
                    f"checkpoint in {source.weights_dir} lacks {len(missing)} tensor(s), e.g. {missing[:3]}"
                )
        for module in model.modules():  # layout changes that need the loaded weights (MXFP4 experts)
            if hasattr(module, "prepare_for_kernels"):
                module.prepare_for_kernels()
        model.rotary.build_cache(self.device, self.dtype)
        if self.device.type == "cpu" and self.config.cpu_prepack:
            model.prepack()
        if self.device.type == "cuda" and self.config.tune_gemv and self.dtype in (torch.bfloat16, torch.float16):
            from plait.runtime.kernels.gemv import tuning_report

            model.tune_gemv()
            for line in tuning_report():
                logger.info(line)
        return model.eval()

    def _init_dummy_weights(self, model: torch.nn.Module) -> None:
        """Random weights, like ``--load-format dummy`` elsewhere: uniform(-1e-3, 1e-3), norms at 1;
        quantized weights (MXFP4 experts) are drawn by their layer's ``init_dummy_weights``."""
        gen = torch.Generator(device=self.device).manual_seed(self.config.random_seed)
        for module in model.modules():
            if hasattr(module, "init_dummy_weights"):
                module.init_dummy_weights(gen)
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue  # filled above
            if name.endswith("norm.weight"):
                param.data.fill_(1.0)
            else:
                param.data.uniform_(-1e-3, 1e-3, generator=gen)

    def kv_dtype(self) -> torch.dtype:
        """The KV cache's element type (``EngineConfig.kv_cache_dtype``): the model's, or an FP8 type, which
        on a GPU needs one that converts FP8 in hardware (compute capability 8.9 or later)."""
        name = KV_CACHE_DTYPES[self.config.kv_cache_dtype]
        if name is None:
            return self.dtype
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError(f"kv_cache_dtype={self.config.kv_cache_dtype!r} needs a GPU of compute capability 8.9 "
                             f"or later (Ada, Hopper); this one is {torch.cuda.get_device_capability(self.device)}")
        return getattr(torch, name)

    def _sliding_layout(self) -> dict:
        """KVPool arguments of the hybrid layout (``EngineConfig.disable_hybrid_swa_memory``): the
        sliding-window layers, their window, and the sliding pool's size as a share of the full one
        with a floor: every running request's window twice (its own tokens, freed in batches of
        ``SLIDING_FREE_BATCH`` behind it, and up to a window of cached prefix it still reads) and two
        prefill chunks. Empty when the model does not mix sliding and full layers. Under tensor
        parallelism every rank builds it (each for its own KV heads; ``_build_pool`` gives every rank the
        smallest rank's sizes) and the other ranks get rank 0's sliding slots with each step
        (``tensor_parallel.StepMessage``)."""
        from plait.runtime.scheduler import SLIDING_FREE_BATCH

        cfg, config = self.model_config, self.config
        windows = [cfg.layer_sliding_window(i) for i in range(cfg.num_layers)]
        sliding = tuple(i for i, w in enumerate(windows) if w is not None)
        if config.disable_hybrid_swa_memory or not sliding or len(sliding) == cfg.num_layers:
            return {}
        window = max(w for w in windows if w is not None)
        floor = config.max_running_requests * (2 * window + SLIDING_FREE_BATCH) + 2 * config.chunked_prefill_size
        ratio = config.swa_full_tokens_ratio if config.swa_full_tokens_ratio is not None else 0.1
        return dict(sliding_layers=sliding, sliding_window=window, sliding_fraction=ratio, min_sliding_slots=floor)

    def _build_pool(self) -> KVPool:
        """The KV pool; in a tensor-parallel group every rank's has the smallest rank's slot count, and
        in a hybrid layout the smallest rank's sliding slot count (the scheduler on rank 0 hands out
        both kinds for all of them; a rank whose layout came out unmixed makes every rank's so).
        ``rank_pool_sizes``: each rank's (slots, sliding slots) as built (one rank: this pool's)."""
        pool = self._new_pool()
        if self.tp_layout.size == 1:
            self.rank_pool_sizes = [(pool.capacity, pool.num_sliding_slots)]
            return pool
        tp = tensor_parallel()
        import torch.distributed as dist

        sizes = torch.tensor([pool.capacity, pool.num_sliding_slots], dtype=torch.int64)
        dist.all_reduce(sizes, op=dist.ReduceOp.MIN, group=tp.cpu_group)
        slots, sliding = (int(n) for n in sizes)
        if (slots, sliding) != (pool.capacity, pool.num_sliding_slots):
            cfg = self.local_config
            layout = (dict(sliding_layers=tuple(sorted(pool.sliding_layers)), num_sliding_slots=sliding,
                           sliding_window=pool.sliding_window) if sliding else {})
            del pool  # its memory is needed for the smaller one
            pool = KVPool(slots, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype(),
                          device=self.device, **layout)
        built: list = [None] * tp.size
        dist.all_gather_object(built, (pool.capacity, pool.num_sliding_slots), group=tp.cpu_group)
        self.rank_pool_sizes = [tuple(b) for b in built]
        return pool

    def _new_pool(self) -> KVPool:
        cfg = self.local_config
        args = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype())
        layout = self._sliding_layout()
        if self.config.max_total_tokens is not None:
            slots = self.config.max_total_tokens
            if layout:
                sliding = KVPool.sliding_slots_for(slots, layout.pop("sliding_fraction"), layout.pop("min_sliding_slots"))
                layout["num_sliding_slots"] = sliding
            return KVPool(slots, *args, device=self.device, **layout)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1 - self.config.mem_fraction) - self._activation_reserve())
            if budget <= 0:
                raise MemoryError(
                    f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free after loading the model, "
                    f"mem_fraction={self.config.mem_fraction}"
                )
        else:
            budget = int(self.config.kv_cache_gb * 2**30)
        return KVPool.from_memory_budget(budget, *args, device=self.device, **layout)

    def _activation_reserve(self) -> int:
        """Bytes kept free for activations, logits and CUDA graphs (a generous estimate, for the largest
        step: ``EngineConfig.max_step_tokens``)."""
        cfg, elt = self.model_config, torch.tensor([], dtype=self.dtype).element_size()
        tokens = self.config.max_step_tokens
        mlp = tokens * cfg.intermediate_size * 2 * elt * 2  # gate_up output + activation
        if cfg.moe is not None:  # per (token, choice): gate_up output, activation, weighted output
            moe = tokens * cfg.moe.top_k * (3 * cfg.moe.intermediate_size + cfg.hidden_size) * elt * 2
            mlp = max(mlp, moe)
        logits = self.config.max_running_requests * cfg.vocab_size * 4 * 3  # float32 logits + sampling copies
        return int(mlp + logits + 2**30)

    def release(self) -> None:
        """Drop the weights, the KV cache and the CUDA graphs so their memory can be reused (after shutdown)."""
        self.cuda_graphs = None
        self.piecewise_graphs = None
        self.model = None
        self.pool.k_buffers.clear()
        self.pool.v_buffers.clear()
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the batch; returns float32 logits [N, vocab] for ``batch.logits_indices``."""
        if self.before_forward is not None:
            self.before_forward(batch)
        if self.lora is not None:  # each token's adapter slot, where the wrapped layers read it
            self.lora.prepare_step(batch.lora_slots, batch.num_tokens, static=self.cuda_graphs is not None)
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(batch):
            self.graph_steps += 1
            logits = self.cuda_graphs.run(batch)  # every row's
            if batch.logits_indices.numel() == logits.shape[0]:
                return logits
            # rows that sample nothing this step (forced tokens computed in the decode batch)
            return logits.index_select(0, batch.logits_indices)
        self.attn_backend.prepare(batch)
        if self.piecewise_graphs is not None and self.piecewise_graphs.can_run(batch):
            self.piecewise_graph_steps += 1
            hidden = self.piecewise_graphs.run(batch)
        else:
            hidden = self.model(batch)
        if batch.logits_indices.numel() == hidden.shape[0]:
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[batch.logits_indices])


def warm_up_sizes(budget: int, decode_rows: int = 0) -> list[int]:
    """Token counts of the start-up warm-up steps: every power of two from 2 below the largest step, the
    prefill budget and the largest step, so that every MoE token bucket a step can reach is compiled. A
    step carries up to ``budget`` prompt tokens beside one token for each of up to ``decode_rows``
    decoding requests (decode rows are not charged to the budget), so the largest step is their sum:
    GPT-OSS's defaults (2,048 + 1,024) reach the 4,096-token bucket, whose tiling compiled mid-serving
    cost a whole step of requests 1.7 s of TTFT on an H200 (benchmarks/RESULTS.md, 2026-12-03)."""
    budget = max(2, budget)
    largest = budget + max(0, decode_rows)
    sizes, n = {budget, largest}, 2
    while n < largest:
        sizes.add(n)
        n *= 2
    return sorted(sizes)


def _with_engine_quantization(cfg: ModelConfig, config: EngineConfig, source: ModelSource) -> ModelConfig:
    """The model config with the expert weight format to hold: the checkpoint's (its
    ``quantization_config``) unless the engine sets ``quantization``; a checkpoint in another format
    than the one asked for is a clear error (plait does not convert formats at load)."""
    if config.quantization is None or config.quantization == cfg.quantization:
        return cfg
    if source.load_format != "dummy" and source.weights_dir is not None:
        raise ValueError(
            f"quantization={config.quantization!r} but the checkpoint in {source.weights_dir} stores its "
            f"weights as {cfg.quantization or cfg.torch_dtype}; plait does not convert weight formats at load "
            f"(use load_format='dummy' for random weights in that format)"
        )
    return cfg.with_quantization(config.quantization)
