"""KVPool: slot allocation, the padding slot, KV writes and sizing."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.kvcache.pool import MIN_SLOTS, KVPool


def make_pool(num_slots: int = 8, debug: bool = True) -> KVPool:
    return KVPool(num_slots, num_layers=2, num_kv_heads=2, head_dim=4, debug=debug)


def test_shapes_and_initial_state():
    pool = make_pool(8)
    assert len(pool.k_buffers) == len(pool.v_buffers) == 2
    for buf in pool.k_buffers + pool.v_buffers:
        assert buf.shape == (9, 2, 4)
        assert buf.dtype == torch.float32
    assert pool.capacity == 8
    assert pool.num_free == 8
    assert pool.num_used == 0


def test_alloc_and_free_counts():
    pool = make_pool(8)
    a = pool.alloc(3)
    assert a is not None and a.dtype == torch.int64 and a.numel() == 3
    assert pool.num_free == 5 and pool.num_used == 3
    b = pool.alloc(5)
    assert b is not None
    assert pool.num_free == 0
    assert set(a.tolist()).isdisjoint(b.tolist())
    pool.free(a)
    assert pool.num_free == 3
    pool.free(b)
    assert pool.num_free == 8 and pool.num_used == 0


def test_alloc_zero_and_free_empty():
    pool = make_pool(4)
    empty = pool.alloc(0)
    assert empty is not None and empty.numel() == 0 and empty.dtype == torch.int64
    pool.free(torch.empty(0, dtype=torch.int64))
    pool.free(torch.empty(0, dtype=torch.int32))
    assert pool.num_free == 4


def test_alloc_too_many_returns_none_and_allocates_nothing():
    pool = make_pool(4)
    held = pool.alloc(3)
    assert held is not None
    assert pool.alloc(2) is None
    assert pool.num_free == 1
    last = pool.alloc(1)
    assert last is not None
    assert pool.alloc(1) is None
    assert pool.num_free == 0


def test_slot_zero_never_allocated():
    pool = make_pool(16)
    seen: list[int] = []
    for _ in range(5):
        slots = pool.alloc(16)
        assert slots is not None
        seen.extend(slots.tolist())
        assert 0 not in slots.tolist()
        assert sorted(slots.tolist()) == list(range(1, 17))
        pool.free(slots.flip(0))
    assert 0 not in seen


def test_free_accepts_other_int_dtypes_and_shapes():
    pool = make_pool(6)
    slots = pool.alloc(4)
    assert slots is not None
    pool.free(slots[:2].to(torch.int32))
    pool.free(slots[2:].reshape(1, 2))
    assert pool.num_free == 6
    assert sorted(pool.alloc(6).tolist()) == list(range(1, 7))


def test_debug_double_free_raises():
    pool = make_pool(4)
    slots = pool.alloc(2)
    assert slots is not None
    pool.free(slots)
    with pytest.raises(ValueError, match="double free"):
        pool.free(slots)
    assert pool.num_free == 4


def test_debug_rejects_padding_slot_and_duplicates():
    pool = make_pool(4)
    pool.alloc(4)
    with pytest.raises(ValueError, match="out of range"):
        pool.free(torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        pool.free(torch.tensor([5]))
    with pytest.raises(ValueError, match="twice"):
        pool.free(torch.tensor([1, 1]))
    assert pool.num_free == 0


def test_clear_frees_everything():
    pool = make_pool(5)
    pool.alloc(5)
    pool.clear()
    assert pool.num_free == 5
    slots = pool.alloc(5)
    assert slots is not None and sorted(slots.tolist()) == [1, 2, 3, 4, 5]
    pool.free(slots)  # no spurious double-free after clear
    assert pool.num_free == 5


def test_is_free():
    pool = make_pool(4)
    slots = pool.alloc(2)
    assert slots is not None
    assert not pool.is_free(slots).any()
    pool.free(slots[:1])
    assert pool.is_free(slots).tolist() == [True, False]


def test_set_kv_writes_at_slots_and_casts():
    pool = KVPool(6, num_layers=2, num_kv_heads=2, head_dim=3, dtype=torch.float16)
    slots = torch.tensor([4, 2])
    k = torch.randn(2, 2, 3, dtype=torch.float32)
    v = torch.randn(2, 2, 3, dtype=torch.float32)
    pool.set_kv(1, slots, k, v)
    assert pool.k_buffers[1].dtype == torch.float16
    torch.testing.assert_close(pool.k_buffers[1][4], k[0].half())
    torch.testing.assert_close(pool.v_buffers[1][2], v[1].half())
    assert pool.k_buffers[0].abs().sum() == 0  # other layer untouched
    untouched = [0, 1, 3, 5, 6]
    assert pool.k_buffers[1][untouched].abs().sum() == 0
    k_buf, v_buf = pool.get_kv_buffer(1)
    assert k_buf is pool.k_buffers[1] and v_buf is pool.v_buffers[1]


def test_set_kv_rejects_bad_shape():
    pool = make_pool(4)
    with pytest.raises(ValueError, match="shape"):
        pool.set_kv(0, torch.tensor([1]), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


def test_padding_writes_go_to_slot_zero():
    pool = make_pool(4)
    k = torch.ones(3, 2, 4)
    pool.set_kv(0, torch.tensor([1, 0, 0]), k, k)
    assert pool.k_buffers[0][1].sum() == 8
    assert pool.k_buffers[0][2:].abs().sum() == 0


def test_bytes_per_slot():
    assert KVPool.bytes_per_slot(2, 2, 4, torch.float32) == 2 * 2 * 2 * 4 * 4
    assert KVPool.bytes_per_slot(30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    # Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, bf16 -> 128 KiB per token.
    assert KVPool.bytes_per_slot(32, 8, 128, torch.bfloat16) == 128 * 1024


def test_from_memory_budget_sizing():
    per_slot = KVPool.bytes_per_slot(2, 2, 4, torch.float32)
    pool = KVPool.from_memory_budget(per_slot * 101 + per_slot - 1, 2, 2, 4, torch.float32, "cpu")
    assert pool.capacity == 100  # one row is the padding sink
    assert pool.memory_bytes == 101 * per_slot
    actual = sum(b.numel() * b.element_size() for b in pool.k_buffers + pool.v_buffers)
    assert actual == pool.memory_bytes


def test_from_memory_budget_too_small():
    per_slot = KVPool.bytes_per_slot(2, 2, 4, torch.float32)
    KVPool.from_memory_budget(per_slot * (MIN_SLOTS + 1), 2, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="at least 16"):
        KVPool.from_memory_budget(per_slot * MIN_SLOTS, 2, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="token slots"):
        KVPool.from_memory_budget(0, 2, 2, 4, torch.float32, "cpu")


def test_non_debug_pool_counts():
    pool = make_pool(3, debug=False)
    slots = pool.alloc(3)
    assert slots is not None and pool.num_free == 0
    pool.free(slots)
    assert pool.num_free == 3
