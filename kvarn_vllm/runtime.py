"""Per-worker state beside vLLM's pages: the request → staging-slot map (host), frontiers and pools (device).

vLLM's scheduler owns the pages; KVarN additionally owns, per running request, a 16-bit sink slot and tail slot
(see `staging`). Slots are assigned when a request enters the batch and released when it finishes. A finished
request's sink stays readable, keyed by the physical block that holds its first tile, until the slot is needed
again: a later request whose prefix-cache hit starts at that block reuses the exact 16-bit sink (the published
fork read a stale one there). If it has been overwritten, the sink is rebuilt from the block's quantized copy of
tile 0 and a warning says so.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from kvarn_kernels import KVarNFormat
from kvarn_kernels.codec import dequantize_tiles

from .staging import StagingPool

logger = logging.getLogger("kvarn_vllm")


class SlotManager:
    """Host-side map from request ids to staging slots, kept in step with vLLM's persistent batch."""

    def __init__(self, num_slots: int, group: int, max_rows: int, device: torch.device | str) -> None:
        self.num_slots, self.group = num_slots, group
        self.free: list[int] = list(range(num_slots))
        self.req_slot: dict[str, int] = {}
        self.retained: OrderedDict[int, int] = OrderedDict()  # finished requests' slots (slot -> first block)
        self.sink_block: dict[int, int] = {}  # slot -> block id whose tile 0 the slot's sink holds
        self.block_sink: dict[int, int] = {}  # block id -> slot
        self.frontier = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        self.row_slot = torch.full((max_rows,), num_slots, dtype=torch.int32, device=device)
        self.device = torch.device(device)
        self.warned_rebuild = False
        self.rebuilds = 0  # sinks rebuilt from a quantized tile 0 (not exact), over the worker's life
        self.sink_copies: list[tuple[int, int]] = []  # (from slot, to slot), applied by the runtime
        self.sink_rebuilds: list[tuple[int, int]] = []  # (slot, block)
        # Sinks this step writes (a first tile completed by the step): a prefix hit on such a block in the same step
        # copies the sink in each layer once the step's tokens are in their slots (`step_copies`, applied by the
        # backend before attention), not when the step starts.
        self.pending: set[int] = set()
        self.step_copies: list[tuple[int, int]] = []

    def _take(self, batch_ids: set[str]) -> int:
        if self.free:
            return self.free.pop()
        if self.retained:
            slot, _ = self.retained.popitem(last=False)
            self._forget_sink(slot)
            return slot
        # Every slot belongs to a live request: take one from a request outside this step's batch (preempted or
        # waiting); it gets a slot again, and its sink back, when it resumes.
        for rid, slot in self.req_slot.items():
            if rid not in batch_ids:
                del self.req_slot[rid]
                # Its sink is about to be overwritten: a resume hit on its first block must not copy it from here.
                self._forget_sink(slot)
                return slot
        raise RuntimeError(f"KVarN: all {self.num_slots} staging slots are in use by requests of this step; "
                           "max_num_seqs must not exceed the slots allocated at start-up")

    def _forget_sink(self, slot: int) -> None:
        block = self.sink_block.pop(slot, None)
        if block is not None and self.block_sink.get(block) == slot:
            del self.block_sink[block]

    def assign(self, req_id: str, computed: int, first_block: int, batch_ids: set[str]) -> tuple[int, int]:
        """A slot for a request entering the batch with `computed` tokens already cached (a prefix hit), its sink
        resolved at once (`take` + `resolve_sink`)."""
        slot = self.take(req_id, batch_ids)
        if computed >= self.group:
            self.resolve_sink(slot, first_block)
        return slot, computed

    def take(self, req_id: str, batch_ids: set[str]) -> int:
        old = self.req_slot.get(req_id)
        if old is not None:
            # A preempted request resuming in the slot it kept (nobody borrowed it): its sink is still there, exact;
            # freeing and re-taking the slot would throw that away and rebuild it from the quantized copy.
            return old
        slot = self._take(batch_ids)
        self.req_slot[req_id] = slot
        return slot

    def resolve_sink(self, slot: int, first_block: int) -> None:
        """The 16-bit sink of a request whose prefix hit covers its first tile (cached in `first_block`): copied
        from the slot that holds it (at once, or in this step's layers where this step writes it), else rebuilt
        from the block's quantized copy."""
        source = self.block_sink.get(first_block)
        if source is not None and source in self.pending:
            self.step_copies.append((source, slot))
            self.sink_block[slot] = first_block  # the writer stays the block's owner: its copy is not there yet
            return
        if source is not None:
            self.sink_copies.append((source, slot))
        else:
            self.sink_rebuilds.append((slot, first_block))
        self.sink_block[slot] = first_block
        self.block_sink[first_block] = slot

    def release(self, req_id: str) -> None:
        slot = self.req_slot.pop(req_id, None)
        if slot is None:
            return
        if slot in self.sink_block:
            self.retained[slot] = self.sink_block[slot]
        else:
            self.free.append(slot)

    def note_progress(self, slot: int, computed: int, first_block: int, pending: bool = False) -> None:
        """Once a request's first tile is computed, its sink slot answers for that block (pending: computed by
        the step about to run)."""
        if computed >= self.group and self.sink_block.get(slot) != first_block:
            if pending:
                self.pending.add(slot)
            self._forget_sink(slot)
            stale = self.block_sink.get(first_block)
            if stale is not None and stale != slot:
                self.sink_block.pop(stale, None)
                if self.retained.pop(stale, None) is not None:
                    self.free.append(stale)
            self.sink_block[slot] = first_block
            self.block_sink[first_block] = slot


