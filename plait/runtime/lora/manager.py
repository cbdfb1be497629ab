"""LoraManager: the adapters an engine serves, their device slots, and each step's per-token slots.

Memory layout (allocated once, at start, so that CUDA graphs captured with it stay valid): for every
layer and every target module, ``A`` [max_loras_per_batch, max_lora_rank, in] and ``B``
[max_loras_per_batch, out, max_lora_rank]; one slot per device-resident adapter, its rank zero-padded
to ``max_lora_rank`` (a module an adapter does not target stays zero). ``scaling`` [slots] float32.

Residency: every loaded adapter is kept in host memory (pinned on CUDA), at most ``max_loaded_loras``.
At most ``max_loras_per_batch`` are on the device at once. The scheduler ``acquire``s an adapter's
slot when it admits a request and ``release``s it when the request finishes or is retracted; an
adapter with a running request keeps its slot. A request whose adapter is not resident gets a free
slot, else the least recently used slot no running request holds (its adapter is offloaded: dropped
from the device, its host copy kept); with every slot held, the request waits.

Per step: ``prepare_step`` receives the batch's per-token slots (-1: the base model) and copies them
into a static buffer that captured CUDA graphs read; eager steps without any adapter skip LoRA.

Tensor parallelism: each rank's manager holds its rank's part of every adapter (``RankSlice``:
``B``'s rows of a column-parallel module, ``A``'s columns of a row-parallel one, where the wrapped
linear's own rows or columns start; the rest whole), cut when the adapter is registered; adapters are
checked against the whole model's shapes (``whole_model_shapes``). The scheduler
runs on rank 0 only, so rank 0's manager records what changes the other ranks' state (``journal``:
adapters registered and unregistered, adapters copied into slots) and each step's message carries it
to them (``executor.tensor_parallel.StepMessage``), where ``apply_journal`` replays it before the
forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from plait.runtime.layers.linear import RowParallelLinear
from plait.runtime.lora.adapter import (
    MAX_LORA_RANK_LIMIT,
    TARGET_MODULES,
    LoraAdapter,
    LoraCapacityError,
    LoraMismatchError,
    UnknownLoraError,
)
from plait.runtime.lora.layers import LoraLinear

logger = logging.getLogger(__name__)

MAX_LORA_NAME_CHARS = 256
DEFAULT_MAX_LORA_RANK = 64  # max_lora_rank when neither set nor given by start-up adapters
# PEFT module name -> (parent attribute, packed linear attribute, shard id or None for an unpacked linear)
_MODULE_PLACES = {
    "q_proj": ("self_attn", "qkv_proj", "q"),
    "k_proj": ("self_attn", "qkv_proj", "k"),
    "v_proj": ("self_attn", "qkv_proj", "v"),
    "o_proj": ("self_attn", "o_proj", None),
    "gate_proj": ("mlp", "gate_up_proj", 0),
    "up_proj": ("mlp", "gate_up_proj", 1),
    "down_proj": ("mlp", "down_proj", None),
}


def model_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The LoRA target modules (``TARGET_MODULES``) that every decoder layer of ``model`` has: all seven on
    a dense model, the attention's four on a MoE model (its experts are not LoRA targets)."""
    layers = list(model.model.layers)

    def every_layer_has(module: str) -> bool:
        try:
            for layer in layers:
                LoraManager._place(layer, module)
        except LoraMismatchError:
            return False
        return True

    return tuple(module for module in TARGET_MODULES if every_layer_has(module))


def whole_model_shapes(cfg: object) -> dict[str, tuple[int, int]]:
    """Each LoRA target module's (in, out) in the whole model of config ``cfg``: what an adapter's weights
    are checked against, whatever part of the model one tensor-parallel rank holds."""
    h, q, kv, intermediate = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, intermediate), "up_proj": (h, intermediate), "down_proj": (intermediate, h)}


@dataclass(frozen=True)
class RankSlice:
    """The part of one module's adapter weights a tensor-parallel rank holds: along ``dim`` (0: ``B``'s
    rows, a column-parallel module; 1: ``A``'s columns, a row-parallel one), from ``start`` (the count
    is the rank's buffer size). Read off the wrapped linear (``LoraManager._rank_slice``)."""

    dim: int
    start: int


@dataclass
class HostAdapter(LoraAdapter):
    """An adapter checked and laid out for one manager (``LoraManager.to_host_layout``): this rank's part,
    the model's dtype, contiguous, pinned on CUDA."""


