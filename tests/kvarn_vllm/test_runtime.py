"""Staging slots follow vLLM's persistent batch: assignment, release, prefix-hit sinks, eviction, thousands of
requests without a leaked slot. Host logic plus the device copies it triggers, on CPU (no vLLM needed)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvarn_kernels import KVarNFormat, reference
from kvarn_vllm.runtime import Runtime

G, H, D = 64, 2, 64


def _runtime(slots: int = 3) -> Runtime:
    rt = Runtime(preset="kvarn_k4v2_g64", num_slots=slots, overflow=0, num_speculative=0, max_rows=slots,
                 max_model_len=4096, device="cpu")
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", D, torch.float32)
    rt.pool("layer0", fmt, H, torch.float32)
    rt.caches["layer0"] = fmt.allocate(32, H)
    return rt


class _Batch:
    def __init__(self) -> None:
        self.req_ids: list[str] = []
        self.num_computed_tokens_cpu = [0] * 8
        self.table = torch.zeros(8, 16, dtype=torch.int32)
        self.block_table = [SimpleNamespace(get_cpu_tensor=lambda: self.table)]


def _step(rt, batch, new=(), finished=(), cached=(), resumed=(), scheduled=None):
    """new: (req_id, computed, first_block); cached: (req_id, computed); scheduled: req_id -> new tokens."""
    new_reqs = [SimpleNamespace(req_id=r, num_computed_tokens=c, block_ids=([blk, blk + 1],)) for r, c, blk in new]
    for r, _, blk in new:
        if r not in batch.req_ids:
            batch.req_ids.append(r)
        batch.table[batch.req_ids.index(r), 0] = blk
    for r in finished:
        if r in batch.req_ids:
            i = batch.req_ids.index(r)
            batch.req_ids.pop(i)
            batch.table = torch.cat([batch.table[:i], batch.table[i + 1:], batch.table[:1] * 0])
    cached = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in cached]  # (req_id, computed[, first block])
    for r, _c, blk in cached:
        if blk is not None:
            batch.table[batch.req_ids.index(r), 0] = blk
    for r, c in [(r, c) for r, c, _ in cached] + [(r, c) for r, c, _ in new]:
        batch.num_computed_tokens_cpu[batch.req_ids.index(r)] = c
    out = SimpleNamespace(
        finished_req_ids=set(finished), scheduled_new_reqs=new_reqs, num_scheduled_tokens=scheduled or {},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, _, _ in cached], resumed_req_ids=set(resumed),
                                              new_block_ids=[None if b is None else ([b, b + 1],)
                                                             for _, _, b in cached],
                                              num_computed_tokens=[c for _, c, _ in cached]))
    rt.update(batch, out)


def test_rows_get_distinct_slots_and_frontiers_start_at_the_cached_prefix():
    rt, batch = _runtime(), _Batch()
    _step(rt, batch, new=[("a", 0, 0), ("b", 2 * G, 4)])
    slots = rt.slots.row_slot[:2].tolist()
    assert len(set(slots)) == 2 and all(0 <= s < 3 for s in slots)
    assert rt.slots.frontier[slots[0]] == 0 and rt.slots.frontier[slots[1]] == 2 * G
    assert rt.slots.row_slot[2] == 3  # rows without a request point at the trash slot


def test_a_prefix_hit_reuses_the_finished_requests_exact_sink():
    rt, batch = _runtime(), _Batch()
    pool = rt.pools["layer0"]
    _step(rt, batch, new=[("a", 0, 7)])
    sa = int(rt.slots.row_slot[0])
    sink = torch.randn(H, G, D)
    pool.k[sa, :, :G] = sink
    _step(rt, batch, cached=[("a", G + 5)])  # a's first tile is computed: its sink answers for block 7
    _step(rt, batch, finished=["a"])
    _step(rt, batch, new=[("b", 0, 3)])  # an unrelated request must not take a's retained sink first
    _step(rt, batch, new=[("c", G, 7)])  # c hits a's cached first block
    sc = int(rt.slots.row_slot[batch.req_ids.index("c")])
    assert torch.equal(pool.k[sc, :, :G], sink)


def test_a_hit_in_the_step_that_computes_the_block_copies_the_sink_once_the_step_wrote_it():
    """vLLM offers a prefix hit on a block as soon as the step computing it is scheduled: writer and hitter share a
    step. The hitter's sink comes from the writer's slot after the step's tokens are in it, in every layer."""
    rt, batch = _runtime(), _Batch()
    pool = rt.pools["layer0"]
    _step(rt, batch, new=[("w", 0, 7), ("h", G, 7)], scheduled={"w": G + 40, "h": 30})
    sw, sh = (rt.slots.req_slot[r] for r in ("w", "h"))
    assert rt.slots.step_copies == [(sw, sh)] and not rt.slots.sink_rebuilds
    sink = torch.randn(H, G, D)
    pool.k[sw, :, :G] = sink  # the layer's commit wrote the writer's first tile
    rt.copy_step_sinks(pool)
    assert torch.equal(pool.k[sh, :, :G], sink)
    # The next step: nothing pending, and a later hit copies from the writer at once.
    _step(rt, batch, cached=[("w", G + 40), ("h", G + 30)], scheduled={"w": 1, "h": 1})
    assert not rt.slots.step_copies and not rt.slots.pending
    _step(rt, batch, new=[("x", G, 7)], cached=[("w", G + 41), ("h", G + 31)], scheduled={"x": 5})
    sx = rt.slots.req_slot["x"]
    assert torch.equal(pool.k[sx, :, :G], sink) and not rt.slots.sink_rebuilds