class Runtime:
    """Everything KVarN keeps per worker: the slot manager and one staging pool per layer."""

    def __init__(self, preset: str, num_slots: int, overflow: int, num_speculative: int, max_rows: int,
                 max_model_len: int, device: torch.device | str) -> None:
        self.preset, self.num_slots, self.overflow, self.num_speculative = preset, num_slots, overflow, num_speculative
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        group = _group_of(preset)
        self.slots = SlotManager(num_slots, group, max_rows, device)
        self.pools: dict[str, StagingPool] = {}
        self.caches: dict[str, torch.Tensor] = {}

    def pool(self, layer_name: str, fmt: KVarNFormat, num_kv_heads: int, dtype: torch.dtype) -> StagingPool:
        pool = self.pools.get(layer_name)
        if pool is None:
            pool = StagingPool(fmt, self.num_slots, num_kv_heads, self.overflow, dtype, self.device)
            self.pools[layer_name] = pool
        return pool

    def update(self, input_batch: Any, scheduler_output: Any) -> None:
        """After vLLM updated its persistent batch: assign/release slots, publish row → slot for this step.

        Order matters for prefix hits: rows that computed their first tile in earlier steps answer for its block
        first; then entering requests get slots; then rows whose first tile this step completes answer for it
        (pending); only then do entering requests with a hit look for their sink — vLLM offers a block to a hit as
        soon as the step that computes it is scheduled, so writer and hitter may share a step."""
        s = self.slots
        s.pending.clear()
        s.step_copies.clear()
        for rid in scheduler_output.finished_req_ids:
            s.release(rid)
        req_ids = [r for r in input_batch.req_ids if r is not None]
        index = {r: i for i, r in enumerate(req_ids)}
        batch_ids = set(req_ids)
        computed = input_batch.num_computed_tokens_cpu
        table = input_batch.block_table[0].get_cpu_tensor()
        scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
        for rid, slot in list(s.req_slot.items()):
            if rid in index:
                s.note_progress(slot, int(computed[index[rid]]), int(table[index[rid], 0]))
        entering: list[tuple[int, int, int]] = []  # (slot, computed, first block)
        for new in scheduler_output.scheduled_new_reqs:
            slot = s.take(new.req_id, batch_ids)
            entering.append((slot, new.num_computed_tokens, _first_block(new.block_ids)))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            if rid in resumed or rid not in s.req_slot:
                block_ids = cached.new_block_ids[i] if cached.new_block_ids else None
                first = _first_block(block_ids) if block_ids else -1
                entering.append((s.take(rid, batch_ids), cached.num_computed_tokens[i], first))
        for rid, n in scheduled.items():
            slot = s.req_slot.get(rid)
            if slot is not None and rid in index:
                c = int(computed[index[rid]])
                if c < s.group <= c + n:
                    s.note_progress(slot, c + n, int(table[index[rid], 0]), pending=True)
        for slot, c, first in entering:
            if c >= s.group:
                s.resolve_sink(slot, first)
        rows = [s.req_slot.get(r, s.num_slots) for r in req_ids]
        host = torch.full((s.row_slot.shape[0],), s.num_slots, dtype=torch.int32)
        host[: len(rows)] = torch.tensor(rows, dtype=torch.int32)
        s.row_slot.copy_(host)
        if entering:
            slot_ids = torch.tensor([e[0] for e in entering], dtype=torch.long)
            # A new request's frontier is its first uncached token (prefix hits are whole tiles).
            starts = torch.tensor([e[1] - e[1] % s.group for e in entering], dtype=torch.int32)
            s.frontier[slot_ids.to(s.device)] = starts.to(s.device)
        self._restore_sinks()

    def copy_step_sinks(self, pool: StagingPool) -> None:
        """This step's same-step prefix hits, for one layer: called once the step's tokens are in their slots and
        before attention."""
        for src, dst in self.slots.step_copies:
            pool.copy_sink(src, dst)

    def _restore_sinks(self) -> None:
        s = self.slots
        for src, dst in s.sink_copies:
            for pool in self.pools.values():
                pool.copy_sink(src, dst)
        for slot, block in s.sink_rebuilds:
            s.rebuilds += 1
            if not s.warned_rebuild:
                logger.warning("KVarN: a prefix-cache hit's 16-bit sink was no longer held; rebuilt from its "
                               "quantized copy (outputs may differ slightly from a run without prefix caching)")
                s.warned_rebuild = True
            for name, pool in self.pools.items():
                cache = self.caches.get(name)
                if cache is None or block < 0:
                    continue
                k, v = dequantize_tiles(cache[block : block + 1], pool.fmt)
                pool.k[slot, :, : s.group] = k[0].to(pool.k.dtype)
                pool.v[slot, :, : s.group] = v[0].to(pool.v.dtype)
        s.sink_copies.clear()
        s.sink_rebuilds.clear()


