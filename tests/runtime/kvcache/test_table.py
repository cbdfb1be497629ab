"""ReqToSlotTable: row allocation and slot read/write."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.kvcache.table import ReqToSlotTable


def test_shape_and_dtype():
    table = ReqToSlotTable(3, 10)
    assert table.table.shape == (3, 10)
    assert table.table.dtype == torch.int64
    assert table.num_free == 3 and table.num_used == 0


def test_alloc_until_exhausted_then_free():
    table = ReqToSlotTable(3, 8)
    rows = [table.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2]
    assert table.num_free == 0
    assert table.alloc() is None
    table.free(rows[1])
    assert table.num_free == 1
    assert table.alloc() == rows[1]
    assert table.alloc() is None


def test_double_free_and_bad_row_raise():
    table = ReqToSlotTable(2, 4)
    row = table.alloc()
    assert row is not None
    table.free(row)
    with pytest.raises(ValueError, match="double free"):
        table.free(row)
    with pytest.raises(ValueError, match="out of range"):
        table.free(2)
    assert table.num_free == 2


def test_write_and_read():
    table = ReqToSlotTable(2, 8)
    row = table.alloc()
    assert row is not None
    table.write(row, 0, torch.tensor([5, 6, 7]))
    table.write(row, 3, torch.tensor([9, 11]))
    assert table.read(row, 5).tolist() == [5, 6, 7, 9, 11]
    assert table.read(row, 4, start=2).tolist() == [7, 9]
    assert table.read(row, 0).numel() == 0
    other = 1 - row
    assert table.table[other].abs().sum() == 0


def test_read_is_a_copy():
    table = ReqToSlotTable(1, 4)
    row = table.alloc()
    assert row is not None
    table.write(row, 0, torch.tensor([1, 2]))
    got = table.read(row, 2)
    table.write(row, 0, torch.tensor([3, 4]))
    assert got.tolist() == [1, 2]


def test_write_past_context_raises():
    table = ReqToSlotTable(1, 4)
    row = table.alloc()
    assert row is not None
    with pytest.raises(ValueError, match="max_context_len"):
        table.write(row, 3, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="read range"):
        table.read(row, 5)


def test_clear():
    table = ReqToSlotTable(2, 4)
    table.alloc()
    table.alloc()
    table.clear()
    assert table.num_free == 2
