"""Request -> KV slot table.

Each running request owns one row of ``table``; column i of that row is the KV slot holding token i
of the request. The model runner gathers slot indices for attention from this table; the scheduler
writes newly allocated slots into it. The table holds indices only, never KV memory.

With a hybrid KV pool (``KVPool.full_to_sliding``) a second table, ``sliding_table``, holds each
position's sliding slot for the sliding-window layers: ``write`` fills both, translating through the
pool's map as it is at that moment (0 where a token has no sliding slot), or storing the sliding slots
it is given (tensor parallelism's other ranks replay rank 0's writes, translated there: their pools
allocate nothing, so their maps stay empty).
"""

from __future__ import annotations

import torch

from plait.runtime.kvcache.memory import zeros_on_touch


class ReqToSlotTable:
    """A fixed [max_requests, max_context_len] int64 table of slot indices plus a free-row list."""

    def __init__(
        self, max_requests: int, max_context_len: int, device: str | torch.device = "cpu",
        full_to_sliding: torch.Tensor | None = None,
    ) -> None:
        if max_requests < 1 or max_context_len < 1:
            raise ValueError(
                f"ReqToSlotTable needs max_requests >= 1 and max_context_len >= 1, "
                f"got {max_requests} and {max_context_len}"
            )
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.table: torch.Tensor = zeros_on_touch((max_requests, max_context_len), torch.int64, self.device)
        self.full_to_sliding = full_to_sliding
        self.sliding_table: torch.Tensor | None = (
            None if full_to_sliding is None else zeros_on_touch(self.table.shape, torch.int64, self.device)
        )
        # A stack; reversed so that rows are handed out 0, 1, 2, ...
        self._free_rows: list[int] = list(range(max_requests - 1, -1, -1))
        self.journal: list[tuple[int, int, list[int], list[int] | None]] | None = None
        self._is_free: list[bool] = [True] * max_requests

    @property
    def num_free(self) -> int:
        """Number of rows that ``alloc`` can hand out now."""
        return len(self._free_rows)

    @property
    def num_used(self) -> int:
        """Number of rows held by requests."""
        return self.max_requests - len(self._free_rows)

    def alloc(self) -> int | None:
        """Take a free row, or None if every row is in use."""
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        """Give ``row`` back. Raises ValueError on an out-of-range row or a double free."""
        self._check_row(row)
        if self._is_free[row]:
            raise ValueError(f"double free of request row {row}")
        self._is_free[row] = True
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor, sliding: torch.Tensor | None = None) -> None:
        """Store ``slots`` ([n]) as the slots of tokens ``start .. start + n - 1`` of ``row``, and in the
        sliding table ``sliding`` ([n]) where given, else ``slots`` translated through the pool's map.
        With a ``journal`` (a list; tensor parallelism's rank 0) each write is also recorded there as
        ``(row, start, slots, sliding slots or None)`` (lists), for the other ranks to replay on theirs."""
        self._check_row(row)
        n = slots.numel()
        if start < 0 or start + n > self.max_context_len:
            raise ValueError(
                f"writing {n} slots at position {start} exceeds max_context_len={self.max_context_len}"
            )
        slots = slots.reshape(-1)
        if self.sliding_table is not None and n:
            if sliding is None:
                assert self.full_to_sliding is not None
                sliding = self.full_to_sliding[slots]
            self.sliding_table[row, start : start + n] = sliding.reshape(-1)
        if self.journal is not None:  # only writes that happen: a refused one must not reach the other ranks
            if sliding is None:
                self.journal.append((row, start, slots.tolist(), None))
            else:  # one copy to the host for both
                full, sliding_slots = torch.stack((slots, sliding.reshape(-1))).tolist()
                self.journal.append((row, start, full, sliding_slots))
        self.table[row, start : start + n] = slots

    def write_at(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 sliding: torch.Tensor | None = None) -> None:
        """Store ``slots[i]`` at (``rows[i]``, ``positions[i]``) for every i, and in the sliding table
        ``sliding[i]`` where given, else ``slots[i]`` translated (device tensors, no checks)."""
        self.table[rows, positions] = slots
        if self.sliding_table is not None:
            if sliding is None:
                assert self.full_to_sliding is not None
                sliding = self.full_to_sliding[slots]
            self.sliding_table[rows, positions] = sliding

    def read(self, row: int, end: int, start: int = 0) -> torch.Tensor:
        """Slots of tokens ``start .. end - 1`` of ``row`` ([end - start] int64, a copy)."""
        self._check_row(row)
        if not 0 <= start <= end <= self.max_context_len:
            raise ValueError(
                f"bad read range [{start}, {end}) for max_context_len={self.max_context_len}"
            )
        return self.table[row, start:end].clone()

    def clear(self) -> None:
        """Mark every row free again."""
        self._free_rows = list(range(self.max_requests - 1, -1, -1))
        self._is_free = [True] * self.max_requests

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.max_requests:
            raise ValueError(f"request row {row} out of range [0, {self.max_requests})")

    def __repr__(self) -> str:
        return (
            f"ReqToSlotTable(rows={self.max_requests}, free={self.num_free}, "
            f"max_context_len={self.max_context_len}, device={self.device})"
        )
