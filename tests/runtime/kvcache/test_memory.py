"""CPU KV buffers are resident only where written (``kvcache.memory.zeros_on_touch``)."""

from __future__ import annotations

import os

import pytest
import torch

from plait.runtime.kvcache.memory import zeros_on_touch

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.bool])
def test_zeros_on_touch_is_torch_zeros(dtype):
    t = zeros_on_touch((3, 5, 7), dtype, "cpu")
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert torch.equal(t.float(), torch.zeros(3, 5, 7))
    t[1, 2] = 1
    assert t.float().sum().item() == 7


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs_proc
def test_a_cpu_pool_and_slot_table_are_resident_only_where_written():
    """An 800 MB pool and a 128 MB slot table cost resident memory only for what is written (checked in
    this process: a fresh mapping is untouched whatever the allocator already holds; the test below)."""
    from plait.runtime.kvcache.pool import KVPool
    from plait.runtime.kvcache.table import ReqToSlotTable

    before = _resident_bytes()
    pool = KVPool(100_000, num_layers=4, num_kv_heads=4, head_dim=64)  # 4 layers x K/V x 100 MB
    table = ReqToSlotTable(1024, 16_384, "cpu")  # 128 MB of int64
    built = _resident_bytes() - before
    slots = pool.alloc(16)
    k, v = torch.randn(16, 4, 64), torch.randn(16, 4, 64)
    pool.set_kv(2, slots, k, v)
    got_k, got_v = pool.get_kv_buffer(2)
    assert torch.equal(got_k[slots], k) and torch.equal(got_v[slots], v)
    assert got_k[slots.max() + 1 :: 997].abs().sum().item() == 0  # the rest still reads as zeros
    assert table.table[::101, ::101].abs().sum().item() == 0
    after_writes = _resident_bytes() - before
    assert built < 48 * 2**20 and after_writes < 64 * 2**20, (built, after_writes)


@needs_proc
def test_zeros_on_touch_stays_untouched_after_the_heap_was_trimmed():
    """In a process that has freed and trimmed heap memory, as a test run's own has: a large ``calloc`` can
    then be served from freed heap pages, which it must clear (a calloc'd pool and table as above once
    grew a test process by their whole 928 MB); a fresh mapping is untouched whatever the allocator holds."""
    import ctypes
    import gc

    freed = [bytearray(32 * 2**20) for _ in range(4)]
    del freed
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    before = _resident_bytes()
    buffer = zeros_on_touch((50, 2**20), torch.int16, "cpu")  # 100 MB
    assert _resident_bytes() - before < 16 * 2**20
    buffer[:, ::2048] = 1  # one int16 in each 4 KiB page
    assert _resident_bytes() - before > 80 * 2**20  # written pages are resident: the probe sees them
    assert buffer.sum().item() == 50 * 512