def test_a_hit_on_a_block_an_earlier_step_computed_copies_the_writers_sink():
    """The writer's first tile was computed in an earlier step (chunked prefill): its slot answers before the
    entering request looks, so the sink is the exact 16-bit one, not a rebuild."""
    rt, batch = _runtime(), _Batch()
    pool = rt.pools["layer0"]
    _step(rt, batch, new=[("w", 0, 5)], scheduled={"w": G})
    sink = torch.randn(H, G, D)
    pool.k[rt.slots.req_slot["w"], :, :G] = sink
    _step(rt, batch, new=[("h", G, 5)], cached=[("w", G)], scheduled={"w": 20, "h": 10})
    assert torch.equal(pool.k[rt.slots.req_slot["h"], :, :G], sink) and not rt.slots.warned_rebuild


def test_a_lost_sink_is_rebuilt_from_the_quantized_first_tile():
    rt, batch = _runtime(slots=1), _Batch()
    pool, cache, fmt = rt.pools["layer0"], rt.caches["layer0"], rt.pools["layer0"].fmt
    k, v = torch.randn(G, H, D), torch.randn(G, H, D)
    reference.quantize_into_cache_ref(k, v, torch.tensor([0], dtype=torch.int32), torch.tensor([9], dtype=torch.int32),
                                      cache, fmt)
    _step(rt, batch, new=[("x", 0, 1)])
    _step(rt, batch, cached=[("x", G)])
    _step(rt, batch, finished=["x"])
    _step(rt, batch, new=[("y", G, 9)])  # block 9's sink was never held in a slot
    sy = int(rt.slots.row_slot[0])
    k_deq, _ = reference.dequantize_tiles(cache[9:10], fmt)
    torch.testing.assert_close(pool.k[sy, :, :G], k_deq[0])


def test_thousands_of_requests_leak_no_slot():
    rt, batch = _runtime(slots=3), _Batch()
    for i in range(2000):
        rid = f"r{i}"
        _step(rt, batch, new=[(rid, 0, i % 30)])
        _step(rt, batch, cached=[(rid, G + 1)])
        _step(rt, batch, finished=[rid])
    s = rt.slots
    assert len(s.free) + len(s.retained) == 3 and not s.req_slot
    assert len(s.block_sink) == len(s.sink_block) <= 3


def test_a_preempted_requests_slot_is_lent_and_given_back_on_resume():
    rt, batch = _runtime(slots=2), _Batch()
    _step(rt, batch, new=[("a", 0, 0), ("b", 0, 2)])
    _step(rt, batch, finished=["b"])
    batch.req_ids.remove("a")  # a is preempted: out of the batch, still alive
    _step(rt, batch, new=[("c", 0, 4), ("d", 0, 6)])  # needs a's slot
    assert "a" not in rt.slots.req_slot
    _step(rt, batch, finished=["c"])
    batch.req_ids.append("a")
    _step(rt, batch, cached=[("a", 0)], resumed=["a"])
    assert "a" in rt.slots.req_slot and rt.slots.frontier[rt.slots.req_slot["a"]] == 0


def test_a_lent_slot_no_longer_answers_for_its_old_owners_first_block():
    """The borrower overwrites the lent slot's sink before its own first tile is complete: a resume hit on the old
    owner's first block must rebuild the sink from the block, not copy the borrower's tokens."""
    rt, batch = _runtime(slots=2), _Batch()
    pool = rt.pools["layer0"]
    _step(rt, batch, new=[("a", 0, 5), ("c", 0, 20)], scheduled={"a": G + 3, "c": 10})
    _step(rt, batch, cached=[("a", G + 3), ("c", 10)], scheduled={"a": 1, "c": 1})
    batch.req_ids.remove("a")  # preempted
    _step(rt, batch, new=[("b", 0, 9)], cached=[("c", 11)], scheduled={"b": 10, "c": 1})  # b takes a's slot
    pool.k[rt.slots.req_slot["b"], :, :10] = 7.0  # b's first 10 tokens: no first tile yet
    _step(rt, batch, finished=["c"], cached=[("b", 10)], scheduled={"b": 1})
    batch.req_ids.append("a")
    _step(rt, batch, cached=[("a", G, 5), ("b", 11)], resumed=["a"], scheduled={"a": 4, "b": 1})  # hit on block 5
    assert rt.slots.warned_rebuild
    assert not (pool.k[rt.slots.req_slot["a"], :, :10] == 7.0).any()


def test_a_preempted_request_that_kept_its_slot_resumes_with_its_exact_sink():
    rt, batch = _runtime(slots=2), _Batch()
    pool = rt.pools["layer0"]
    _step(rt, batch, new=[("a", 0, 5)], scheduled={"a": G + 3})
    sa = rt.slots.req_slot["a"]
    sink = torch.randn(H, G, D)
    pool.k[sa, :, :G] = sink
    _step(rt, batch, cached=[("a", G + 3)], scheduled={"a": 1})
    batch.req_ids.remove("a")  # preempted; nobody needs its slot meanwhile
    batch.req_ids.append("a")
    _step(rt, batch, cached=[("a", G, 5)], resumed=["a"], scheduled={"a": 4})  # resumes with a hit on block 5
    assert rt.slots.req_slot["a"] == sa and not rt.slots.warned_rebuild
    assert torch.equal(pool.k[sa, :, :G], sink)
