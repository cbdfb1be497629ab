"""Token-slot KV memory.

The pool owns the K and V tensors of every layer. Memory is handed out one *slot* at a time: a slot is
one token's K and V in every layer. The pool knows nothing about prefixes or requests; the radix tree
and the request table only hold slot indices.

Slot 0 is reserved as a padding sink: batches padded to a fixed size (CUDA graphs) write the KV of
their padding tokens there. It is never handed out, so the buffers have ``num_slots + 1`` rows.

The free list is a tensor on the pool's device: ``alloc`` slices its head and ``free`` concatenates,
so neither needs a host-device sync (the free count is the tensor's length, known on the host).

Hybrid layout (models mixing sliding-window and full-attention layers, GPT-OSS): the sliding layers'
buffers hold fewer rows, ``num_sliding_slots``, since those layers need only the last ``sliding_window``
keys of each sequence. A slot index (the *full* slot) still names a token everywhere (request table,
radix tree); each allocated full slot also gets a *sliding* slot, recorded in ``full_to_sliding`` (a
device tensor; 0 = none). Callers free a token's sliding slot on its own (``free_sliding``) once no
one needs its sliding-layer KV any more, and keep track on the host of which tokens still have one.
"""

from __future__ import annotations

import torch

from plait.runtime.kernels.common import cache_values
from plait.runtime.kvcache.memory import zeros_on_touch

PADDING_SLOT = 0
MIN_SLOTS = 16


