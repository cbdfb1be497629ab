"""Forced tokens (constrained decoding's jump-forward) in the decode batch, and rewinding computed KV.

On a bare pool, tree and table, driven as the engine drives the scheduler (see test_scheduler_admission).
"""

from __future__ import annotations

import pytest

from plait.runtime.request import RequestStatus
from plait.runtime.scheduler import FORCED_IN_DECODE_MAX_TOKENS
from tests.runtime.test_scheduler_admission import make_request, make_scheduler, step


def decoding_scheduler(num_requests: int, min_batch: int | None):
    """A scheduler whose ``num_requests`` requests are prefilled and decoding (one token sampled each)."""
    sched = make_scheduler(4096)
    sched.forced_in_decode_min_batch = min_batch
    requests = [make_request(i, 8, 100) for i in range(num_requests)]
    for req in requests:
        sched.add_request(req)
    step(sched)  # prefill: every request samples its first token
    assert all(r.pending_len == 1 for r in requests)
    return sched, requests


def item_of(items, req):
    (item,) = [it for it in items if it.req is req]
    return item


@pytest.mark.parametrize("min_batch, forced, in_decode", [
    (None, 3, False),  # never in the decode batch
    (3, 3, True),  # three requests decode: from 3 on, one forced token a step
    (4, 3, False),  # too few decode for it to pay
    (1, FORCED_IN_DECODE_MAX_TOKENS - 1, True),  # pending: the sampled token and the forced ones
    (1, FORCED_IN_DECODE_MAX_TOKENS, False),  # a long run is one extend
])
def test_forced_tokens_ride_the_decode_batch_from_its_min_batch_on(min_batch, forced, in_decode):
    sched, (req, *others) = decoding_scheduler(3, min_batch)
    req.output_ids.extend([5] * forced)  # jump-forward appended them after the sampled token
    start, outputs = req.computed_len, len(req.output_ids)
    if not in_decode:
        item = item_of(step(sched), req)
        assert (item.start, item.length) == (start, forced + 1)
        assert len(req.output_ids) == outputs + 1  # sampled after the extend
        return
    for k in range(forced + 1):  # the sampled token, then the forced ones, one a step
        items = step(sched)
        assert all(it.length == 1 for it in items)  # a pure decode step (its CUDA graph is kept)
        assert item_of(items, req).start == start + k
        assert len(req.output_ids) == outputs + (k == forced)  # sampled at the last forced token only
    assert req.pending_len == 1 and all(o.pending_len == 1 for o in others)


def test_rewind_gives_the_slots_back_and_computes_them_again():
    sched, (req, other) = decoding_scheduler(2, None)
    free = sched.pool.num_free
    step(sched)  # both decode one token
    assert sched.pool.num_free == free - 2
    position = req.computed_len - 1
    sched.rewind(req, position)  # that token's KV is forgotten (an ending replaced it)
    assert req.computed_len == position and sched.pool.num_free == free - 1
    sched.rewind(req, position)  # nothing beyond it: a no-op
    assert sched.pool.num_free == free - 1
    item = item_of(step(sched), req)
    assert (item.start, item.length) == (position, 2)  # computed again with the token after it
    with pytest.raises(RuntimeError, match="cannot rewind"):
        req.cache_locked_len = 4
        sched.rewind(req, 2)
    req.cache_locked_len = 0
    for r in (req, other):
        sched.finish(r, {"type": "length", "length": 1})
    assert sched.pool.num_free == sched.pool.capacity and req.status is RequestStatus.FINISHED