def _first_block(block_ids: Any) -> int:
    """The first block of KV-cache group 0 (block_ids is a tuple of per-group lists)."""
    try:
        group = block_ids[0]
        return int(group[0]) if len(group) else -1
    except (TypeError, IndexError):
        return -1


def _group_of(preset: str) -> int:
    from kvarn_kernels.format import PRESETS

    return PRESETS[preset][2]


_RUNTIME: Runtime | None = None


def get_runtime() -> Runtime | None:
    return _RUNTIME


def init_runtime(**kwargs: Any) -> Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime(**kwargs)
    return _RUNTIME


def slot_state(_worker: Any = None) -> dict[str, int]:
    """This worker's staging-slot counts, for `LLM.collective_rpc(slot_state)` (vLLM passes the worker; unused):
    slots allocated, free, retained (a finished request's sink kept for prefix hits) and held by live requests
    (every slot is one of these three), and how many prefix hits got a sink rebuilt from its quantized copy."""
    rt = get_runtime()
    if rt is None:
        return {"num_slots": 0, "free": 0, "retained": 0, "live": 0, "sink_rebuilds": 0}
    s = rt.slots
    return {"num_slots": s.num_slots, "free": len(s.free), "retained": len(s.retained), "live": len(s.req_slot),
            "sink_rebuilds": s.rebuilds}