class KVPool:
    """KV buffers for ``num_slots`` usable token slots (indices ``1..num_slots``).

    Attributes:
        k_buffers, v_buffers: one tensor per layer, shape [num_slots + 1, num_kv_heads, head_dim].
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        debug: bool = False,
        sliding_layers: tuple[int, ...] = (),
        num_sliding_slots: int = 0,
        sliding_window: int = 0,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"KVPool needs at least one usable slot, got num_slots={num_slots}")
        if num_layers < 1 or num_kv_heads < 1 or head_dim < 1:
            raise ValueError(
                f"bad KV shape: num_layers={num_layers}, num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.debug = debug
        self.sliding_layers = frozenset(sliding_layers)
        self.hybrid = bool(self.sliding_layers)
        if self.hybrid:
            if not self.sliding_layers <= set(range(num_layers)) or len(self.sliding_layers) == num_layers:
                raise ValueError(f"sliding_layers {sorted(self.sliding_layers)} must be some, not all, of the "
                                 f"{num_layers} layers")
            if not 1 <= num_sliding_slots <= num_slots or sliding_window < 1:
                raise ValueError(f"a hybrid pool needs 1 <= num_sliding_slots <= num_slots ({num_slots}) and "
                                 f"sliding_window >= 1, got {num_sliding_slots} and {sliding_window}")
        self.num_sliding_slots = num_sliding_slots if self.hybrid else 0
        self.sliding_window = sliding_window if self.hybrid else 0

        def rows(layer: int) -> int:
            return (self.num_sliding_slots if layer in self.sliding_layers else num_slots) + 1

        self.k_buffers: list[torch.Tensor] = [
            zeros_on_touch((rows(i), num_kv_heads, head_dim), dtype, self.device) for i in range(num_layers)
        ]
        self.v_buffers: list[torch.Tensor] = [
            zeros_on_touch((rows(i), num_kv_heads, head_dim), dtype, self.device) for i in range(num_layers)
        ]
        # hybrid: full slot -> its sliding slot (0: none); the sliding free list
        self.full_to_sliding: torch.Tensor | None = (
            torch.zeros(num_slots + 1, dtype=torch.int64, device=self.device) if self.hybrid else None
        )
        self._free_sliding = torch.empty(0, dtype=torch.int64, device=self.device)
        self._is_free_sliding: torch.Tensor | None = None
        self._free_slots = torch.empty(0, dtype=torch.int64, device=self.device)
        # debug only: _is_free[s] is True iff slot s is in the free list (slot 0 is never free).
        self._is_free: torch.Tensor | None = None
        self.clear()

    # ------------------------------------------------------------------ sizing

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K plus V for one token across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize

    @classmethod
    def from_memory_budget(
        cls,
        budget_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        debug: bool = False,
        sliding_layers: tuple[int, ...] = (),
        sliding_window: int = 0,
        sliding_fraction: float = 0.0,
        min_sliding_slots: int = 0,
    ) -> KVPool:
        """The largest pool whose buffers (padding rows included) fit in ``budget_bytes``.

        Hybrid (``sliding_layers`` given): ``max(sliding_fraction * num_slots, min_sliding_slots)``
        sliding slots (at most ``num_slots``), and as many full slots as the rest of the budget holds.

        Raises:
            ValueError: if the budget holds fewer than ``MIN_SLOTS`` usable slots.
        """
        per_slot = cls.bytes_per_slot(num_layers, num_kv_heads, head_dim, dtype)
        num_slots = int(budget_bytes) // per_slot - 1  # one row is the padding sink
        extra: dict = {}
        if sliding_layers and num_slots >= MIN_SLOTS:
            per_layer = per_slot // num_layers
            full_bytes, sliding_bytes = per_layer * (num_layers - len(sliding_layers)), per_layer * len(sliding_layers)
            usable = int(budget_bytes) - full_bytes - sliding_bytes  # the padding rows
            full = int(usable // (full_bytes + sliding_fraction * sliding_bytes))
            if full * sliding_fraction < min_sliding_slots:  # the floor binds: it comes off the top
                full = (usable - min_sliding_slots * sliding_bytes) // full_bytes
            if full >= MIN_SLOTS:
                sliding = cls.sliding_slots_for(full, sliding_fraction, min_sliding_slots)
                full = max(full, (usable - sliding * sliding_bytes) // full_bytes)
                num_slots = full
                extra = dict(sliding_layers=tuple(sliding_layers), num_sliding_slots=sliding,
                             sliding_window=sliding_window)
        if num_slots < MIN_SLOTS:
            raise ValueError(
                f"KV memory budget of {budget_bytes} bytes holds only {max(num_slots, 0)} token slots "
                f"({per_slot} bytes each: {num_layers} layers x {num_kv_heads} KV heads x head_dim "
                f"{head_dim} x K and V in {dtype}); at least {MIN_SLOTS} are needed. "
                "Give the KV cache more memory or use a smaller model."
            )
        return cls(num_slots, num_layers, num_kv_heads, head_dim, dtype, device, debug=debug, **extra)

    @staticmethod
    def sliding_slots_for(num_slots: int, fraction: float, floor: int) -> int:
        """A hybrid pool's sliding slots for ``num_slots`` full ones: ``fraction`` of them, at least
        ``floor`` (and 1), at most ``num_slots`` (a full slot has at most one sliding slot)."""
        return min(num_slots, max(int(num_slots * fraction), floor, 1))

    @property
    def capacity(self) -> int:
        """Number of usable slots (the padding slot excluded)."""
        return self.num_slots

    @property
    def num_free(self) -> int:
        """Number of slots that ``alloc`` can hand out now."""
        return self._free_slots.numel()

    @property
    def num_used(self) -> int:
        """Number of slots handed out and not yet freed."""
        return self.num_slots - self._free_slots.numel()

    @property
    def num_sliding_free(self) -> int:
        """Hybrid: sliding slots that ``alloc`` can hand out now (0 for a pool without sliding layers)."""
        return self._free_sliding.numel()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by all K and V buffers."""
        return sum(2 * buf.numel() * buf.element_size() for buf in self.k_buffers)

    # -------------------------------------------------------------- alloc/free

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` free slots: an int64 tensor on the pool's device, or None if fewer are free.

        When None is returned nothing was allocated. ``n == 0`` returns an empty tensor.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self._free_slots.numel() or (self.hybrid and n > self._free_sliding.numel()):
            return None
        slots = self._free_slots[:n]
        self._free_slots = self._free_slots[n:]
        if self._is_free is not None:
            self._is_free[slots] = False
        if self.hybrid and n:
            assert self.full_to_sliding is not None
            sliding = self._free_sliding[:n]
            self._free_sliding = self._free_sliding[n:]
            if self._is_free_sliding is not None:
                self._is_free_sliding[sliding] = False
            self.full_to_sliding[slots] = sliding
        return slots

    def free(self, slots: torch.Tensor, *, sliding: bool = True) -> None:
        """Return ``slots`` (any integer tensor, possibly empty) to the free list; in a hybrid pool
        also their sliding slots unless ``sliding=False`` (the caller freed those already).

        With ``debug=True`` a double free, a duplicate, slot 0 or an out-of-range index raises
        ValueError (and nothing is freed); without it these are not checked (no host sync).
        """
        if slots.numel() == 0:
            return
        slots = slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        if self._is_free is not None:
            self._check_free(slots, self._is_free, self.num_slots, "KV slots")
        if self.hybrid and sliding:
            self.free_sliding(slots)
        if self._is_free is not None:
            self._is_free[slots] = True
        self._free_slots = torch.cat((self._free_slots, slots))

    def free_sliding(self, slots: torch.Tensor) -> None:
        """Hybrid: free the sliding slots of the full ``slots`` (each must have one; the full slots stay
        allocated). A no-op for a pool without sliding layers."""
        if not self.hybrid or slots.numel() == 0:
            return
        assert self.full_to_sliding is not None
        slots = slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        sliding = self.full_to_sliding[slots]
        if self._is_free_sliding is not None:
            self._check_free(sliding, self._is_free_sliding, self.num_sliding_slots, "sliding slots (of full slots "
                             f"{slots.tolist()})")
            self._is_free_sliding[sliding] = True
        self.full_to_sliding[slots] = PADDING_SLOT
        self._free_sliding = torch.cat((self._free_sliding, sliding))

    @staticmethod
    def _check_free(slots: torch.Tensor, is_free: torch.Tensor, limit: int, what: str) -> None:
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 1 or hi > limit:
            raise ValueError(f"freeing {what}: index out of range [1, {limit}]: min={lo}, max={hi}")
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError(f"freeing {what}: the same slot twice in one call: {slots.tolist()}")
        already = slots[is_free[slots]]
        if already.numel() > 0:
            raise ValueError(f"double free of {what}: {already.tolist()}")

    def is_free(self, slots: torch.Tensor) -> torch.Tensor:
        """Bool tensor: for each slot, whether it is in the free list (for checks and tests)."""
        slots = slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        return torch.isin(slots, self._free_slots)

    def clear(self) -> None:
        """Mark every usable slot free again (the buffers' contents are left as they are)."""
        self._free_slots = torch.arange(1, self.num_slots + 1, dtype=torch.int64, device=self.device)
        if self.debug:
            self._is_free = torch.ones(self.num_slots + 1, dtype=torch.bool, device=self.device)
            self._is_free[PADDING_SLOT] = False
        if self.hybrid:
            assert self.full_to_sliding is not None
            self.full_to_sliding.zero_()
            self._free_sliding = torch.arange(1, self.num_sliding_slots + 1, dtype=torch.int64, device=self.device)
            if self.debug:
                self._is_free_sliding = torch.ones(self.num_sliding_slots + 1, dtype=torch.bool, device=self.device)
                self._is_free_sliding[PADDING_SLOT] = False

    # ------------------------------------------------------------------- data

    def get_kv_buffer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) buffers of one layer, each [num_slots + 1, num_kv_heads, head_dim]."""
        return self.k_buffers[layer], self.v_buffers[layer]

    def set_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k`` and ``v`` ([n, num_kv_heads, head_dim]) of ``layer`` at ``slots`` ([n]).

        Values are cast to the pool's dtype (an FP8 one saturated: ``cache_values``). Padded tokens should
        point at slot 0.
        """
        expected = (slots.shape[0], self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(
                f"set_kv expects k and v of shape {expected}, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        self.k_buffers[layer][slots] = cache_values(k, self.dtype)
        self.v_buffers[layer][slots] = cache_values(v, self.dtype)

    def __repr__(self) -> str:
        return (
            f"KVPool(slots={self.num_slots}, free={self.num_free}, layers={self.num_layers}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
            + (f"sliding_layers={len(self.sliding_layers)}, sliding_slots={self.num_sliding_slots}, "
               f"sliding_free={self.num_sliding_free}, " if self.hybrid else "")
            + f"device={self.device})"
        )