@dataclass
class LoadedAdapter:
    """An adapter registered with the engine: its host weights in the model's dtype, and ``uid``, unique
    per load (a name unloaded and loaded again is another adapter for the prefix cache)."""

    name: str
    path: str
    uid: int
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def check_lora_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_LORA_NAME_CHARS or not name.isprintable():
        raise ValueError(f"an adapter name must be a printable str of 1 to {MAX_LORA_NAME_CHARS} characters, "
                         f"got {name!r}")
    return name


class LoraManager:
    """Adapters, slots and per-step slot buffers of one model runner (see the module docstring).

    Args:
        model: the built, loaded Llama-family model; its targeted linears are wrapped in ``LoraLinear``.
        max_loras_per_batch: device slots. max_loaded_loras: adapters registered at most.
        max_rank: the padded rank of the slot buffers. targets: the modules that get buffers.
        max_tokens: the static per-token slot buffer's length (the largest step CUDA graphs replay).
        whole_shapes: each module's (in, out) in the whole model (``whole_model_shapes``), which adapters
            are checked against; None: the shapes of ``model``'s own linears (the model on one rank).
    """

    def __init__(self, model: nn.Module, *, max_loras_per_batch: int, max_loaded_loras: int, max_rank: int,
                 targets: tuple[str, ...], max_tokens: int, device: torch.device, dtype: torch.dtype,
                 whole_shapes: dict[str, tuple[int, int]] | None = None):
        if not 1 <= max_rank <= MAX_LORA_RANK_LIMIT:
            raise ValueError(f"max_lora_rank must be in [1, {MAX_LORA_RANK_LIMIT}], got {max_rank}")
        self.device, self.dtype = device, dtype
        self.num_slots, self.max_loaded, self.max_rank = max_loras_per_batch, max_loaded_loras, max_rank
        self.layers = list(model.model.layers)
        self.targets = tuple(t for t in TARGET_MODULES if t in targets)
        self.shapes: dict[str, tuple[int, int]] = {}  # module -> (in, out) of its shard on this rank
        self.slices: dict[str, RankSlice] = {}  # module -> this rank's part (modules split across ranks)
        for module in self.targets:
            base, shard = self._place(self.layers[0], module)
            self.shapes[module] = (base.in_features, self._shard_size(base, shard))
            part = self._rank_slice(base, shard)
            if part is not None:
                self.slices[module] = part
        self.whole_shapes = {m: whole_shapes[m] if whole_shapes else self.shapes[m] for m in self.targets}
        S, R = self.num_slots, max_rank
        self._a = [{m: torch.zeros(S, R, k, dtype=dtype, device=device) for m, (k, _) in self.shapes.items()}
                   for _ in self.layers]
        self._b = [{m: torch.zeros(S, n, R, dtype=dtype, device=device) for m, (_, n) in self.shapes.items()}
                   for _ in self.layers]
        self.scaling = torch.zeros(S, dtype=torch.float32, device=device)
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self._step_slots: torch.Tensor | None = None
        self._capturing = False
        self.adapters: dict[str, LoadedAdapter] = {}
        self._slot_owner: list[str | None] = [None] * S
        self._slot_of: dict[str, int] = {}
        self._refs: dict[str, int] = {}
        self._last_used = [0] * S
        self._clock = 0
        self._next_uid = 1
        # what the other tensor-parallel ranks must replay (None: no other ranks): ("register", name, path),
        # ("unregister", name) and ("load", name, slot), in order
        self.journal: list[tuple] | None = None
        self.slot_loads = 0  # adapters copied to a slot
        self.offloads = 0  # resident adapters dropped from the device for another one
        self._wrap(model)

    # ------------------------------------------------------------------ model transform
    @staticmethod
    def _place(layer: nn.Module, module: str) -> tuple[nn.Module, object]:
        parent_name, attr, shard = _MODULE_PLACES[module]
        parent = getattr(layer, parent_name, None)
        base = getattr(parent, attr, None) if parent is not None else None
        if base is None:
            raise LoraMismatchError(f"this model has no {module} in its layers (a MoE layer's MLP, say: its "
                                    "experts are not LoRA targets); an adapter cannot target it")
        if isinstance(base, LoraLinear):
            base = base.base
        return base, shard

    @staticmethod
    def _rank_slice(base: nn.Module, shard: object) -> RankSlice | None:
        """The part of a module's adapter this rank holds, where ``base`` (this rank's linear) starts in
        the whole model; None: the whole module (one rank, or a module no rank splits)."""
        if isinstance(base, RowParallelLinear):
            return RankSlice(1, base.input_start)
        start = base.checkpoint_rows.get(shard) if shard is not None else None  # a MergedLinear's shard
        return RankSlice(0, start) if start is not None else None

    @staticmethod
    def _shard_size(base: nn.Module, shard: object) -> int:
        return base.shard_offsets[shard][1] if shard is not None else base.out_features

    def _wrap(self, model: nn.Module) -> None:
        for layer_id, layer in enumerate(self.layers):
            by_linear: dict[tuple[str, str], list[tuple[str, int]]] = {}
            for module in self.targets:
                parent_name, attr, shard = _MODULE_PLACES[module]
                base, _ = self._place(layer, module)
                offset = base.shard_offsets[shard][0] if shard is not None else 0
                by_linear.setdefault((parent_name, attr), []).append((module, offset))
            for (parent_name, attr), shards in by_linear.items():
                parent = getattr(layer, parent_name)
                setattr(parent, attr, LoraLinear(getattr(parent, attr), self, layer_id, shards))

    # ------------------------------------------------------------------ adapters
    def check(self, adapter: LoraAdapter) -> None:
        """Raise unless ``adapter`` fits this base model and these buffers (``LoraMismatchError`` /
        ``LoraCapacityError``)."""
        if adapter.rank > self.max_rank:
            raise LoraCapacityError(f"adapter {adapter.path} has rank {adapter.rank}; this engine's max_lora_rank "
                                    f"is {self.max_rank}")
        missing = sorted(adapter.target_modules - set(self.targets))
        if missing:
            raise LoraCapacityError(f"adapter {adapter.path} targets {missing}, which this engine keeps no LoRA "
                                    f"buffers for (lora_target_modules: {list(self.targets)})")
        for (layer, module), (a, b) in adapter.weights.items():
            if layer >= len(self.layers):
                raise LoraMismatchError(f"adapter {adapter.path} has weights for layer {layer}; the base model "
                                        f"has {len(self.layers)} layers")
            k, n = self.whole_shapes[module]
            if tuple(a.shape) != (adapter.rank, k) or tuple(b.shape) != (n, adapter.rank):
                raise LoraMismatchError(
                    f"adapter {adapter.path}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                    f"the base model needs A ({adapter.rank}, {k}) and B ({n}, {adapter.rank})")

    def register(self, name: str, adapter: LoraAdapter) -> LoadedAdapter:
        """Add an adapter under ``name`` (host memory only; it goes to a slot when a request uses it),
        checked and laid out by ``to_host_layout`` unless it already was."""
        check_lora_name(name)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded (unload it first)")
        if len(self.adapters) >= self.max_loaded:
            raise LoraCapacityError(f"{len(self.adapters)} adapters are loaded, the most this engine holds "
                                    f"(max_loaded_loras); unload one first")
        adapter = self.to_host_layout(adapter)
        loaded = LoadedAdapter(name, adapter.path, self._next_uid, adapter.rank, adapter.scaling, adapter.weights)
        self._next_uid += 1
        self.adapters[name] = loaded
        self._refs[name] = 0
        if self.journal is not None:
            self.journal.append(("register", name, adapter.path))
        return loaded

    def to_host_layout(self, adapter: LoraAdapter) -> HostAdapter:
        """``adapter`` checked (``check``) and kept as ``register`` keeps it: this rank's part of each weight
        (``slices``), in the model's dtype, contiguous, pinned on CUDA. ``Engine.load_lora_adapter`` runs
        this on the caller's thread; a ``HostAdapter`` is returned as it is."""
        if isinstance(adapter, HostAdapter):
            return adapter
        self.check(adapter)
        pin = self.device.type == "cuda"
        weights = {}
        for key, (a, b) in adapter.weights.items():
            part = self.slices.get(key[1])
            if part is not None:
                k, n = self.shapes[key[1]]
                a, b = (a, b.narrow(0, part.start, n)) if part.dim == 0 else (a.narrow(1, part.start, k), b)
            a, b = a.to(self.dtype).contiguous(), b.to(self.dtype).contiguous()
            weights[key] = (a if a.is_pinned() else a.pin_memory(), b if b.is_pinned() else b.pin_memory()) if pin \
                else (a, b)
        return HostAdapter(adapter.path, adapter.rank, adapter.scaling, weights)

    def unregister(self, name: str) -> None:
        """Drop an adapter (its slot becomes free). Raises ValueError while a running request holds it."""
        self.get(name)
        if self._refs.get(name):
            raise ValueError(f"adapter {name!r} is in use by {self._refs[name]} running request(s)")
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._slot_owner[slot] = None
            self.scaling[slot] = 0.0
        del self.adapters[name], self._refs[name]
        if self.journal is not None:
            self.journal.append(("unregister", name))

    def get(self, name: str) -> LoadedAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UnknownLoraError(f"unknown LoRA adapter {name!r}; loaded adapters: {sorted(self.adapters)}")
        return adapter

    # ------------------------------------------------------------------ slots (the scheduler's calls)
    def acquire(self, name: str) -> int | None:
        """The slot of adapter ``name`` for a request being admitted, loading it there if needed (a free
        slot, else the least recently used one no running request holds); None when every slot is held.
        Each successful call is matched by one ``release``."""
        slot = self._slot_of.get(name)
        if slot is None:
            free = [s for s, owner in enumerate(self._slot_owner) if owner is None or not self._refs.get(owner)]
            if not free:
                return None
            slot = min(free, key=lambda s: (self._slot_owner[s] is not None, self._last_used[s]))
            self._load(self.adapters[name], slot)
        self._refs[name] += 1
        self._clock += 1
        self._last_used[slot] = self._clock
        return slot

    def release(self, name: str) -> None:
        if self._refs.get(name, 0) <= 0:
            raise RuntimeError(f"adapter {name!r} released more often than acquired")
        self._refs[name] -= 1

    def _load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Copy ``adapter``'s weights into ``slot`` (on the step stream: ordered after any step still using
        the slot's previous adapter)."""
        old = self._slot_owner[slot]
        if old is not None:
            del self._slot_of[old]
            self.offloads += 1
            logger.debug("LoRA adapter %r offloaded from slot %d", old, slot)
        r = adapter.rank
        for layer_id in range(len(self.layers)):
            for module in self.targets:
                a_buf, b_buf = self._a[layer_id][module][slot], self._b[layer_id][module][slot]
                pair = adapter.weights.get((layer_id, module))
                a_buf.zero_()
                b_buf.zero_()
                if pair is not None:
                    a_buf[:r].copy_(pair[0], non_blocking=True)
                    b_buf[:, :r].copy_(pair[1], non_blocking=True)
        self.scaling[slot] = adapter.scaling
        self._slot_owner[slot] = adapter.name
        self._slot_of[adapter.name] = slot
        self.slot_loads += 1
        if self.journal is not None:
            self.journal.append(("load", adapter.name, slot))

    def apply_journal(self, entries: list[tuple]) -> None:
        """Replay rank 0's ``journal`` on another tensor-parallel rank's manager: register (reading the
        adapter from its path, as rank 0 did), unregister, copy into a slot."""
        from plait.runtime.lora.adapter import read_adapter

        for entry in entries:
            if entry[0] == "register":
                self.register(entry[1], read_adapter(entry[2]))
            elif entry[0] == "unregister":
                self.unregister(entry[1])
            elif entry[0] == "load":
                self._load(self.get(entry[1]), entry[2])
            else:
                raise ValueError(f"unknown LoRA journal entry {entry[0]!r}")

    def resident(self) -> dict[str, int]:
        """Adapter name -> device slot, for the adapters on the device now."""
        return dict(self._slot_of)

    def in_use(self, name: str) -> int:
        return self._refs.get(name, 0)

    # ------------------------------------------------------------------ per step (the model runner's calls)
    def buffers(self, layer_id: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._a[layer_id][module], self._b[layer_id][module]

    def prepare_step(self, lora_slots: torch.Tensor | None, num_tokens: int, static: bool) -> None:
        """Set this step's per-token slots (int32 [num_tokens], or None: no adapter in the step). With
        ``static`` (a CUDA-graph replay may follow) they are copied into the static buffer, the rest of
        which says -1 (padding tokens get no LoRA term)."""
        self._step_slots = lora_slots
        if static and num_tokens <= self.token_slots.shape[0]:
            if lora_slots is None:
                self.token_slots.fill_(-1)
            else:
                self.token_slots[:num_tokens].copy_(lora_slots)
                self.token_slots[num_tokens:].fill_(-1)

    def slots_for(self, num_tokens: int) -> torch.Tensor | None:
        """The per-token slots a wrapped layer uses now: the static buffer's while capturing a graph,
        else the step's (None: no adapter in the step, no LoRA term)."""
        if self._capturing:
            return self.token_slots[:num_tokens]
        return self._step_slots

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """While CUDA graphs are captured: layers read the static slot buffer (all -1 meanwhile), so the
        graphs compute the LoRA terms of whatever slots a replay copies in."""
        self.token_slots.fill_(-1)
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
