"""Token-slot KV memory.

The pool owns the K and V tensors of every layer. Memory is handed out one *slot* at a time: a slot is
one token's K and V in every layer. The pool knows nothing about prefixes or requests; the radix tree
and the request table only hold slot indices.

Slot 0 is reserved as a padding sink: batches padded to a fixed size (CUDA graphs) write the KV of
their padding tokens there. It is never handed out, so the buffers have ``num_slots + 1`` rows.

The free list is a tensor on the pool's device: ``alloc`` slices its head and ``free`` concatenates,
so neither needs a host-device sync (the free count is the tensor's length, known on the host).
"""

from __future__ import annotations

import torch

from plait.runtime.kernels.common import cache_values

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
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_buffers: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.v_buffers: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
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
    ) -> KVPool:
        """The largest pool whose buffers (padding row included) fit in ``budget_bytes``.

        Raises:
            ValueError: if the budget holds fewer than ``MIN_SLOTS`` usable slots.
        """
        per_slot = cls.bytes_per_slot(num_layers, num_kv_heads, head_dim, dtype)
        num_slots = int(budget_bytes) // per_slot - 1  # one row is the padding sink
        if num_slots < MIN_SLOTS:
            raise ValueError(
                f"KV memory budget of {budget_bytes} bytes holds only {max(num_slots, 0)} token slots "
                f"({per_slot} bytes each: {num_layers} layers x {num_kv_heads} KV heads x head_dim "
                f"{head_dim} x K and V in {dtype}); at least {MIN_SLOTS} are needed. "
                "Give the KV cache more memory or use a smaller model."
            )
        return cls(num_slots, num_layers, num_kv_heads, head_dim, dtype, device, debug=debug)

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
    def memory_bytes(self) -> int:
        """Bytes held by all K and V buffers."""
        return (self.num_slots + 1) * self.bytes_per_slot(
            self.num_layers, self.num_kv_heads, self.head_dim, self.dtype
        )

    # -------------------------------------------------------------- alloc/free

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` free slots: an int64 tensor on the pool's device, or None if fewer are free.

        When None is returned nothing was allocated. ``n == 0`` returns an empty tensor.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self._free_slots.numel():
            return None
        slots = self._free_slots[:n]
        self._free_slots = self._free_slots[n:]
        if self._is_free is not None:
            self._is_free[slots] = False
        return slots

    def free(self, slots: torch.Tensor) -> None:
        """Return ``slots`` (any integer tensor, possibly empty) to the free list.

        With ``debug=True`` a double free, a duplicate, slot 0 or an out-of-range index raises
        ValueError (and nothing is freed); without it these are not checked (no host sync).
        """
        if slots.numel() == 0:
            return
        slots = slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        if self._is_free is not None:
            self._check_free(slots)
            self._is_free[slots] = True
        self._free_slots = torch.cat((self._free_slots, slots))

    def _check_free(self, slots: torch.Tensor) -> None:
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 1 or hi > self.num_slots:
            raise ValueError(
                f"freeing slot index out of range [1, {self.num_slots}]: min={lo}, max={hi}"
            )
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError(f"freeing the same slot twice in one call: {slots.tolist()}")
        assert self._is_free is not None
        already = slots[self._is_free[slots]]
        if already.numel() > 0:
            raise ValueError(f"double free of KV slots {already.tolist()}")

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
            f"device={self.device})"
        )
